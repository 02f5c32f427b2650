"""Which Triton kernels passed their CUDA tests on real hardware, and what ``DCM_BACKEND=auto`` runs.

The Triton kernels of :mod:`dcm.kernels` are tested in CI only under Triton's CPU interpreter and an
ahead-of-time compile. Under ``"auto"`` (the default) a CUDA op runs its kernels only when the
record :file:`dcm/kernels/verified.json` says that this very source passed its CUDA tests on a GPU
of the same compute-capability major version; otherwise it runs the PyTorch path. An explicit
``DCM_BACKEND=triton`` (or :func:`dcm.set_backend`) still runs the kernels, verified or not.

The key of an op
----------------
``key = sha256`` of the op's kernel module (its ``@triton.jit`` kernels and launch code) and,
transitively, of the definitions it imports from within ``dcm`` (e.g. the generated rolling
kernels, ``LAUNCH_OPTS`` and the op's own ``KNOBS`` defaults of :mod:`dcm.kernels.launch`), each
parsed and written back without comments, docstrings or layout. A record matches when its ``op``,
``key`` and ``cc_major`` (the device's compute-capability major version: the kernels compile to
different instructions on sm_80 and sm_90) equal the running ones. Editing a kernel or anything it
calls changes the key, and the op falls back to PyTorch until a GPU run records the new key. Not in
the key: a file path (a copy of ``dcm`` elsewhere has the same keys; the import statements are code,
though, so moving a definition to another module changes the key of the ops that import it), the
torch / Triton / CUDA versions (stored with each record as information: a key on them would drop
every kernel at every upgrade, and the tests that a version change could break are rerun by
:file:`benchmarks/gpu_session.sh`) and launch knobs set in the environment (``DCM_<knob>``: explicit
tuning; the record is for the defaults, whose values are in the key).

``DCM_VERIFIED=FILE[:FILE...]`` adds the records of other files of the same form (the GPU session
uses it to test the current sources and then to time what it verified).

>>> sorted(OPS)
['dynamic_conv', 'foreground', 'support_activation']
>>> backend_report("cpu")["foreground"]["path"]
'torch'
"""
from __future__ import annotations

import argparse
import ast
import datetime
import fnmatch
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = ["OPS", "RECORD_FILE", "backend_report", "format_report", "op_key", "current_keys", "load_records"]

log = logging.getLogger("dcm")

#: version of the key's definition (a record written under another scheme never matches)
KEY_SCHEME = "dcm-kernel-key-1"
PKG = Path(__file__).resolve().parent
#: the committed record (shipped in the wheel)
RECORD_FILE = PKG / "kernels" / "verified.json"
ENV_EXTRA = "DCM_VERIFIED"
#: the module of the launch knobs: an op's key holds only its own knobs' defaults
KNOBS_MODULE = "dcm.kernels.launch"

#: The ops with Triton kernels: the kernel module whose source (with what it calls) is the key, the
#: prefix of the op's launch knobs in ``KNOBS`` of :data:`KNOBS_MODULE`, and the CUDA tests that are the
#: op's own (``classname::name`` patterns of pytest's JUnit XML). A test that runs the kernels of several
#: ops is the own test of each of them (the DynamicConvModule test runs the foreground pooling that
#: generates its kernels and the dynamic convolution): its failure keeps all of them unrecorded. Every
#: other CUDA test (compile, CUDA graphs, networks) is shared: it must pass for any op to be recorded.
OPS: Dict[str, dict] = {
    "dynamic_conv": dict(
        module="dcm.kernels.dynamic_conv", knobs="DW_",
        what="the dynamic depthwise convolutions (rolling-row kernels: forward, dx, dW)",
        tests=("tests.test_kernels_cuda::test_dynamic_conv_*", "tests.test_dcm_cuda::test_dynamic_conv_module_cuda*"),
    ),
    "support_activation": dict(
        module="dcm.kernels.support_activation", knobs="SAM_",
        what="support activation (operand prep, window max, Gram gradient, normalisation backward)",
        tests=("tests.test_kernels_cuda::test_sam_*", "tests.test_dcm_cuda::test_support_activation_cuda*"),
    ),
    "foreground": dict(
        module="dcm.kernels.foreground", knobs="FG_",
        what="foreground selection (mask resize fused) + one-pass adaptive pooling, backward",
        tests=("tests.test_kernels_foreground_cuda::*", "tests.test_dcm_cuda::test_dynamic_conv_module_cuda*"),
    ),
}


# ------------------------------------------------------------------------------------------------ key
Reader = Callable[[str], Optional[str]]


def package_reader(root: Path = PKG.parent) -> Reader:
    """Reads ``dcm/...`` files under ``root`` (default: where this ``dcm`` is installed)."""

    def read(rel: str) -> Optional[str]:
        p = root / rel
        return p.read_text(encoding="utf-8") if p.is_file() else None

    return read


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


_SKIP_FIELDS = {"type_comment", "kind", "type_params"}


def _canon(node) -> str:
    """A text of the syntax tree that is the same on every Python >= 3.9 (empty / None fields and
    version-specific fields left out; no positions)."""
    if isinstance(node, ast.AST):
        parts = []
        for name, value in ast.iter_fields(node):
            if name in _SKIP_FIELDS or value is None or (isinstance(value, list) and not value):
                continue
            if name == "level" and isinstance(node, ast.ImportFrom) and not value:
                continue
            parts.append(f"{name}={_canon(value)}")
        return f"{type(node).__name__}({','.join(parts)})"
    if isinstance(node, list):
        return "[" + ",".join(_canon(v) for v in node) + "]"
    return f"{type(node).__name__}:{node!r}"


class _Module:
    """One parsed source file: its top-level definitions and its relative imports."""

    def __init__(self, name: str, text: str, is_pkg: bool):
        self.name, self.is_pkg = name, is_pkg
        self.tree = _strip_docstrings(ast.parse(text))
        self.defs: Dict[str, List[int]] = {}
        for i, st in enumerate(self.tree.body):
            for target in _defined_names(st):
                self.defs.setdefault(target, []).append(i)

    def resolve(self, node: ast.ImportFrom) -> Optional[str]:
        """Dotted module name of a relative import (``None`` for absolute ones)."""
        if not node.level:
            return None
        parts = self.name.split(".")
        if not self.is_pkg:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))


def _defined_names(st: ast.stmt) -> List[str]:
    if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [st.name]
    targets: List[ast.expr] = []
    if isinstance(st, ast.Assign):
        targets = list(st.targets)
    elif isinstance(st, (ast.AnnAssign, ast.AugAssign)):
        targets = [st.target]
    names = []
    for t in targets:
        for n in ast.walk(t):
            if isinstance(n, ast.Name):
                names.append(n.id)
    return names


def _knobs_filtered(st: ast.stmt, prefix: str) -> ast.stmt:
    """The ``KNOBS = {...}`` statement with only the op's own knobs, without their descriptions."""
    if not (isinstance(st, (ast.Assign, ast.AnnAssign)) and isinstance(st.value, ast.Dict)):
        return st
    keys, values = [], []
    for k, v in zip(st.value.keys, st.value.values):
        if isinstance(k, ast.Constant) and isinstance(k.value, str) and not k.value.startswith(prefix):
            continue
        if isinstance(v, ast.Tuple):
            v = ast.Tuple(elts=v.elts[:4], ctx=ast.Load())
        keys.append(k)
        values.append(v)
    value = ast.Dict(keys=keys, values=values)
    if isinstance(st, ast.Assign):
        return ast.Assign(targets=st.targets, value=value)
    return ast.AnnAssign(target=st.target, annotation=st.annotation, value=value, simple=st.simple)


def op_sources(op: str, read: Optional[Reader] = None) -> List[str]:
    """The canonical texts the key of ``op`` hashes: the kernel module first, then every definition
    it reaches through relative imports (sorted: the order in which they are reached does not count)."""
    return _collect(op, read)[0]


def op_modules(op: str, read: Optional[Reader] = None) -> List[str]:
    """The modules whose code (whole, or some of their definitions) is in the key of ``op``."""
    return _collect(op, read)[1]


def _collect(op: str, read: Optional[Reader]) -> Tuple[List[str], List[str]]:
    read = read or package_reader()
    spec = OPS[op]
    modules: Dict[str, Optional[_Module]] = {}

    def module(name: str) -> Optional[_Module]:
        if name not in modules:
            rel = name.replace(".", "/")
            text, is_pkg = read(rel + ".py"), False
            if text is None:
                text, is_pkg = read(rel + "/__init__.py"), True
            modules[name] = None if text is None else _Module(name, text, is_pkg)
        return modules[name]

    whole: List[str] = []
    pieces: Dict[Tuple[str, int], str] = {}
    seen: set = set()
    todo: List[Tuple[str, Optional[str], bool]] = [(spec["module"], None, True)]

    def follow(mod: _Module, nodes: Iterable[ast.AST], top: bool) -> None:
        """Queue what ``nodes`` use: names of ``mod`` and, through relative imports, of other modules.
        Submodules imported inside a definition (``top`` False, e.g. an availability check that imports
        every kernel module) are not followed."""
        for node in nodes:
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id in mod.defs:
                    todo.append((mod.name, n.id, False))
                elif isinstance(n, ast.ImportFrom) and n.level:
                    base = mod.resolve(n)
                    for alias in n.names:
                        sub = f"{base}.{alias.name}" if base else alias.name
                        if not n.module and module(sub) is not None:
                            if top:
                                todo.append((sub, None, True))
                        else:
                            todo.append((base, alias.name, False))

    while todo:
        name, attr, is_whole = todo.pop()
        if (name, attr) in seen:
            continue
        seen.add((name, attr))
        mod = module(name)
        if mod is None:
            raise FileNotFoundError(f"op {op!r}: module {name} not found")
        if is_whole:
            whole.append(_canon(mod.tree))
            follow(mod, mod.tree.body, True)
            for i in range(len(mod.tree.body)):
                seen.add((name, f"#{i}"))
            continue
        if attr not in mod.defs:
            continue  # an import of a name that is not a definition of this module (e.g. re-exported)
        for i in mod.defs[attr]:
            if (name, f"#{i}") in seen:
                continue
            seen.add((name, f"#{i}"))
            st = mod.tree.body[i]
            if name == KNOBS_MODULE and attr == "KNOBS":
                st = _knobs_filtered(st, spec["knobs"])
            pieces[(name, i)] = _canon(st)
            follow(mod, [st], False)
    used = sorted({name for name, _ in seen if modules.get(name) is not None and name != spec["module"]})
    return whole[:1] + sorted(whole[1:]) + sorted(pieces.values()), [spec["module"]] + used


def op_key(op: str, read: Optional[Reader] = None) -> str:
    """The source key of ``op`` (hex sha256; see the module docstring)."""
    h = hashlib.sha256(KEY_SCHEME.encode())
    for text in op_sources(op, read):
        h.update(b"\0" + text.encode())
    return h.hexdigest()


_keys: Dict[str, str] = {}


UNREADABLE = "unreadable: "


def current_keys() -> Dict[str, str]:
    """``{op: key}`` of this installation's sources (computed once per process; a source that cannot be
    read or parsed gets ``"unreadable: ..."``, which matches no record)."""
    if not _keys:
        for op in OPS:
            try:
                _keys[op] = op_key(op)
            except (OSError, SyntaxError, ValueError) as e:
                _keys[op] = f"{UNREADABLE}{type(e).__name__}: {e}"
    return dict(_keys)


# -------------------------------------------------------------------------------------------- records
def _read_record_file(path: Path) -> List[dict]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("key_scheme") != KEY_SCHEME:
        return []
    out = []
    for r in data.get("records", []):
        if isinstance(r, dict) and isinstance(r.get("op"), str) and isinstance(r.get("key"), str) and isinstance(r.get("cc_major"), int):
            out.append(dict(r, file=str(path)))
    return out


_records: List[dict] = []
_records_loaded = [False]


def extra_record_files() -> List[str]:
    return [p for p in os.environ.get(ENV_EXTRA, "").split(os.pathsep) if p.strip()]


def load_records(files: Optional[Sequence] = None) -> List[dict]:
    """The records of ``files`` (default: the shipped record plus ``DCM_VERIFIED``'s files, read once
    per process). A ``DCM_VERIFIED`` file that cannot be read is reported once and ignored."""
    if files is not None:
        return [r for f in files for r in _read_record_file(Path(f))]
    if not _records_loaded[0]:
        files = ([(RECORD_FILE, "the record")] if RECORD_FILE.is_file() else []) + [(f, ENV_EXTRA + "=" + f) for f in extra_record_files()]
        for f, what in files:
            try:
                _records.extend(_read_record_file(Path(f)))
            except (OSError, ValueError, AttributeError) as e:
                log.warning("dcm: %s (%s): not read, %s: %s", what, f, type(e).__name__, e)
        _records_loaded[0] = True
    return list(_records)


def _describe(r: dict) -> str:
    bits = [r.get("date"), r.get("device"), r.get("torch") and f"torch {r['torch']}", r.get("triton") and f"Triton {r['triton']}",
            r.get("commit") and f"commit {r['commit']}"]
    return ", ".join(str(b) for b in bits if b) or "no details"


def decide(op: str, cc_major: int, key: str, records: Sequence[dict]) -> Tuple[Optional[dict], str]:
    """``(matching record or None, why)`` for ``op`` with source ``key`` on a device of ``cc_major``."""
    if key.startswith(UNREADABLE):
        return None, f"its source could not be read for its key ({key[len(UNREADABLE):]})"
    mine = [r for r in records if r["op"] == op]
    for r in mine:
        if r["key"] == key and r["cc_major"] == cc_major:
            kind = "candidate under test" if r.get("candidate") else "verified"
            return r, f"{kind}: {_describe(r)}"
    same_arch = [r for r in mine if r["cc_major"] == cc_major]
    if same_arch:
        return None, f"its source changed since its sm_{cc_major}x record ({_describe(same_arch[-1])})"
    other = sorted({r["cc_major"] for r in mine if r["key"] == key})
    if other:
        return None, f"verified on {', '.join(f'sm_{m}x' for m in other)} only"
    return None, f"never verified on a sm_{cc_major}x GPU"


# ------------------------------------------------------------------------------------------ the report
def _device_info(index: int) -> Tuple[int, int, str]:
    """(major, minor, name) of CUDA device ``index`` (patched in the CPU tests)."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor), torch.cuda.get_device_name(index)


def _triton_ready() -> bool:
    from . import kernels

    return kernels.available()


def backend_report(device="cuda", capability: Optional[Tuple[int, int]] = None) -> Dict[str, dict]:
    """Each op's path on ``device`` under the current backend setting: ``{op: {path, why, key, record}}``.

    ``path`` is ``"triton"`` or ``"torch"``. ``capability=(major, minor)`` asks about a CUDA device of
    that compute capability that need not be here (Triton assumed usable), e.g. ``(9, 0)`` for an H100.

    >>> backend_report("cpu")["dynamic_conv"]["why"]
    'CPU tensors run the PyTorch path'
    """
    import torch

    from . import config

    dev = torch.device(device)
    name = config.get_backend()
    keys = current_keys()
    rows = {op: dict(path="torch", why="", key=keys[op], record=None) for op in OPS}

    def every(path: str, why: str) -> Dict[str, dict]:
        for r in rows.values():
            r.update(path=path, why=why)
        return rows

    if name == "torch":
        return every("torch", "DCM_BACKEND=torch")
    if dev.type != "cuda" and capability is None:
        if name == "triton" and config._triton_interpreted():
            return every("triton", "DCM_BACKEND=triton under Triton's CPU interpreter")
        return every("torch", "CPU tensors run the PyTorch path")
    if capability is None:
        if not _triton_ready():
            return every("torch", "CUDA, Triton or dcm.kernels unavailable here")
        major, minor, dname = _device_info(dev.index or 0)
    else:
        major, minor, dname = int(capability[0]), int(capability[1]), f"a sm_{capability[0]}{capability[1]} device"
    if name == "triton":
        return every("triton", "DCM_BACKEND=triton (forced, verified or not)")
    records = load_records()
    for op, r in rows.items():
        rec, why = decide(op, major, keys[op], records)
        r.update(path="triton" if rec else "torch", why=why, record=rec, device=dname, capability=f"{major}.{minor}")
    return rows


def format_report(rows: Dict[str, dict]) -> str:
    """One line: which ops run Triton, which PyTorch, and why."""
    tri = [f"{op} ({r['why']})" for op, r in rows.items() if r["path"] == "triton"]
    pt = [f"{op} ({r['why']})" for op, r in rows.items() if r["path"] == "torch"]
    return "; ".join(x for x in (tri and "Triton for " + ", ".join(tri), pt and "PyTorch for " + ", ".join(pt)) if x)


# -------------------------------------------------------------------------- the "auto" decision (hot path)
_auto: Dict[int, Dict[str, bool]] = {}
_logged: set = set()


def _auto_table(index: int) -> Dict[str, bool]:
    table = _auto.get(index)
    if table is None:
        major, minor, dname = _device_info(index)
        records = load_records()
        keys = current_keys()
        rows = {}
        for op in OPS:
            rec, why = decide(op, major, keys[op], records)
            rows[op] = dict(path="triton" if rec else "torch", why=why)
        table = {op: r["path"] == "triton" for op, r in rows.items()}
        _auto[index] = table
        if major not in _logged:  # once per process (per GPU architecture)
            _logged.add(major)
            log.info("dcm: DCM_BACKEND=auto on cuda:%d (%s, sm_%d%d): %s. DCM_BACKEND=triton forces every kernel; "
                     "docs/SPEED.md#verified-kernels", index, dname, major, minor, format_report(rows))
    return table


def _auto_triton(op: Optional[str], index: int) -> bool:
    """Whether ``"auto"`` runs ``op``'s kernels (``None``: every op's) on CUDA device ``index``."""
    table = _auto_table(index)
    return all(table.values()) if op is None else table[op]


def _mark_constant(fn):
    """``torch.compiler.assume_constant_result(fn)``: under ``torch.compile`` the answer is computed
    once while tracing and is a constant of the graph (no graph break, no logging traced). Without
    ``torch._dynamo`` loaded yet, the same mark is set without importing it (about 1 s)."""
    if "torch._dynamo" in sys.modules:
        import torch

        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # what torch._dynamo.assume_constant_result sets
    return fn


_auto_triton = _mark_constant(_auto_triton)


def _reset() -> None:
    """Forget the cached keys, records, decisions and the logged line (tests)."""
    _keys.clear()
    _records.clear()
    _records_loaded[0] = False
    _auto.clear()
    _logged.clear()


# ----------------------------------------------------------------------- writing records (GPU session)
def _versions() -> dict:
    info = dict(python=sys.version.split()[0])
    for name in ("torch", "triton"):
        try:
            info[name] = getattr(__import__(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - record what is missing
            info[name] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        info["cuda"] = None
    return info


def _here() -> Optional[dict]:
    """The CUDA device 0 of this machine (``None`` without one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor, name = _device_info(0)
    return dict(cc_major=major, capability=f"{major}.{minor}", device=name)


def _document(records: List[dict], about: str) -> dict:
    fields = ("op", "key", "cc_major", "capability", "device", "torch", "triton", "cuda", "python", "date", "commit", "tests", "evidence", "candidate")
    clean = [{k: r[k] for k in fields if r.get(k) is not None} for r in records]
    clean.sort(key=lambda r: (r["op"], r["cc_major"], r.get("date", ""), r["key"]))
    return dict(about=about, key_scheme=KEY_SCHEME, records=clean)


ABOUT = ("Which dcm Triton kernels passed their CUDA tests on real hardware (dcm/verification.py): under "
         "DCM_BACKEND=auto an op runs its kernels on CUDA only with a record of its current source key and the "
         "device's compute-capability major. Written by benchmarks/gpu_session.sh (OUTDIR/verified.json); "
         "docs/SPEED.md#verified-kernels.")


def write(path, records: List[dict], about: str = ABOUT) -> None:
    Path(path).write_text(json.dumps(_document(records, about), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def candidate(here: Optional[dict], keys: Dict[str, str]) -> List[dict]:
    """Records of every op's current key for this device: what the CUDA tests run under ``"auto"``."""
    if here is None:
        return []
    return [dict(op=op, key=k, candidate=True, tests="candidate: under test", **here) for op, k in keys.items()]


def junit_cases(path) -> List[Tuple[str, str]]:
    """``[(classname::name, outcome)]`` of a JUnit XML (outcome: passed, failed, error, skipped)."""
    import xml.etree.ElementTree as ET

    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            out.append((tid, "failed"))
        elif case.find("error") is not None:
            out.append((tid, "error"))
        elif case.find("skipped") is not None:
            out.append((tid, "skipped"))
        else:
            out.append((tid, "passed"))
    return out


def _owners(tid: str) -> Set[str]:
    """The ops whose own test ``tid`` is (empty: a shared test)."""
    return {op for op, spec in OPS.items() if any(fnmatch.fnmatchcase(tid, p) for p in spec["tests"])}


def build(cases: Optional[List[Tuple[str, str]]], here: Optional[dict], keys: Dict[str, str], shipped: List[dict],
          tests_status: str = "ok", candidate_records: Optional[List[dict]] = None, info: Optional[dict] = None,
          kernels_ok: bool = True) -> Tuple[List[dict], Dict[str, dict]]:
    """The records to commit after a run of the CUDA tests, and ``{op: {recorded, why, counts}}``.

    An op is recorded when its CUDA tests ran under a candidate record of its current key on this
    device, every one of its own tests passed (at least one, none skipped) and every shared test
    passed; the tests step did not time out. The result keeps the shipped records whose key is still
    current and replaces those of the same op and compute-capability major by the new ones."""
    status: Dict[str, dict] = {}
    new: List[dict] = []
    cand = {(r["op"], r["key"], r["cc_major"]) for r in (candidate_records or [])}
    shared = [o for t, o in (cases or []) if not _owners(t)]
    shared_bad = sum(o != "passed" for o in shared)
    for op in OPS:
        own = [o for t, o in (cases or []) if op in _owners(t)]
        counts = {k: own.count(k) for k in ("passed", "failed", "error", "skipped")}
        counts["shared_passed"], counts["shared_not_passed"] = len(shared) - shared_bad, shared_bad
        if here is None:
            why = "no CUDA device: nothing verified"
        elif not kernels_ok:
            why = "Triton or dcm.kernels unavailable"
        elif cases is None:
            why = "the CUDA tests did not run (or left no JUnit XML)"
        elif tests_status == "timeout":
            why = "the tests step ran out of time"
        elif (op, keys[op], here["cc_major"]) not in cand:
            why = "the tests did not run this source's kernels (no candidate record of its key)"
        elif not own:
            why = "none of its CUDA tests ran"
        elif counts["passed"] != len(own):
            why = f"{len(own) - counts['passed']} of its {len(own)} CUDA tests did not pass"
        elif shared_bad:
            why = f"{shared_bad} of the {len(shared)} shared CUDA tests did not pass"
        else:
            why = f"{counts['passed']} CUDA tests passed, {len(shared)} shared passed"
            new.append(dict(op=op, key=keys[op], tests=why, date=datetime.date.today().isoformat(), **here, **(info or {})))
            status[op] = dict(recorded=True, why=why, counts=counts)
            continue
        status[op] = dict(recorded=False, why=why, counts=counts)
    replaced = {(r["op"], r["cc_major"]) for r in new}
    kept = [r for r in shipped if r["key"] == keys.get(r["op"]) and (r["op"], r["cc_major"]) not in replaced and not r.get("candidate")]
    for op in OPS:
        status[op]["dropped_stale"] = sum(r["op"] == op and r["key"] != keys[op] for r in shipped)
    return kept + new, status


def _commit() -> Optional[str]:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=PKG, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(PKG)], capture_output=True, text=True, cwd=PKG, timeout=10)
        return head.stdout.strip() + ("+uncommitted dcm/ changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm.verification", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="each op's path on a device (default: cuda)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--capability", help="MAJOR.MINOR of a device that need not be here, e.g. 9.0")
    sub.add_parser("keys", help="the current source key of every op")
    c = sub.add_parser("candidate", help="write a record of every op's current key for this device (for the CUDA tests)")
    c.add_argument("out")
    w = sub.add_parser("record", help="write the record to commit from the CUDA tests' JUnit XML")
    w.add_argument("--junit", required=True)
    w.add_argument("--candidate", required=True, help="the candidate record the tests ran under")
    w.add_argument("--tests-status", default="ok", choices=("ok", "failed", "timeout", "skipped", "missing"))
    w.add_argument("--out", required=True, help="the record in its committed form (dcm/kernels/verified.json)")
    w.add_argument("--summary", help="JSON: per op, recorded or not and why")
    a = p.parse_args(argv)
    if a.cmd == "keys":
        for op, k in current_keys().items():
            print(op, k)
        return 0
    if a.cmd == "report":
        cap = tuple(int(x) for x in a.capability.split(".")) if a.capability else None
        rows = backend_report(a.device, cap)
        for op, row in rows.items():
            print(f"{op:20s} {row['path']:7s} {row['why']}")
        return 0
    here = _here()
    if a.cmd == "candidate":
        write(a.out, candidate(here, current_keys()), about="CANDIDATE record of the GPU session's CUDA tests: never commit it.")
        print(f"candidate record of {len(OPS) if here else 0} ops for {here['device'] if here else 'no CUDA device'}")
        return 0
    junit = Path(a.junit)
    cases = junit_cases(junit) if junit.is_file() and a.tests_status in ("ok", "failed") else None
    try:
        cand = load_records([a.candidate])
    except (OSError, ValueError):
        cand = []
    info = dict(_versions(), commit=_commit())
    shipped = load_records([RECORD_FILE]) if RECORD_FILE.is_file() else []
    records, status = build(cases, here, current_keys(), shipped, a.tests_status, cand, info,
                            kernels_ok=here is not None and _triton_ready())
    write(a.out, records)
    auto = {op: "triton" if decide(op, here["cc_major"], k, records)[0] else "torch" for op, k in current_keys().items()} if here else {}
    for op, s in status.items():
        print(f"{op:20s} {'RECORDED' if s['recorded'] else 'not recorded':13s} {s['why']}"
              + (f"; {s['dropped_stale']} stale record(s) dropped" if s["dropped_stale"] else ""))
    if auto:
        print("DCM_BACKEND=auto with this record on this GPU: " + ", ".join(f"{op} {p}" for op, p in auto.items()))
    print(f"{len(records)} record(s) in {a.out}; to commit: cp {a.out} dcm/kernels/verified.json")
    if a.summary:
        Path(a.summary).write_text(json.dumps(dict(device=here, ops=status, records=len(records), auto=auto), indent=1))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
