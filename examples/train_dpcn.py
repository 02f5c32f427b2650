"""Train and evaluate DPCN (or any registered few-shot network) from a YAML recipe.

With no argument it trains DPCN with the EfficientNet-Lite0 backbone (ImageNet weights, shipped
offline) on the built-in synthetic few-shot set and evaluates it on the held-out classes beside a
no-training reference -- a few minutes on a laptop CPU::

    python examples/train_dpcn.py

The paper's recipes (configs/*.yaml) on the real benchmarks::

    python examples/train_dpcn.py --config dpcn_pascal --data-root /data/VOC2012 --fold 0 \
        --backbone-weights initmodel/resnet50_v2.pth
    python examples/train_dpcn.py --config dpcn_coco --data-root /data/coco --fold 0 --set data.num_workers=8
    torchrun --nproc_per_node 4 examples/train_dpcn.py --config dpcn_coco --data-root /data/coco

Any key can be overridden (``--set train.lr=0.01 --set model.dcm.kernel_size=3``); the resolved
config is saved as ``<run>/config.yaml``. A killed run continues with ``--resume`` (same --out/--name,
or the run folder / a checkpoint path). A run folder belongs to one run: a new run into a folder that
holds another one stops with an error, unless ``--move-aside`` renames that folder to
``<name>.old-<time>`` first. See docs/TRAINING.md.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.engine.config import (ConfigError, add_config_args, choose_recipe, dump_config, load_config,  # noqa: E402
                                     overrides_from_args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_OR_CKPT",
                   help="continue a run: without a value the run folder given by --out/--name (or the default "
                        "name); or a run folder, or a checkpoint file")
    p.add_argument("--move-aside", action="store_true",
                   help="when the run folder already holds another run, rename that folder to "
                        "<name>.old-<time> and start there afresh (config key run.move_aside; without it such a "
                        "start is refused; nothing is deleted)")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (log lines only)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def resolve(args):
    """(config, run_dir, resume) from the command line."""
    from benchmarks.engine import default_run_name
    overrides = overrides_from_args(args)
    if args.no_progress:
        overrides.append("run.progress=false")
    if args.no_eval:
        overrides.append("eval.enabled=false")
    if args.move_aside:
        overrides.append("run.move_aside=true")
    resume = None
    if args.resume not in (None, True):  # a run folder or a checkpoint
        r = Path(args.resume)
        if r.is_dir():
            run_dir, resume = r, True
        elif r.is_file():
            run_dir, resume = r.parent, r
        else:
            raise ConfigError(f"--resume: '{r}' is neither a run folder nor a checkpoint file")
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: '{saved}' not found (the run folder of a training run holds config.yaml)")
        cfg = load_config(saved, overrides)
        return cfg, run_dir, resume
    recipe = choose_recipe(args.config, args.model, args.dataset)
    cfg = load_config(recipe, overrides)
    run_dir = Path(cfg["run"]["out_dir"]) / (cfg["run"]["name"] or default_run_name(cfg))
    if args.resume is True:
        saved = run_dir / "config.yaml"
        if not (run_dir / "last.pth").is_file():
            raise ConfigError(f"--resume: no checkpoint '{run_dir / 'last.pth'}' to continue from")
        if saved.is_file():
            cfg = load_config(saved, overrides)
        resume = True
    return cfg, run_dir, resume


def main(argv=None) -> int:
    from benchmarks.engine.config import show_deprecations
    show_deprecations()
    args = parse_args(argv)
    try:
        cfg, run_dir, resume = resolve(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from benchmarks.engine.output_paths import output_problem
    why = output_problem(run_dir, "folder")  # before any work: never a traceback after the model is built
    if why:
        print(f"error: {'--resume' if args.resume not in (None, True) else '--out'}: {why}", file=sys.stderr)
        return 2
    from benchmarks.engine import RunFolderError, RunFolderTaken, TrainingInterrupted, ValidationFailed, train
    t0 = time.perf_counter()
    try:
        out = train(cfg, run_dir, resume=resume)
    except TrainingInterrupted as e:
        print(f"\ninterrupted: {e}", file=sys.stderr)
        return 130
    except ValidationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunFolderTaken as e:
        print(f"error: run folder '{e.run_dir}' already holds another run ({', '.join(e.found)}); continue it with "
              f"--resume, give this run another --name, or pass --move-aside to rename the old folder to "
              f"'{Path(e.run_dir).name}.old-<time>' first", file=sys.stderr)
        return 2
    except RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, ImportError, FileNotFoundError) as e:
        from benchmarks.engine import short_error
        print(f"error: {type(e).__name__}: {short_error(e)}", file=sys.stderr)
        return 2
    if out.get("results") is not None or cfg["eval"]["enabled"] is False:
        mins = (time.perf_counter() - t0) / 60
        print(f"\ndone in {mins:.1f} min; run folder {out['run_dir']} (config.yaml, log.jsonl, best.pth, results.json)")
    return 0


if __name__ == "__main__":
    from benchmarks.engine import exit_process
    exit_process(main())
