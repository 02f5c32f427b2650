"""DCM_BACKEND=auto runs only verified kernels (dcm.verification), on the CPU with fake devices: the
source key (what changes it, what does not), the dispatch per op and device architecture, the one
logging line, the shipped record, and the record the GPU session writes from the CUDA tests' JUnit XML."""
import json
import logging
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch

import dcm
from dcm import config
from dcm import verification as V

ROOT = Path(__file__).resolve().parents[1]
OPS = list(V.OPS)
LAUNCH = "dcm/kernels/launch.py"
GENERATED = "dcm/kernels/generated/dynconv_rolling.py"
SHIPPED = V.RECORD_FILE


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    """No records but the test's own (the shipped file has its own tests), nothing cached."""
    monkeypatch.delenv("DCM_VERIFIED", raising=False)
    monkeypatch.setattr(V, "RECORD_FILE", tmp_path / "no-shipped-record.json")
    V._reset()
    yield
    V._reset()


def cuda_like(index=0):
    """Stands for a CUDA tensor: resolve_backend only looks at its device."""
    return types.SimpleNamespace(device=torch.device("cuda", index))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of the capability in ``fake_gpu.cap`` (default 9.0) with Triton usable."""
    state = types.SimpleNamespace(cap=(9, 0), calls=0)

    def info(index):
        state.calls += 1
        return state.cap[0], state.cap[1], f"Fake GPU {state.cap[0]}.{state.cap[1]}"

    monkeypatch.setattr(V, "_device_info", info)
    monkeypatch.setattr(V, "_triton_ready", lambda: True)
    monkeypatch.setattr(config, "_triton_ready", lambda: True)
    return state


def edited(rel, old, new, count=1):
    """A reader of this checkout's sources with one replacement in ``rel`` (``dcm/...``)."""
    base = V.package_reader(ROOT)
    text = base(rel)
    assert text.count(old) >= count, (rel, old)

    def read(r):
        t = base(r)
        return t.replace(old, new, count) if r == rel else t

    return read


def records_file(tmp_path, records, name="rec.json"):
    p = tmp_path / name
    V.write(p, records)
    return p


def rec(op, key=None, cc_major=9, **kw):
    return dict(dict(op=op, key=key or V.current_keys()[op], cc_major=cc_major, capability=f"{cc_major}.0", device="Fake GPU",
                     torch="2.x", triton="3.x", date="2026-12-03"), **kw)


# ------------------------------------------------------------------------------------------ the key
def test_key_changes_with_the_kernel_source_not_with_comments_or_layout():
    keys = V.current_keys()
    rel = "dcm/kernels/foreground.py"
    # a change inside a @triton.jit kernel
    kernel = re.search(r"@triton\.jit\ndef (_\w+)\(", V.package_reader(ROOT)(rel)).group(1)
    assert V.op_key("foreground", edited(rel, f"def {kernel}(", f"def {kernel}(", 1)) == keys["foreground"]
    body = V.package_reader(ROOT)(rel)
    line = next(ln for ln in body.splitlines() if "tl.load(" in ln)
    assert V.op_key("foreground", edited(rel, line, line.replace("tl.load(", "tl.load(1 + ", 1))) != keys["foreground"]
    # comments, docstrings, blank lines and line breaks do not change it
    assert V.op_key("foreground", edited(rel, line, line + "  # a comment")) == keys["foreground"]
    assert V.op_key("foreground", edited(rel, '"""Triton kernels', '"""Edited docstring. Triton kernels')) == keys["foreground"]
    assert V.op_key("foreground", edited(rel, "\n\n\n", "\n\n\n\n\n")) == keys["foreground"]
    # the launch code is part of it
    assert V.op_key("support_activation", edited("dcm/kernels/support_activation.py", "BP, BC = 64, 64", "BP, BC = 32, 64")) != keys["support_activation"]


def test_key_covers_what_the_kernel_calls_and_nothing_else():
    keys = V.current_keys()

    def changed(read):
        return {op for op in OPS if V.op_key(op, read) != keys[op]}

    # the generated rolling kernels are code dynamic_conv calls
    gen = V.package_reader(ROOT)(GENERATED)
    line = next(ln for ln in gen.splitlines() if "tl.store(" in ln)
    assert changed(edited(GENERATED, line, line.replace("tl.store(", "tl.store(0 + ", 1))) == {"dynamic_conv"}
    # the launch options are called by every op; a knob default only by its own op
    assert changed(edited(LAUNCH, '{"enable_fp_fusion": True}', '{"enable_fp_fusion": False}')) == set(OPS)
    assert changed(edited(LAUNCH, '"DW_ROWS": (4,', '"DW_ROWS": (2,')) == {"dynamic_conv"}
    assert changed(edited(LAUNCH, '"FG_SM_PROGRAMS": (2,', '"FG_SM_PROGRAMS": (3,')) == {"foreground"}
    assert changed(edited(LAUNCH, '"SAM_BP": (32,', '"SAM_BP": (16,')) == {"support_activation"}
    # a knob's description, the availability check, the PyTorch twins and the other ops' modules are not
    assert changed(edited(LAUNCH, "input rows the rolling", "rows the rolling")) == set()
    assert changed(edited("dcm/kernels/__init__.py", "return torch.cuda.is_available() and _importable()",
                          "return bool(torch.cuda.is_available()) and _importable()")) == set()
    assert changed(edited("dcm/functional/foreground.py", "B, K, C, H, W = feat.shape", "B, K, C, H, W = tuple(feat.shape)")) == set()
    sam = V.package_reader(ROOT)("dcm/kernels/support_activation.py")
    line = next(ln for ln in sam.splitlines() if "tl.load(" in ln)
    assert changed(edited("dcm/kernels/support_activation.py", line, line.replace("tl.load(", "tl.load(1 + ", 1))) == {"support_activation"}


def test_key_does_not_depend_on_where_the_files_are(tmp_path):
    shutil.copytree(ROOT / "dcm", tmp_path / "elsewhere" / "dcm")
    assert {op: V.op_key(op, V.package_reader(tmp_path / "elsewhere")) for op in OPS} == V.current_keys()
    # what is hashed is the parsed sources, with no path of the checkout in them
    for op in OPS:
        texts = V.op_sources(op)
        assert texts and not any(str(ROOT) in t for t in texts), op


def test_every_kernel_module_belongs_to_an_op():
    """Every module of dcm/kernels is in some op's key (else editing it would drop nothing to PyTorch)."""
    reached = {m for op in OPS for m in V.op_modules(op)}
    assert {"dcm.kernels.launch", "dcm.kernels.generated.dynconv_rolling"} <= set(V.op_modules("dynamic_conv"))
    kernels = ROOT / "dcm" / "kernels"
    modules = {"dcm.kernels." + ".".join(p.relative_to(kernels).with_suffix("").parts) for p in kernels.rglob("*.py")
               if p.name != "__init__.py"}
    assert modules - reached == {"dcm.kernels._gen_rolling"}  # the generator: not run code (its output is)


def _dcm_imports(path: Path):
    """The ``dcm`` modules (or ``module.name`` for ``from . import name``) that a file under dcm/ imports."""
    import ast

    pkg = ["dcm", *path.parent.relative_to(ROOT / "dcm").parts]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "dcm")
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            yield from ([base] if node.module else [f"{base}.{a.name}" for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "dcm":
            yield node.module


def test_kernel_modules_import_nothing_above_them():
    """In dcm/kernels only the package's own ``__init__`` imports its submodules; a kernel module imports from dcm
    only the launch settings and the generated kernels below it, and those import nothing from dcm."""
    kernels = ROOT / "dcm" / "kernels"
    for p in sorted(kernels.rglob("*.py")):
        rel = p.relative_to(kernels).as_posix()
        for target in _dcm_imports(p):
            if rel == "__init__.py":
                assert target.startswith("dcm.kernels."), (rel, target)
            elif rel == "launch.py" or rel.startswith("generated/"):
                raise AssertionError(f"{rel} imports {target}: it must import nothing from dcm")
            else:
                assert target == "dcm.kernels.launch" or target.startswith("dcm.kernels.generated."), (rel, target)
    assert "dcm.kernels.launch" in set(_dcm_imports(kernels / "dynamic_conv.py"))  # the walk sees relative imports


# ------------------------------------------------------------------------------------- dispatch
def test_auto_runs_only_verified_ops(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("DCM_VERIFIED", str(records_file(tmp_path, [rec("foreground")])))
    with dcm.use_backend("auto"):
        assert config.resolve_backend(cuda_like(), "foreground") == "triton"
        assert config.resolve_backend(cuda_like(), "dynamic_conv") == "torch"
        assert config.resolve_backend(cuda_like(), "support_activation") == "torch"
        assert config.resolve_backend(cuda_like(), None) == "torch"  # every op's kernels verified? no
        assert config.resolve_backend(torch.zeros(1), "foreground") == "torch"
    with dcm.use_backend("triton"):  # explicit: the kernels, verified or not
        assert {config.resolve_backend(cuda_like(), op) for op in OPS} == {"triton"}
    with dcm.use_backend("torch"):
        assert {config.resolve_backend(cuda_like(), op) for op in OPS} == {"torch"}
    rows = dcm.backend_report("cuda")
    assert {op: r["path"] for op, r in rows.items()} == {"foreground": "triton", "dynamic_conv": "torch", "support_activation": "torch"}
    assert rows["foreground"]["why"].startswith("verified: 2026-12-03, Fake GPU") and rows["foreground"]["record"]["op"] == "foreground"
    assert rows["dynamic_conv"]["why"] == "never verified on a sm_9x GPU"


def test_the_record_is_per_architecture(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("DCM_VERIFIED", str(records_file(tmp_path, [rec(op) for op in OPS])))
    assert config.resolve_backend(cuda_like(), None) == "triton"
    V._reset()
    fake_gpu.cap = (8, 0)
    assert {config.resolve_backend(cuda_like(), op) for op in OPS} == {"torch"}
    assert {r["why"] for r in dcm.backend_report("cuda").values()} == {"verified on sm_9x only"}
    assert {r["path"] for r in dcm.backend_report("cuda", capability=(9, 0)).values()} == {"triton"}


def test_editing_a_kernel_drops_it_to_pytorch(fake_gpu, tmp_path, monkeypatch):
    """The record of today's source verifies it; the same record after an edit of the kernel does not."""
    monkeypatch.setenv("DCM_VERIFIED", str(records_file(tmp_path, [rec(op) for op in OPS])))
    assert {config.resolve_backend(cuda_like(), op) for op in OPS} == {"triton"}
    body = V.package_reader(ROOT)("dcm/kernels/foreground.py")
    line = next(ln for ln in body.splitlines() if "tl.load(" in ln)
    reader = edited("dcm/kernels/foreground.py", line, line.replace("tl.load(", "tl.load(1 + ", 1))
    monkeypatch.setattr(V, "package_reader", lambda root=None: reader)
    V._reset()  # a new process with the edited source
    assert config.resolve_backend(cuda_like(), "foreground") == "torch"
    assert config.resolve_backend(cuda_like(), "dynamic_conv") == "triton"
    why = dcm.backend_report("cuda")["foreground"]["why"]
    assert why.startswith("its source changed since its sm_9x record (2026-12-03, Fake GPU"), why


def test_one_log_line_per_process_and_none_on_cpu(fake_gpu, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DCM_VERIFIED", str(records_file(tmp_path, [rec("dynamic_conv")])))
    caplog.set_level(logging.INFO, logger="dcm")
    for _ in range(3):
        for op in OPS:
            config.resolve_backend(torch.zeros(1), op)
    assert caplog.records == []
    for _ in range(5):
        for i in (0, 1):  # two devices of one architecture: one line
            for op in OPS:
                config.resolve_backend(cuda_like(i), op)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert caplog.records[0].levelno == logging.INFO
    msg = lines[0]
    assert msg.startswith("dcm: DCM_BACKEND=auto on cuda:0 (Fake GPU 9.0, sm_90): Triton for dynamic_conv (verified: ")
    assert "PyTorch for support_activation (never verified on a sm_9x GPU), foreground (never verified" in msg
    assert "DCM_BACKEND=triton forces" in msg
    assert fake_gpu.calls == 2  # the decision is cached per device, not made per call


def test_auto_decision_is_a_constant_under_torch_compile(fake_gpu, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DCM_VERIFIED", str(records_file(tmp_path, [rec("foreground")])))
    caplog.set_level(logging.INFO, logger="dcm")

    def f(x):
        return x + 1 if config._auto_verified("foreground", 0) else x - 1

    def g(x):
        return x + 1 if config._auto_verified("dynamic_conv", 0) else x - 1

    x = torch.zeros(3)
    assert torch.compile(f, fullgraph=True, backend="eager")(x).tolist() == [1.0] * 3
    assert torch.compile(g, fullgraph=True, backend="eager")(x).tolist() == [-1.0] * 3
    assert len(caplog.records) == 1


def test_an_unreadable_extra_record_is_reported_once(fake_gpu, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DCM_VERIFIED", str(tmp_path / "missing.json"))
    caplog.set_level(logging.INFO, logger="dcm")
    for op in OPS * 3:
        assert config.resolve_backend(cuda_like(), op) == "torch"
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]


def test_unreadable_source_or_record_runs_pytorch(fake_gpu, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DCM_VERIFIED", str(records_file(tmp_path, [rec(op) for op in OPS])))
    base = V.package_reader(ROOT)
    monkeypatch.setattr(V, "package_reader", lambda root=None: lambda r: None if r.endswith("foreground.py") else base(r))
    V._reset()
    assert config.resolve_backend(cuda_like(), "foreground") == "torch"
    assert config.resolve_backend(cuda_like(), "dynamic_conv") == "triton"
    assert dcm.backend_report("cuda")["foreground"]["why"].startswith("its source could not be read for its key (FileNotFoundError")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setattr(V, "RECORD_FILE", bad)
    V._reset()
    caplog.set_level(logging.WARNING, logger="dcm")
    assert config.resolve_backend(cuda_like(), "dynamic_conv") == "triton"  # the DCM_VERIFIED file still counts
    assert len(caplog.records) == 1 and "the record" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------- shipped record
def test_shipped_record_is_well_formed_and_packaged(monkeypatch):
    monkeypatch.setattr(V, "RECORD_FILE", SHIPPED)
    data = json.loads(SHIPPED.read_text())
    assert data["key_scheme"] == V.KEY_SCHEME and isinstance(data["records"], list)
    for r in data["records"]:
        assert r["op"] in V.OPS and re.fullmatch(r"[0-9a-f]{64}", r["key"]) and isinstance(r["cc_major"], int), r
        assert r.get("device") and r.get("torch") and r.get("triton") and r.get("date") and r.get("commit"), r
        assert not r.get("candidate"), r
    assert '"kernels/verified.json"' in (ROOT / "setup.py").read_text()
    # what a CUDA user gets is what the record says, op by op
    keys = V.current_keys()
    for op, row in dcm.backend_report("cuda", capability=(9, 0)).items():
        assert (row["path"] == "triton") == any(r["op"] == op and r["key"] == keys[op] and r["cc_major"] == 9 for r in data["records"])


def _git_reader(commit):
    def read(rel):
        res = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=ROOT, capture_output=True, text=True)
        return res.stdout if res.returncode == 0 else None

    return read


def test_records_of_an_earlier_commit_hold_that_commits_key():
    """A record that names a commit holds the key of the sources at that commit (checked where git has it)."""
    data = json.loads(SHIPPED.read_text())
    commits = {r["commit"].split("+")[0] for r in data["records"]}
    for c in commits:
        if subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=ROOT, capture_output=True).returncode:
            pytest.skip(f"commit {c} not in this checkout")
        for r in data["records"]:
            if r["commit"].split("+")[0] == c:
                assert V.op_key(r["op"], _git_reader(c)) == r["key"], r


# ---------------------------------------------------------------------- the GPU session's record
HERE = dict(cc_major=9, capability="9.0", device="Fake H100")


def cases(fail=(), skip=(), extra=()):
    names = [
        "tests.test_kernels_cuda::test_dynamic_conv_forward_backward[float32-shape0-vhs5]",
        "tests.test_dcm_cuda::test_dynamic_conv_module_cuda[float32-auto]",
        "tests.test_kernels_cuda::test_sam_raw_fp32_mode[float32-case0-w0]",
        "tests.test_dcm_cuda::test_support_activation_cuda[float32-auto]",
        "tests.test_kernels_foreground_cuda::test_forward_parity_fp32[2-1-8-7-9-bins0]",
        "tests.test_kernels_cuda::test_modules_cuda_graph_capture",
        "tests.test_models_cuda::test_training_step_bf16_473_batch8[dpcn]",
        *extra,
    ]
    return [(n, "failed" if n in fail else "skipped" if n in skip else "passed") for n in names]


def test_record_of_the_ops_whose_cuda_tests_passed():
    keys = V.current_keys()
    cand = V.candidate(HERE, keys)
    stale = rec("foreground", key="0" * 64)
    other_arch = rec("dynamic_conv", cc_major=8)
    old_same = rec("support_activation", date="2026-01-01")
    records, status = V.build(cases(fail={"tests.test_dcm_cuda::test_support_activation_cuda[float32-auto]"}), HERE, keys,
                              [stale, other_arch, old_same], "failed", cand, dict(torch="2.x", triton="3.x", commit="abc"))
    assert {op for op, s in status.items() if s["recorded"]} == {"dynamic_conv", "foreground"}
    assert status["support_activation"]["why"] == "1 of its 2 CUDA tests did not pass"
    assert status["foreground"]["dropped_stale"] == 1
    new = [r for r in records if r.get("device") == "Fake H100"]
    assert sorted(r["op"] for r in new) == ["dynamic_conv", "foreground"]
    assert all(r["key"] == keys[r["op"]] and r["cc_major"] == 9 and r["commit"] == "abc" and not r.get("candidate") for r in new)
    assert other_arch in records and old_same in records and stale not in records  # sm_8x kept, stale dropped
    # the committed form loads back and verifies exactly those ops on sm_9x
    assert {r["op"] for r in records if r["cc_major"] == 9} == {"dynamic_conv", "foreground", "support_activation"}


@pytest.mark.parametrize("kw, why", [
    (dict(fail={"tests.test_models_cuda::test_training_step_bf16_473_batch8[dpcn]"}), "1 of the 2 shared CUDA tests did not pass"),
    (dict(extra=["tests.test_kernels_cuda::test_new_thing"], fail={"tests.test_kernels_cuda::test_new_thing"}),
     "1 of the 3 shared CUDA tests did not pass"),  # a test of no op is shared
    (dict(skip={"tests.test_kernels_foreground_cuda::test_forward_parity_fp32[2-1-8-7-9-bins0]",
                "tests.test_kernels_cuda::test_dynamic_conv_forward_backward[float32-shape0-vhs5]",
                "tests.test_dcm_cuda::test_support_activation_cuda[float32-auto]"}), None),
])
def test_nothing_recorded_when_a_shared_test_fails_or_own_tests_skip(kw, why):
    keys = V.current_keys()
    records, status = V.build(cases(**kw), HERE, keys, [], "failed", V.candidate(HERE, keys))
    assert records == [] and not any(s["recorded"] for s in status.values())
    if why:
        assert {s["why"] for s in status.values()} == {why}
    else:
        assert status["foreground"]["why"] == "1 of its 2 CUDA tests did not pass"


def test_a_test_running_two_ops_kernels_keeps_both_unrecorded():
    """The DynamicConvModule test runs the foreground pooling and the dynamic convolution: when it fails,
    neither op is recorded (on an H100 it failed through the foreground selection alone, while every
    test of the dynamic convolution's own kernels passed)."""
    keys = V.current_keys()
    fail = {"tests.test_dcm_cuda::test_dynamic_conv_module_cuda[float32-auto]"}
    records, status = V.build(cases(fail=fail), HERE, keys, [], "failed", V.candidate(HERE, keys))
    assert {op for op, st in status.items() if st["recorded"]} == {"support_activation"}
    assert status["dynamic_conv"]["why"] == "1 of its 2 CUDA tests did not pass"
    assert status["foreground"]["why"] == "1 of its 2 CUDA tests did not pass"
    assert [r["op"] for r in records] == ["support_activation"]


@pytest.mark.parametrize("args, why", [
    (dict(here=None), "no CUDA device: nothing verified"),
    (dict(tests_status="timeout"), "the tests step ran out of time"),
    (dict(cases=None), "the CUDA tests did not run (or left no JUnit XML)"),
    (dict(candidate_records=[]), "the tests did not run this source's kernels (no candidate record of its key)"),
    (dict(kernels_ok=False), "Triton or dcm.kernels unavailable"),
])
def test_nothing_recorded_without_a_complete_run_of_this_source(args, why):
    keys = V.current_keys()
    kw = dict(cases=cases(), here=HERE, keys=keys, shipped=[], tests_status="ok", candidate_records=V.candidate(HERE, keys))
    kw.update(args)
    records, status = V.build(**kw)
    assert records == [] and {s["why"] for s in status.values()} == {why}


def test_record_command_from_junit_xml(tmp_path, monkeypatch, capsys):
    """``python -m dcm.verification candidate`` / ``record`` as the GPU session runs them (device faked)."""
    monkeypatch.setattr(V, "_here", lambda: dict(HERE))
    monkeypatch.setattr(V, "_triton_ready", lambda: True)
    xml = ['<?xml version="1.0"?><testsuites><testsuite name="pytest">']
    for name, outcome in cases():
        cls, test = name.split("::")
        inner = '<skipped message="x"/>' if outcome == "skipped" else ""
        xml.append(f'<testcase classname="{cls}" name="{test}">{inner}</testcase>')
    (tmp_path / "t.xml").write_text("".join(xml) + "</testsuite></testsuites>")
    assert V.main(["candidate", str(tmp_path / "cand.json")]) == 0
    assert V.main(["record", "--junit", str(tmp_path / "t.xml"), "--candidate", str(tmp_path / "cand.json"),
                   "--out", str(tmp_path / "verified.json"), "--summary", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "to commit: cp" in out and out.count("RECORDED") == 3
    data = json.loads((tmp_path / "verified.json").read_text())
    assert data["key_scheme"] == V.KEY_SCHEME and data["about"] == V.ABOUT
    keys = V.current_keys()
    assert {(r["op"], r["key"], r["cc_major"]) for r in data["records"]} == {(op, keys[op], 9) for op in OPS}
    # a file in this form is what the shipped record holds: load it as one and every op is verified
    monkeypatch.setattr(V, "RECORD_FILE", tmp_path / "verified.json")
    V._reset()
    assert {r["path"] for r in dcm.backend_report("cuda", capability=(9, 0)).values()} == {"triton"}
    assert json.loads((tmp_path / "s.json").read_text())["ops"]["foreground"]["recorded"] is True
