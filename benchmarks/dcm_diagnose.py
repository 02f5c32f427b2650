"""Why a host + DCM wins or loses against its host: per-class, per-episode and over-training measurements.

Given a finished run of a host (``--host-run``) and of the host with the DCM (``--dcm-run``) trained on
the same fold and evaluated on the same episodes (``benchmarks/plug_in.py`` run folders, each with its
``results_<split>.json``), writes ``<out>.json`` and ``<out>.md`` with:

* **per class** (the fold's novel classes): IoU of each run, the difference, the test images and episodes;
* **per episode** (the DCM run, the same episodes): the *fit* of the support to the query, i.e. the mean of
  :func:`models.common.kernel_fit` (clamped cosine of the DCM's query input with the support's
  foreground prototype) over the query's foreground, and the DCM's *contribution*, i.e. the sum over the
  query foreground of ``|fused − q|`` over that of ``|q|`` (the residual fusion's gate times its
  projected maps, relative to the host's feature); their Spearman correlations with the episode's change in foreground
  IoU (DCM run − host run), overall and per class;
* **base classes** (``--base-folds``): both runs evaluated on episodes of other folds' classes -- classes
  they were trained on -- on the same split's images, to compare the DCM's gain on training classes and
  on novel ones;
* **the gate over training**: the mean |γ| of the residual fusion per epoch (``dcm_gamma`` in
  ``log.jsonl``) and the epoch chosen on validation.

Example::

    python benchmarks/dcm_diagnose.py --host-run runs/plug_in_canet/canet_f2_seed0 \\
        --dcm-run runs/plug_in_canet/canet_dcm_f2_seed0 --split val --base-folds 1 3 --out docs/results/diag_canet_f2_s0
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _records(run: Path, split: str) -> dict:
    f = run / f"results_{split}.json"
    if not f.is_file():
        raise FileNotFoundError(f"'{f}' not found: evaluate the run on the {split} split first "
                                f"(benchmarks/plug_in.py --split {split} --resume)")
    row = json.loads(f.read_text())["rows"][-1]
    ps = row["per_seed"]
    if len(ps) != 1 or "episode_records" not in ps[0]:
        raise ValueError(f"'{f}': needs one episode seed with stored per-episode results")
    return {"row": row, "rec": ps[0]["episode_records"]}


def _gates(run: Path) -> List[dict]:
    f = run / "log.jsonl"
    out, chosen = [], None
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "epoch":
                out.append({"epoch": e.get("epoch"), "dcm_gamma": e.get("dcm_gamma"), "val_miou": e.get("val_miou"),
                            "best": False})
                if e.get("best"):      # validation improved; best.pth is the last such epoch's
                    chosen = len(out) - 1
    if chosen is not None:
        out[chosen]["best"] = True
    return out


def _spearman(x, y) -> Optional[float]:
    from scipy.stats import spearmanr
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return None
    return float(spearmanr(x[ok], y[ok]).statistic)


def episode_measures(run: Path, split: str, device: str = "cpu", batch_size: int = 16) -> dict:
    """Per episode of ``run``'s final evaluation: fit and contribution (module docstring), in episode order,
    with the episode's class and query image (to be matched against the stored records)."""
    from benchmarks.engine import eval_factory, eval_protocol, load_checkpoint_model
    from benchmarks.datasets import collate_episodes
    from models.common import kernel_fit
    model, cfg = load_checkpoint_model(run / "best.pth", device=device, overrides=[f"eval.split={split}"])
    if not hasattr(model, "dcm_fuse") or not hasattr(model, "dcm"):
        raise ValueError(f"'{run}': its network has no residual DCM fusion (dcm, dcm_fuse) to measure")
    protocol = eval_protocol(cfg)
    if len(protocol.seeds) != 1 or len(protocol.scales) != 1:
        raise ValueError("episode_measures: needs one episode seed and one scale")
    ds = eval_factory(cfg)(protocol, protocol.seeds[0], protocol.scales[0])
    grab: Dict[str, object] = {}
    h1 = model.dcm.register_forward_hook(lambda m, args, out: grab.__setitem__("dcm_in", args))
    h2 = model.dcm_fuse.register_forward_hook(lambda m, args, out: grab.__setitem__("fuse", (args[0], out)))
    cls, query, fit, contrib = [], [], [], []
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_episodes)
    try:
        with torch.no_grad():
            for b in loader:
                q_img, s_img, s_m = (b[k].to(device) for k in ("query_img", "support_imgs", "support_masks"))
                model(q_img, s_img, s_m)
                dq, ds_, dm = grab["dcm_in"][:3]
                q, fused = grab["fuse"]
                fmap = kernel_fit(dq, ds_, dm)[:, 0]  # [B, h, w]
                num, den = (fused - q).norm(dim=1), q.norm(dim=1)  # [B, h, w]
                gt = (b["query_mask"] == 1).float()[:, None].to(device)
                gt = F.interpolate(gt, size=fmap.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
                w = gt / gt.sum((1, 2), keepdim=True).clamp_min(1e-8)
                fit += (fmap * w).sum((1, 2)).tolist()
                contrib += ((num * w).sum((1, 2)) / (den * w).sum((1, 2)).clamp_min(1e-8)).tolist()
                cls += [ds.class_ids[int(i)] for i in b["class_index"]]
                query += [str(n) for n in b["query_name"]]
    finally:
        h1.remove()
        h2.remove()
    return {"class": cls, "query": query, "fit": fit, "contribution": contrib}


def _class_iou(rec: dict) -> Dict[int, float]:
    I: Dict[int, float] = {}
    U: Dict[int, float] = {}
    for c, i, u in zip(rec["class"], rec["inter"], rec["union"]):
        I[int(c)] = I.get(int(c), 0.0) + i
        U[int(c)] = U.get(int(c), 0.0) + u
    return {c: 100.0 * I[c] / (U[c] + 1e-10) for c in I}


def base_class_gap(host: Path, dcm: Path, folds: List[int], episodes: int, device: str = "cpu") -> dict:
    """Both runs on episodes of other folds' classes (base classes for them), same split images."""
    from benchmarks.engine import eval_factory, eval_protocol, evaluate_model, load_checkpoint_model
    out = {}
    for g in folds:
        per = {}
        for name, run in (("host", host), ("dcm", dcm)):
            model, cfg = load_checkpoint_model(run / "best.pth", device=device,
                                               overrides=[f"data.fold={g}", f"eval.episodes={episodes}"])
            r = evaluate_model(model, eval_protocol(cfg), eval_factory(cfg), device=device, batch_size=16)
            per[name] = {"miou": r.miou, "class_iou": {int(c): v for c, v in r.class_iou.items()}}
        out[g] = {**per, "difference": per["dcm"]["miou"] - per["host"]["miou"]}
    return out


def diagnose(host: Path, dcm: Path, split: str, base_folds: List[int], base_episodes: int,
             device: str = "cpu") -> dict:
    a, b = _records(host, split), _records(dcm, split)
    ra, rb = a["rec"], b["rec"]
    if (ra["class"], ra["query"]) != (rb["class"], rb["query"]):
        raise ValueError(f"'{host}' and '{dcm}' were evaluated on different episodes")
    ep = episode_measures(dcm, split, device)
    if (ep["class"], ep["query"]) != ([int(c) for c in rb["class"]], list(rb["query"])):
        raise ValueError(f"'{dcm}': re-evaluation gave other episodes than its results_{split}.json")
    iou = lambda r: np.asarray(r["inter"], float) / np.maximum(np.asarray(r["union"], float), 1e-10)  # noqa: E731
    d_iou = 100.0 * (iou(rb) - iou(ra))
    names = {int(k): v for k, v in (b["row"].get("class_names") or {}).items()}
    ca, cb = _class_iou(ra), _class_iou(rb)
    classes = {}
    cls = np.asarray(ep["class"])
    for c in sorted(ca):
        m = cls == c
        classes[c] = {"name": names.get(c, str(c)), "episodes": int(m.sum()),
                      "images": len({q for q, k in zip(ep["query"], ep["class"]) if k == c}),
                      "host_iou": ca[c], "dcm_iou": cb[c], "difference": cb[c] - ca[c],
                      "fit": float(np.mean(np.asarray(ep["fit"])[m])),
                      "contribution": float(np.mean(np.asarray(ep["contribution"])[m])),
                      "rho_fit": _spearman(np.asarray(ep["fit"])[m], d_iou[m]),
                      "rho_contribution": _spearman(np.asarray(ep["contribution"])[m], d_iou[m])}
    out = {"host_run": str(host), "dcm_run": str(dcm), "split": split,
           "miou": {"host": a["row"]["miou"], "dcm": b["row"]["miou"]},
           "rho_fit": _spearman(ep["fit"], d_iou), "rho_contribution": _spearman(ep["contribution"], d_iou),
           "classes": classes, "gate": _gates(dcm), "episodes": {**ep, "delta_iou": d_iou.tolist()}}
    if base_folds:
        out["base_classes"] = base_class_gap(host, dcm, base_folds, base_episodes, device)
    return out


def _f(v, fmt="+.2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown(d: dict) -> str:
    lines = [f"### {Path(d['dcm_run']).name} vs {Path(d['host_run']).name} ({d['split']})", "",
             f"mIoU host {d['miou']['host']:.2f}, host+DCM {d['miou']['dcm']:.2f}; Spearman ρ of the episode's "
             f"IoU change with the fit {_f(d['rho_fit'])}, with the DCM's contribution {_f(d['rho_contribution'])}.",
             "", "| class | images | episodes | host | +DCM | difference | mean fit | mean contribution | ρ fit | ρ contribution |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in d["classes"].items():
        few = " (<10 images)" if r["images"] < 10 else ""
        lines.append(f"| {r['name']}{few} | {r['images']} | {r['episodes']} | {r['host_iou']:.2f} | {r['dcm_iou']:.2f} | "
                     f"{r['difference']:+.2f} | {r['fit']:.3f} | {r['contribution']:.3f} | {_f(r['rho_fit'])} | "
                     f"{_f(r['rho_contribution'])} |")
    if d.get("base_classes"):
        lines += ["", "Base classes (other folds' classes, trained on), same split's images:", ""]
        for g, r in d["base_classes"].items():
            lines.append(f"- fold {g} classes: host {r['host']['miou']:.2f}, +DCM {r['dcm']['miou']:.2f}, "
                         f"difference {r['difference']:+.2f}")
    if d["gate"]:
        lines += ["", "Gate over training (mean |γ| of the residual fusion; * = chosen epoch): "
                  + ", ".join(f"epoch {g['epoch']} {_f(next(iter((g['dcm_gamma'] or {None: None}).values())), '.4f')}"
                              f"{'*' if g['best'] else ''}" for g in d["gate"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host-run", required=True, type=Path)
    p.add_argument("--dcm-run", required=True, type=Path)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--base-folds", type=int, nargs="*", default=[])
    p.add_argument("--base-episodes", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.parent.exists() and not out.parent.is_dir():
        print(f"error: --out: '{out.parent}' is not a folder", file=sys.stderr)
        return 2
    for r in (args.host_run, args.dcm_run):
        if not (r / "best.pth").is_file():
            print(f"error: '{r}' holds no best.pth (a finished run folder of benchmarks/plug_in.py)", file=sys.stderr)
            return 2
    try:
        d = diagnose(args.host_run, args.dcm_run, args.split, args.base_folds, args.base_episodes, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(d, indent=1, default=str))
    md = markdown(d)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
