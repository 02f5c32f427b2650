"""Evaluate a checkpoint under a named, explicit protocol and print the table.

::

    python benchmarks/evaluate.py --checkpoint runs/<run>/best.pth                  # the run's own test protocol
    python benchmarks/evaluate.py --checkpoint best.pth --data-root /data/VOC2012 --fold 0 --preset dpcn
    python benchmarks/evaluate.py --checkpoint best.pth --shot 5 --fusion native vote average or   # Table 7
    python benchmarks/evaluate.py --checkpoint best.pth --seeds 510 365 382 322 988 --episodes 1000  # BAM
    python benchmarks/evaluate.py --checkpoint best.pth --support-annotation box   # Table A2: box supports

The protocol starts from the checkpoint's saved config (dataset, fold, test size, ``eval.*``); a
``--preset`` (pfenet, bam, hsnet, dpcn: docs/PROTOCOLS.md#seeds-and-episodes) or the explicit flags
replace parts of it. K-shot fusion (paper Table 7): ``native`` is the model's own K-shot (DPCN:
foreground-vector concatenation); ``vote``, ``average`` (mask average) and ``or`` run the model 1-shot
once per support and fuse the K masks. Every row is scored on the same episodes. ``--json`` / ``--md`` also write the results.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.engine.config import ConfigError, add_config_args, load_config, overrides_from_args  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", "-m", default=None,
                   help="a training checkpoint (best.pth); without it --model builds an untrained network "
                        "(useful for the training-free prior reference)")
    add_config_args(p, include=["model", "backbone", "backbone_weights", "dataset", "data_root", "fold", "shot",
                                "episodes", "workers", "device"])
    p.add_argument("--preset", choices=["pfenet", "bam", "hsnet", "dpcn"], default=None,
                   help="a published protocol (episodes, seeds, sizes, resolution; docs/PROTOCOLS.md#seeds-and-episodes)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="episode seeds (results averaged)")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="test input sizes (several = multi-scale)")
    p.add_argument("--resolution", choices=["original", "original_crop", "input"], default=None,
                   help="where to score (docs/PROTOCOLS.md#test-resizing)")
    p.add_argument("--resize", choices=["letterbox", "shrink", "squash", "none"], default=None,
                   help="test transform")
    p.add_argument("--support-annotation", choices=["mask", "box"], default=None,
                   help="support annotation: mask (default) or box = every support mask replaced by the boxes "
                        "of its objects (paper Table A2; query ground truth unchanged; rule in docs/DATA.md)")
    p.add_argument("--fusion", nargs="+", dest="fusions", default=None, choices=["native", "vote", "average", "or"],
                   help="K-shot strategies to compare (one row each)")
    p.add_argument("--reference", nargs="*", default=None, choices=["prior", "untrained"],
                   help="also evaluate no-training references")
    p.add_argument("--batch-size", type=int, default=None,
                   help="episodes per forward pass (results agree across batch sizes up to float rounding, "
                        "about 1e-5 mIoU)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--md", default=None, help="write the table to this Markdown file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size: expected >= 1, got {args.batch_size}")
    return args


def build(args):
    """(model or None, cfg, protocol, fusions, references)."""
    from benchmarks.engine import eval_protocol, load_checkpoint_model
    overrides = overrides_from_args(args)
    for flag, key in (("resize", "data.test_resize"), ("resolution", "eval.resolution"), ("batch_size", "eval.batch_size")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.seeds:
        overrides.append(f"eval.seeds=[{','.join(map(str, args.seeds))}]")
    if args.scales:
        overrides.append(f"eval.scales=[{','.join(map(str, args.scales))}]")
    if args.preset:
        overrides.append(f"eval.preset={args.preset}")
    if args.checkpoint:
        from benchmarks.engine import resolve_device
        model, cfg = load_checkpoint_model(args.checkpoint, overrides=overrides)
        model.to(resolve_device(cfg["run"]["device"]))
    else:
        if not args.model:
            raise ConfigError("give --checkpoint (a trained model) or --model NAME (an untrained network, for the "
                              "no-training references)")
        cfg = load_config(None, overrides)
        model = None
    protocol = eval_protocol(cfg)
    if args.support_annotation is not None:
        import dataclasses
        protocol = dataclasses.replace(protocol, support_annotation=args.support_annotation)
    fusions = args.fusions or [cfg["eval"]["fusion"]]
    refs = args.reference if args.reference is not None else ([] if args.checkpoint else ["prior", "untrained"])
    return model, cfg, protocol, fusions, refs


def markdown(rows, protocol, title: str) -> str:
    names = rows[0][1].class_names if rows else {}
    cls = list(rows[0][1].class_iou) if rows else []
    out = [f"### {title}", "", f"Protocol: {protocol.describe()}", "",
           "| | mIoU | FB-IoU | " + " | ".join(str(names.get(c, c)) for c in cls) + " |",
           "|---|---|---|" + "---|" * len(cls)]
    for label, r in rows:
        out.append(f"| {label} | {r.miou:.2f} | {r.fbiou:.2f} | " + " | ".join(f"{r.class_iou[c]:.2f}" for c in cls) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    from benchmarks.engine.config import show_deprecations
    show_deprecations()
    args = parse_args(argv)
    try:
        from benchmarks.engine.output_paths import check_output
        for flag in ("json", "md"):  # before the work: never a traceback after the evaluation
            if getattr(args, flag):
                check_output(getattr(args, flag), "file", f"--{flag}")
        model, cfg, protocol, fusions, refs = build(args)
        from benchmarks.engine import (build_model_from_config, eval_factory, evaluate_fusions, evaluate_reference,
                                       format_table, has_prior, resolve_device)
        device = resolve_device(cfg["run"]["device"])
        factory = eval_factory(cfg)
        kw = dict(device=device, amp=cfg["train"]["amp"], batch_size=int(cfg["eval"]["batch_size"]),
                  num_workers=int(cfg["data"]["num_workers"]), progress=not args.no_progress and sys.stderr.isatty())
        rows = []
        t0 = time.perf_counter()
        print(f"protocol: {protocol.describe()}")
        if refs:
            import torch
            torch.manual_seed(int(cfg["train"]["seed"]))
            untrained = build_model_from_config(cfg).to(device)
            untrained._registry_name = cfg["model"]["name"]
            for k in refs:
                if k == "prior" and not has_prior(untrained):
                    print(f"note: {cfg['model']['name']} has no training-free prior; 'prior' reference skipped")
                    continue
                label, r = evaluate_reference(untrained, k, protocol, factory, **kw)
                rows.append((label, r))
                print(f"{label}: mIoU {r.miou:.2f}  FB-IoU {r.fbiou:.2f}")
        if model is not None:
            if protocol.shot == 1:
                for f in fusions:
                    if f != "native":
                        print(f"note: fusion '{f}' equals 'native' for 1-shot episodes; skipped")
                fusions = ["native"]
            # every strategy on the same episodes in one pass: vote / average / or share the 1-shot forwards
            results = evaluate_fusions(model, protocol, factory, fusions, **kw)
            for f in fusions:
                label = f"{cfg['model']['name']}" + (f" [{f}]" if protocol.shot > 1 else "")
                rows.append((label, results[f]))
                print(f"{label}: mIoU {results[f].miou:.2f}  FB-IoU {results[f].fbiou:.2f}")
    except (ConfigError, FileNotFoundError, ValueError, TypeError, ImportError, OSError) as e:
        from benchmarks.engine import short_error
        print(f"error: {short_error(e)}", file=sys.stderr)
        return 2
    if not rows:
        print("error: nothing was evaluated", file=sys.stderr)
        return 2
    secs = time.perf_counter() - t0
    print()
    print(f"{protocol.describe()}")
    print(format_table(rows))
    print(f"({secs:.0f}s on {device})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from benchmarks.engine import finite_json  # NaN (a class no episode sampled) -> null: valid JSON
        Path(args.json).write_text(json.dumps(finite_json({"protocol": protocol.as_dict(),
                                                           "protocol_text": protocol.describe(),
                                                           "checkpoint": args.checkpoint, "seconds": secs,
                                                           "rows": [{"label": l, **r.as_dict()} for l, r in rows]}),
                                              indent=1))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(markdown(rows, protocol, f"Evaluation of {args.checkpoint or cfg['model']['name']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
