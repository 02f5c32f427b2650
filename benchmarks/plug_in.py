"""The paper's Table 6: plug the Dynamic Convolution Module into another few-shot network.

Trains the host network (PFENet or CANet) and the same host with DCM under identical data, seeds,
schedule and evaluation episodes, and prints per-fold class mIoU, the mean, FB-IoU and the difference
beside the paper's numbers (1-shot, ResNet-50, PASCAL-5i)::

    python benchmarks/plug_in.py --host pfenet                  # small synthetic run, a few CPU minutes
    python benchmarks/plug_in.py --host canet
    python benchmarks/plug_in.py --host pfenet --dataset pascal --data-root /data/VOC2012 \
        --backbone resnet50_v2 --backbone-weights initmodel/resnet50_v2.pth --folds 0 1 2 3

Without ``--dataset`` the run uses the synthetic few-shot set with the EfficientNet-Lite0 backbone
(configs/plug_in_<host>_synthetic.yaml); with ``--dataset pascal|coco`` the host's own recipe
(configs/<host>_<dataset>.yaml: PFENet's or CANet's published training settings). Results go to
``<out>/table6_<host>.json`` and ``.md`` and each training run keeps its own folder (checkpoints,
config.yaml, log.jsonl), so an interrupted comparison continues with ``--resume``.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.config import CONFIG_DIR, ConfigError, add_config_args, load_config, overrides_from_args  # noqa: E402

#: DPCN Table 6 (1-shot, ResNet-50, PASCAL-5i): per-fold mIoU, mean, FB-IoU (SPEC §4.8).
#: The paper prints CANet fold 0 as 53.5, but its mean 55.4 (and the CANet paper) imply 52.5.
PAPER_TABLE6 = {
    "canet": {"folds": [53.5, 65.9, 51.3, 51.9], "mean": 55.4, "fbiou": 66.2},
    "canet+dcm": {"folds": [64.7, 66.8, 51.8, 51.9], "mean": 58.8, "fbiou": 69.3},
    "pfenet": {"folds": [61.7, 69.5, 55.4, 56.3], "mean": 60.8, "fbiou": 73.3},
    "pfenet+dcm": {"folds": [62.2, 69.6, 59.2, 58.0], "mean": 62.3, "fbiou": 73.5},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--host", required=True, choices=["pfenet", "canet"], help="the host network")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="folds to run (default: 0 on the synthetic set, 0 1 2 3 on PASCAL/COCO)")
    add_config_args(p, include=["backbone", "backbone_weights", "shot", "dataset", "data_root", "epochs",
                                "batch_size", "lr", "lr_multiplier", "seed", "workers", "train_episodes",
                                "val_episodes", "episodes", "device", "out"])
    p.add_argument("--resume", action="store_true", help="continue interrupted runs; finished runs are reused")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def recipe_for(host: str, dataset: str, config) -> str:
    if config:
        return config
    name = f"plug_in_{host}_synthetic" if dataset in (None, "synthetic") else f"{host}_{dataset}"
    if not (CONFIG_DIR / f"{name}.yaml").is_file():
        raise ConfigError(f"no recipe configs/{name}.yaml for host '{host}' on '{dataset}'; pass --config FILE")
    return name


def _fmt(v) -> str:
    return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"


def table(host: str, folds, res: dict, protocol_text: str) -> str:
    """Fixed-width Table 6 with the paper's rows."""
    names = [host, host + "+dcm"]
    head = f"{'':22}" + "".join(f"{'fold' + str(f):>8}" for f in folds) + f"{'mean':>8}{'FB-IoU':>8}"
    lines = [f"Table 6 — {host} vs {host}+DCM | {protocol_text}", head]
    for n in names:
        r = res[n]
        lines.append(f"{'ours ' + n:22}" + "".join(f"  {_fmt(r['folds'][f])}" for f in folds)
                     + f"  {_fmt(r['mean'])}  {_fmt(r['fbiou'])}")
    d = {f: res[names[1]]["folds"][f] - res[names[0]]["folds"][f] for f in folds}
    lines.append(f"{'ours difference':22}" + "".join(f"  {d[f]:+6.2f}" for f in folds)
                 + f"  {res[names[1]]['mean'] - res[names[0]]['mean']:+6.2f}  {res[names[1]]['fbiou'] - res[names[0]]['fbiou']:+6.2f}")
    for n in names:
        p = PAPER_TABLE6[n]
        lines.append(f"{'paper ' + n:22}" + "".join(f"  {_fmt(p['folds'][f])}" for f in folds)
                     + f"  {_fmt(p['mean'])}  {_fmt(p['fbiou'])}")
    p0, p1 = PAPER_TABLE6[names[0]], PAPER_TABLE6[names[1]]
    lines.append(f"{'paper difference':22}" + "".join(f"  {p1['folds'][f] - p0['folds'][f]:+6.2f}" for f in folds)
                 + f"  {p1['mean'] - p0['mean']:+6.2f}  {p1['fbiou'] - p0['fbiou']:+6.2f}")
    lines.append("(paper: 1-shot, ResNet-50, PASCAL-5i, 4 folds; its 'mean' is over all four folds)")
    return "\n".join(lines)


def markdown(host: str, folds, res: dict, protocol_text: str, minutes: float, device: str) -> str:
    names = [host, host + "+dcm"]
    out = [f"### Table 6: {host} with and without DCM", "",
           f"Protocol: {protocol_text}. Both networks trained with the same recipe, seeds and episodes; "
           f"{minutes:.1f} min on {device}.", "",
           "| | " + " | ".join(f"fold {f}" for f in folds) + " | mean | FB-IoU |",
           "|---|" + "---|" * (len(folds) + 2)]
    for tag, src in (("ours", res), ("paper", PAPER_TABLE6)):
        for n in names:
            r = src[n]
            out.append(f"| {tag} {n} | " + " | ".join(_fmt(r["folds"][f]).strip() for f in folds)
                       + f" | {_fmt(r['mean']).strip()} | {_fmt(r['fbiou']).strip()} |")
        a, b = src[names[0]], src[names[1]]
        out.append(f"| {tag} difference | " + " | ".join(f"{b['folds'][f] - a['folds'][f]:+.2f}" for f in folds)
                   + f" | {b['mean'] - a['mean']:+.2f} | {b['fbiou'] - a['fbiou']:+.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks.engine import TrainingInterrupted, default_run_name, resolve_device, train
    t0 = time.perf_counter()
    try:
        recipe = recipe_for(args.host, args.dataset, args.config)
        base = overrides_from_args(args)
        if args.no_progress:
            base.append("run.progress=false")
        cfg0 = load_config(recipe, base)
        folds = args.folds if args.folds is not None else ([0] if cfg0["data"]["dataset"] == "synthetic" else [0, 1, 2, 3])
        out_dir = Path(cfg0["run"]["out_dir"]) / f"plug_in_{args.host}"
        names = [args.host, args.host + "+dcm"]
        res = {n: {"folds": {}, "fbiou_folds": {}, "runs": {}} for n in names}
        protocol_text = None
        for fold in folds:
            for n in names:
                cfg = load_config(recipe, base + [f"model.name={n}", f"data.fold={fold}",
                                                  f"run.out_dir={out_dir}", "eval.reference=none"])
                run_dir = out_dir / default_run_name(cfg)
                done = run_dir / "results.json"
                if args.resume and done.is_file():
                    results = json.loads(done.read_text())
                    print(f"[{n} fold {fold}] reusing {done}")
                else:
                    print(f"\n=== {n}, fold {fold} ({run_dir}) ===")
                    resume = True if (args.resume and (run_dir / "last.pth").is_file()) else None
                    results = train(cfg, run_dir, resume=resume).get("results")
                    if results is None:  # a non-zero rank under torchrun: rank 0 evaluates and reports
                        continue
                row = results["rows"][-1]
                res[n]["folds"][fold] = row["miou"]
                res[n]["fbiou_folds"][fold] = row["fbiou"]
                res[n]["runs"][fold] = str(run_dir)
                protocol_text = results["protocol_text"]
    except TrainingInterrupted as e:
        print(f"\ninterrupted: {e}; continue with --resume", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(not res[n]["folds"] for n in names):
        return 0  # non-zero rank
    for n in names:
        f = res[n]["folds"]
        res[n]["mean"] = sum(f.values()) / len(f)
        res[n]["fbiou"] = sum(res[n]["fbiou_folds"].values()) / len(f)
    minutes = (time.perf_counter() - t0) / 60
    device = str(resolve_device(cfg0["run"]["device"]))
    folds_txt = f"fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))}"
    ptxt = protocol_text.replace(f"fold {folds[-1]}", folds_txt) if protocol_text else folds_txt
    print()
    print(table(args.host, folds, res, ptxt))
    print(f"({minutes:.1f} min on {device})")
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"table6_{args.host}.json"
    md = out_dir / f"table6_{args.host}.md"
    js.write_text(json.dumps({"host": args.host, "folds": folds, "protocol": ptxt, "recipe": recipe,
                              "overrides": base, "minutes": minutes, "device": device, "results": res, "paper": PAPER_TABLE6}, indent=1))
    md.write_text(markdown(args.host, folds, res, ptxt, minutes, device))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
