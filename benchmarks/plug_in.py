"""The paper's Table 6: plug the Dynamic Convolution Module into another few-shot network, with seeds.

Trains the host network (PFENet or CANet) and the host with DCM -- or any list of arms -- under the
same recipe, with ``--seeds N`` training seeds per arm and fold, evaluates every run on the same test
episodes and prints, per fold, every seed's mIoU / FB-IoU, the mean ± std over seeds, the paired
difference of each arm from the first (seed by seed) with two 95 % intervals -- over training seeds
(Student-t, Welch df across folds) and over seeds × test images (a paired two-level bootstrap of the
runs' per-episode results) -- and the per-class IoU of every arm with the test images and episodes of
each class (:mod:`benchmarks.scoring.stats`). ``--preregistered FILE`` names the committed file that fixed the
comparison before its runs (the table is then labelled confirmatory, otherwise exploratory)::

    python benchmarks/plug_in.py --host pfenet                  # synthetic set, a few CPU minutes per run
    python benchmarks/plug_in.py --host pfenet --config plug_in_pfenet_voc_lite0 --data-root VOC2012 --folds 1 2 3
    python benchmarks/plug_in.py --host canet --arms canet "canet+dcm[paper]" "canet+dcm[kernel_norm=l1]"
    python benchmarks/plug_in.py --host dpcn --config dpcn_voc_lite0 --data-root VOC2012   # Baseline, DPCN w/o DCM, DPCN

An arm is a registry model name with, in brackets, the DCM it trains with (models/arms.py): a preset
(``paper``: the DCM as the paper describes it, on the reduced feature, PFENet's fused feature *replaces* the
query feature, CANet concatenates the maps to its fusion layer's input; ``default``; ``dpcn[nodcm]``: DPCN
without DCM) and/or ``field=value`` items of ``models.dcm_spec.DCMSpec`` (``input=raw``, ``fusion=residual``,
``kernel_norm=l1``, ``support=clean``, ``kernels=identity``, ``placement=pyramid``, ``gate=fit``,
``map_dropout=0.5``, ``lr_scale=0.1``, ``weight_decay=0``, ...) or of the model's flags
(``baseline[support_branch_weight=1]``), joined by ``,``: ``"canet+dcm[gate=fit,map_dropout=0.5]"``. The
earlier ``+``-joined tokens (``canet+dcm[residual+rawin]``, ``baseline[sb1]``) still work for one release
(a ``DeprecationWarning``) and keep their run folders. ``pfenet+dcm`` alone is the model's default DCM
(``models.dcm_spec.preset("pfenet")``: residual fusion; CANet+DCM: on the raw input); with ``--resume`` a
run folder trained with another network than the arm asks for (e.g. by a version with another default)
is an error, not reused.

``--split val|test`` picks the split of the final evaluation (recipes that split their images have
both). Model choices are made on ``val``; ``--split test --resume`` afterwards evaluates the finished
runs' best checkpoints on the test split without training again. Each run keeps its folder
(``<out>/plug_in_<host>/<arm>_f<fold>_seed<seed>``: checkpoints, config.yaml, log.jsonl,
``results_<split>.json``), so an interrupted comparison continues with ``--resume``. The table goes
to ``<out>/plug_in_<host>/table6_<host>_<split>_<key>.json`` and ``.md``, ``<key>`` a short hash of the
ordered arm list and the tabulated folds, so every comparison has its own file (the default arm list on
the recipe's default folds: ``table6_<host>_<split>.json``); the same comparison rewrites its file (with
more runs), a file that holds another comparison is never replaced.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import yaml  # noqa: E402

from benchmarks.engine.config import ConfigError, add_config_args, choose_recipe, load_config, overrides_from_args  # noqa: E402
from benchmarks.scoring.comparison import (BOOTSTRAP, INTERVAL_TEXT, PAPER_TABLE6, collect_episodes,  # noqa: E402
                                           label_text, markdown, preregistered, summarise, table)
from models.arms import DEFAULT_ARMS, parse_arm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--host", required=True, choices=sorted(DEFAULT_ARMS), help="the host network")
    p.add_argument("--arms", nargs="+", default=None,
                   help="arms to compare, the first is the reference (default: host, host+dcm; dpcn: baseline, "
                        "dpcn[nodcm], dpcn)")
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="folds to run (default: 0 on the synthetic set, 1 2 3 on recipes that split their images, "
                        "else 0 1 2 3)")
    p.add_argument("--seeds", type=int, default=3,
                   help="training seeds per arm and fold: train.seed, train.seed + 1, ... (default 3)")
    p.add_argument("--split", choices=["val", "test"], default=None,
                   help="split of the final evaluation (default: the recipe's eval.split)")
    add_config_args(p, include=["backbone", "backbone_weights", "shot", "dataset", "data_root", "epochs",
                                "batch_size", "lr", "lr_multiplier", "seed", "workers", "train_episodes",
                                "val_episodes", "episodes", "device", "out"])
    p.add_argument("--resume", action="store_true", help="continue interrupted runs; finished runs are reused")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: tabulate the runs that have results for --split, list the others "
                        "as missing")
    p.add_argument("--preregistered", default=None, metavar="FILE",
                   help="the committed file (e.g. docs/preregistered/<name>.md) that fixed this comparison's arms, "
                        "folds, seeds, metric and decision rule before its runs: the table names it and its commit "
                        "and labels the result confirmatory; without it the result is labelled exploratory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: expected >= 1, got {args.seeds}")
    return args


def check_run_dir(cfg: dict, run_dir: Path) -> None:
    """Refuse to reuse ``run_dir`` when the network its ``config.yaml`` was trained with is not the one
    ``cfg`` asks for (e.g. a run of an older version, before a default changed; ``models.migrate.network_of``)."""
    from benchmarks.engine import first_line as _first_line
    from models.migrate import network_of
    f = run_dir / "config.yaml"
    if not f.is_file():
        return
    try:
        saved = network_of((yaml.safe_load(f.read_text()) or {}).get("model") or {})
    except (yaml.YAMLError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"--resume: '{f}' cannot be read as a run config ({_first_line(e) or type(e).__name__}); delete '{run_dir}' "
                         f"to run it again") from None
    want = network_of(cfg["model"])
    if saved != want:
        diff = sorted(k for k in set(saved["flags"]) | set(want["flags"]) if saved["flags"].get(k) != want["flags"].get(k))
        what = ", ".join(f"{k}: run {saved['flags'].get(k)!r}, asked {want['flags'].get(k)!r}" for k in diff) or \
            ", ".join(f"{k}: run {saved.get(k)!r}, asked {want.get(k)!r}" for k in want if k != "flags" and saved.get(k) != want.get(k))
        raise ValueError(f"--resume: '{run_dir}' was trained with another network ({what}); give another --out "
                         f"or delete the folder to run it again")


def run_one(cfg: dict, run_dir: Path, split: str, resume: bool) -> Optional[dict]:
    """Train (or reuse) one run and return its results on ``split`` (``None`` on a non-zero rank)."""
    from benchmarks.engine import evaluate_run, finite_json, json_default, train
    res_file = run_dir / f"results_{split}.json"
    if resume:
        check_run_dir(cfg, run_dir)
    if resume and res_file.is_file():
        print(f"[{run_dir.name}] reusing {res_file}")
        return json.loads(res_file.read_text())
    if resume and (run_dir / "results.json").is_file() and (run_dir / "best.pth").is_file():
        print(f"[{run_dir.name}] finished run: evaluating its best checkpoint on the {split} split")
        results = evaluate_run(cfg, run_dir, split)
    else:
        print(f"\n=== {run_dir.name} ===")
        resume_from = True if (resume and (run_dir / "last.pth").is_file()) else None
        out = train(cfg, run_dir, resume=resume_from)
        results = out.get("results")
        if results is None:  # a non-zero rank under torchrun: rank 0 evaluates and reports
            return None
        results["train_seconds"] = out.get("seconds")
    res_file.write_text(json.dumps(finite_json(results), indent=1, default=json_default))
    return results


def _save_caches(cfg0) -> None:
    if cfg0 is not None and cfg0["train"]["cache_backbone"] and cfg0["train"].get("cache_backbone_dir"):
        from benchmarks.engine.feature_cache import save_shared_caches
        for f in save_shared_caches(cfg0["train"]["cache_backbone_dir"]):
            print(f"feature cache: new features written to {f}")


def main(argv=None) -> int:
    from benchmarks.engine.config import show_deprecations
    show_deprecations()
    args = parse_args(argv)
    cfg0 = None
    from benchmarks.engine import TrainingInterrupted, ValidationFailed, resolve_device
    import torch
    t0 = time.perf_counter()
    try:
        arms = [parse_arm(a, args.host) for a in (args.arms or DEFAULT_ARMS[args.host])]
        if len({a.tag for a in arms}) != len(arms):
            raise ValueError(f"--arms: an arm is listed twice: {[a.spec for a in arms]}")
        recipe = choose_recipe(args.config, args.host, args.dataset)
        preregistration = preregistered(args.preregistered) if args.preregistered else None
        base = overrides_from_args(args)
        if args.no_progress:
            base.append("run.progress=false")
        if args.split:
            base.append(f"eval.split={args.split}")
        cfg0 = load_config(recipe, base)
        split = cfg0["eval"]["split"]
        image_split = bool((cfg0["data"]["args"] or {}).get("image_split"))
        if args.folds is not None:
            folds = args.folds
        elif cfg0["data"]["dataset"] == "synthetic":
            folds = [0]
        else:
            folds = [1, 2, 3] if image_split else [0, 1, 2, 3]
        seed0 = int(cfg0["train"]["seed"])
        seeds = [seed0 + i for i in range(args.seeds)]
        out_dir = Path(cfg0["run"]["out_dir"]) / f"plug_in_{args.host}"
        # every arm's config on every fold and every arm's network are checked before the first run: a bad
        # arm, fold or output folder stops the comparison now, not after the runs before it
        from benchmarks.engine import check_model_config
        from benchmarks.engine.output_paths import check_output
        if not args.report_only:
            check_output(out_dir, "folder", "--out")
        for arm in arms:
            for fold in folds:
                try:
                    cfg_a = load_config(recipe, base + [f"model.name={arm.model}", *arm.overrides, f"data.fold={fold}",
                                                        f"train.seed={seeds[0]}", f"run.out_dir={out_dir}",
                                                        "eval.reference=none"])
                except ConfigError as e:
                    where = "--folds" if str(e).startswith("data.fold") else f"--arms: arm '{arm.spec}'"
                    raise ConfigError(f"{where}: {e}") from None
            try:
                check_model_config(cfg_a)
            except (ValueError, TypeError, ImportError) as e:
                from benchmarks.engine import short_error
                raise ValueError(f"--arms: arm '{arm.spec}' cannot be built: {short_error(e)}") from None
        res: Dict[str, dict] = {a.spec: {"miou": {}, "fbiou": {}, "runs": {}, "train_seconds": {}, "class_iou": {},
                                         "episode_iu": {}} for a in arms}
        episodes: Dict[int, Optional[dict]] = {}
        class_info: Dict[int, dict] = {}
        protocol_text = None
        missing: List[str] = []
        for fold in folds:
            for seed in seeds:
                for arm in arms:
                    cfg = load_config(recipe, base + [f"model.name={arm.model}", *arm.overrides, f"data.fold={fold}",
                                                      f"train.seed={seed}", f"run.out_dir={out_dir}",
                                                      "eval.reference=none"])
                    run_dir = out_dir / f"{arm.tag}_f{fold}_seed{seed}"
                    if args.report_only:
                        check_run_dir(cfg, run_dir)
                        f_res = run_dir / f"results_{split}.json"
                        if not f_res.is_file():
                            missing.append(run_dir.name)
                            continue
                        results = json.loads(f_res.read_text())
                    else:
                        results = run_one(cfg, run_dir, split, args.resume)
                    if results is None:
                        continue
                    row = results["rows"][-1]
                    r = res[arm.spec]
                    r["miou"].setdefault(fold, {})[seed] = row["miou"]
                    r["fbiou"].setdefault(fold, {})[seed] = row["fbiou"]
                    r["runs"].setdefault(fold, {})[seed] = str(run_dir)
                    r["train_seconds"].setdefault(fold, {})[seed] = results.get("train_seconds")
                    r["class_iou"].setdefault(fold, {})[seed] = {int(c): v for c, v in row["class_iou"].items()}
                    collect_episodes(row, fold, seed, r, episodes, class_info, run_dir)
                    protocol_text = results["protocol_text"]
    except TrainingInterrupted as e:
        _save_caches(cfg0)
        print(f"\ninterrupted: {e}", file=sys.stderr)
        return 130
    except ValidationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ValueError, TypeError, ImportError) as e:
        from benchmarks.engine import short_error
        print(f"error: {short_error(e)}", file=sys.stderr)
        return 2
    _save_caches(cfg0)
    requested_folds = list(folds)  # a --report-only table may keep fewer (its file name says which)
    if args.report_only:
        if missing:
            print(f"missing (no results_{split}.json): {', '.join(missing)}")
        # a fold needs every arm for the paired differences: keep the folds all arms have
        have = [f for f in folds if all(f in res[a.spec]["miou"] for a in arms)]
        if not have:
            print("error: no fold has results for every arm", file=sys.stderr)
            return 2
        folds = have
        for a in arms:
            for k in ("miou", "fbiou", "runs", "train_seconds", "class_iou", "episode_iu"):
                res[a.spec][k] = {f: v for f, v in res[a.spec][k].items() if f in folds}
    if any(not res[a.spec]["miou"] for a in arms):
        return 0  # non-zero rank
    stats = summarise([a.spec for a in arms], folds, res, episodes, class_info)
    label, prereg = ("confirmatory", preregistration) if preregistration else ("exploratory", None)
    minutes = (time.perf_counter() - t0) / 60
    if args.report_only:  # the runs' own wall-clock time, not this report's
        minutes = sum(v or 0.0 for a in arms for per in res[a.spec]["train_seconds"].values() for v in per.values()) / 60
    device = str(resolve_device(cfg0["run"]["device"]))
    if device == "cpu":
        # the runs' thread count (run.threads), which a --report-only process has not applied to itself
        device = f"cpu ({cfg0['run'].get('threads') or torch.get_num_threads()} threads)"
    versions = f"torch {torch.__version__}"
    folds_txt = f"fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))}"
    ptxt = protocol_text.replace(f"fold {folds[-1]}", folds_txt, 1) if protocol_text else folds_txt
    print()
    print(table(args.host, folds, seeds, res, stats, ptxt))
    print(f"({minutes:.1f} min on {device}, {versions})")
    out_dir.mkdir(parents=True, exist_ok=True)
    # one table file per comparison (ordered arm list + folds); a file holding another one is never replaced
    import hashlib
    specs, key_folds = [a.spec for a in arms], [int(f) for f in folds]
    key = hashlib.sha1(json.dumps([specs, key_folds]).encode()).hexdigest()[:8]
    names = [f"table6_{args.host}_{split}_{key}"]
    if specs == DEFAULT_ARMS[args.host] and args.folds is None and key_folds == requested_folds:
        names.insert(0, f"table6_{args.host}_{split}")
    js = None
    for n in names:
        try:
            old = json.loads((out_dir / f"{n}.json").read_text()) if (out_dir / f"{n}.json").is_file() else None
        except ValueError:
            old = {}
        if old is None or (list(old.get("arms") or {}), old.get("folds")) == (specs, key_folds):
            js = out_dir / f"{n}.json"
            break
    if js is None:
        print(f"error: '{out_dir / names[-1]}.json' holds the table of another comparison; move it away to write "
              f"this one", file=sys.stderr)
        return 2
    md = js.with_suffix(".md")
    ep_file = js.with_name(js.stem + "_episodes.json")
    per_run = {a: r.pop("episode_iu") for a, r in res.items()}
    from benchmarks.engine import finite_json
    ep_file.write_text(json.dumps(finite_json({"episodes": episodes, "episode_iu": per_run, "bootstrap": BOOTSTRAP}),
                                  separators=(",", ":")))
    js.write_text(json.dumps(finite_json({"host": args.host, "arms": {a.spec: {"model": a.model, "variant": a.variant,
                                                                    "overrides": a.overrides} for a in arms},
                              "folds": folds, "seeds": seeds, "split": split, "protocol": ptxt, "recipe": recipe,
                              "overrides": base, "interval": INTERVAL_TEXT, "minutes": minutes, "device": device,
                              "versions": versions, "label": label, "preregistered": prereg, "results": res,
                              "summary": stats, "episodes_file": ep_file.name, "paper": PAPER_TABLE6,
                              "missing_runs": missing if args.report_only else []}),
                             indent=1))
    md.write_text(markdown(args.host, folds, seeds, res, stats, ptxt, minutes, device, versions, label_text(prereg)))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    from benchmarks.engine import exit_process
    exit_process(main())
