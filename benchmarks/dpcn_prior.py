"""What DPCN's prior knows about the query mask: SAM's activation maps, M⁰ and Mʳ against PFENet's prior.

For a trained checkpoint (or an untrained network built from a recipe, ``--untrained``), on validation
episodes (by default the recipe's per-epoch validation: ``train.val_episodes`` episodes of seed
``train.val_seed`` of ``train.val_split``), every map is upsampled bilinearly to the query input and
compared with the query mask (label 255 ignored):

- ``IoU@0.5``: the map thresholded at 0.5 as a foreground prediction; per class ``ΣI / ΣU`` over the
  class's episodes, then the mean over classes (the class mIoU of the thresholded map, in %);
- ``AUC``: the ROC-AUC of the map's values against the query foreground, per episode (rank statistic,
  ties averaged; episodes whose query has only one class are left out), mean over episodes.

Maps: ``sam_<dh>x<dw>`` (each SAM window's activation map), ``M0`` (their mean, DPCN's initial pseudo
mask), ``Mr`` (FFM's refined mask), and ``pfenet_prior`` (PFENet's prior: SAM with the single window
(1, 1), i.e. the max over the support foreground of the cosine similarity of layer4 features, min-max
normalised, computed here from the same network's layer4 on the same episodes). Each is measured with
the checkpoint's own layer4 (``own``: fine-tuned when the run trained it) and with the backbone's
original weights (``imagenet``: layer4 as it was before training, the rest of the checkpoint unchanged;
its ``M0`` / ``Mr`` are what this checkpoint's FFM makes of the frozen layer4's maps). A network
without a prior (the Baseline) gets ``pfenet_prior`` only::

    python benchmarks/dpcn_prior.py --checkpoint runs/plug_in_dpcn/dpcn_f1_seed0/best.pth \
        --checkpoint runs/plug_in_dpcn/baseline_f1_seed0/best.pth --data-root VOC2012 \
        --json docs/results/dpcn_prior_f1.json --md docs/results/dpcn_prior_f1.md
    python benchmarks/dpcn_prior.py --untrained --config dpcn_voc_lite0_paper --data-root VOC2012 --episodes 32

The measurement itself is :func:`benchmarks.scoring.prior_maps.diagnose` (on a network in memory;
``benchmarks/gpu_matrix.py`` calls it at the end of every unit, since a lent GPU keeps no checkpoint).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from benchmarks.scoring.prior_maps import LAYER4_VARIANTS, diagnose, markdown  # noqa: E402


def main(argv=None) -> int:
    from benchmarks.engine.config import add_config_args, load_config, overrides_from_args
    from benchmarks.engine import build_model_from_config, load_checkpoint_model, resolve_device
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", action="append", default=[], help="a run's best.pth (repeatable)")
    p.add_argument("--untrained", action="store_true", help="the network of --config as built (a rehearsal)")
    add_config_args(p, include=["model", "data_root", "fold", "device"])
    p.add_argument("--episodes", type=int, default=None, help="validation episodes (default train.val_episodes)")
    p.add_argument("--seed", type=int, default=None, help="episode seed (default train.val_seed)")
    p.add_argument("--split", choices=["val", "test"], default=None, help="default train.val_split (val)")
    p.add_argument("--layer4", nargs="+", default=list(LAYER4_VARIANTS), choices=list(LAYER4_VARIANTS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.checkpoint and not args.untrained:
        p.error("give --checkpoint RUN/best.pth (repeatable) or --untrained --config RECIPE")
    over = [o for o in overrides_from_args(args) if not o.startswith("model.name=") or args.untrained]
    rows = []
    jobs = [(c, None) for c in args.checkpoint] + ([(None, args.config)] if args.untrained else [])
    for ck, recipe in jobs:
        if ck is not None:
            model, cfg = load_checkpoint_model(ck, overrides=over)
            label = str(pathlib.Path(ck).parent.name)
        else:
            cfg = load_config(recipe, over)
            torch.manual_seed(0)
            model = build_model_from_config(cfg)
            label = f"untrained {cfg['model']['name']} ({recipe})"
        device = resolve_device(cfg["run"]["device"])
        model.to(device).eval()
        r = diagnose(model, cfg, episodes=args.episodes, seed=args.seed, split=args.split,
                     batch_size=args.batch_size, device=device, layer4=args.layer4)
        rows.append({"label": label, "checkpoint": ck, "model": cfg["model"]["name"],
                     "flags": cfg["model"]["flags"], "fold": cfg["data"]["fold"], "result": r})
        print(f"{label}: {r['protocol']} ({r['seconds']} s)")
    md = markdown(rows)
    print(md)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                       "rows": rows}, indent=1, default=str))
    if args.md:
        pathlib.Path(args.md).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
