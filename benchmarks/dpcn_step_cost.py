"""Seconds per training step of a DPCN recipe with layer4 frozen and trained, and of SAM and layer4 alone.

Measures what one run of a recipe costs before it is run (docs/DPCN_RECIPE.md#cost): for every arm,
the training step on one real batch (``train.batch_size`` episodes of the recipe's training split)
with the backbone's frozen stages served from the feature cache (the batch is repeated, so every
lookup hits, as in a long run where every input has been seen), first with layer4 frozen, then with
layer4 trainable (``set_layer4_trainable``: the cache then serves the stem..layer3 only and layer4
runs forward and backward every step); the evaluation forward (``train.val_batch_size`` episodes); and
SAM alone (``dcm.SupportActivation`` with the recipe's windows) forward and forward + backward on
random features of the same shape; and layer4 alone (forward, forward + backward) on the ``2 × batch``
images of a step. Projects the minutes of one run from these numbers::

    python benchmarks/dpcn_step_cost.py --config dpcn_voc_lite0_paper --data-root VOC2012 --threads 1 \
        --arms baseline "dpcn[nodcm]" dpcn --steps 2 --json docs/results/dpcn_paper_cost.json

``--components-only`` times SAM and layer4 only; ``--arms-from JSON`` reuses the arms' step costs of an
earlier run and projects them for the recipe as it is now (e.g. after its length changed).

The projection: ``iters_frozen · t_frozen + iters_trained · t_trained + validations · (val_episodes /
val_batch) · t_eval + (eval.episodes / eval.batch_size) · t_eval``; the first run of a process also
fills the feature cache (not included; docs/REAL_IMAGES.md#feature-cache).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Dict, List  # noqa: E402

import torch  # noqa: E402


def _timed(fn, n: int) -> List[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def sam_cost(channels: int, size: int, batch: int, windows, steps: int) -> Dict[str, float]:
    """SAM forward and forward + backward (seconds, min over ``steps``) on random features."""
    from dcm import SupportActivation
    sam = SupportActivation(windows=tuple(tuple(w) for w in windows))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, channels, size, size, generator=g)
    s = torch.randn(batch, 1, channels, size, size, generator=g)
    m = (torch.rand(batch, 1, size, size, generator=g) > 0.6).float()

    def fwd():
        with torch.no_grad():
            sam(q, s, m)

    def fwd_bwd():
        qq, ss = q.clone().requires_grad_(True), s.clone().requires_grad_(True)
        out = sam(qq, ss, m)
        (out.maps.sum() + out.pseudo_mask.sum()).backward()

    fwd()
    f = min(_timed(fwd, steps))
    fb = min(_timed(fwd_bwd, steps))
    return {"forward_s": f, "forward_backward_s": fb, "backward_s": fb - f, "backward_over_forward": (fb - f) / f,
            "shape": [batch, channels, size, size], "windows": [list(w) for w in windows]}


def layer4_cost(cfg: dict, steps: int) -> Dict[str, float]:
    """The backbone's layer4 on ``2 × batch`` images (query + support of a step) at the recipe's size:
    forward without a graph (frozen) and forward + backward (trained), seconds (min over ``steps``)."""
    from models.backbones import build_backbone
    bb = build_backbone(cfg["model"]["backbone"], weights="random")
    bb.train()
    n = 2 * int(cfg["train"]["batch_size"])
    size = -(-int(cfg["data"]["train_size"]) // bb.strides["layer3"])
    l3 = torch.randn(n, bb.channels["layer3"], size, size, generator=torch.Generator().manual_seed(0))

    def fwd():
        with torch.no_grad():
            bb.forward_high(l3)

    def fwd_bwd():
        bb.forward_high(l3).sum().backward()

    fwd()
    f = min(_timed(fwd, steps))
    bb.set_layer4_trainable(True)
    fwd_bwd()
    fb = min(_timed(fwd_bwd, steps))
    return {"images": n, "size": size, "forward_s": f, "forward_backward_s": fb}


def arm_cost(recipe: str, base: List[str], spec: str, steps: int) -> dict:
    """Training-step seconds (layer4 frozen / trained) and eval-forward seconds of one arm."""
    from benchmarks.engine.config import load_config
    from benchmarks.datasets import collate_episodes
    from benchmarks.engine import build_model_from_config, build_train_dataset, seed_everything
    from benchmarks.engine.feature_cache import attach_feature_cache
    from models.arms import parse_arm
    arm = parse_arm(spec, "dpcn")
    cfg = load_config(recipe, base + [f"model.name={arm.model}", *arm.overrides])
    t = cfg["train"]
    seed_everything(0)
    model = build_model_from_config(cfg)
    attach_feature_cache(model, 4 << 30, shared=True)
    ds = build_train_dataset(cfg)
    ds.set_epoch(0)
    bs = int(t["batch_size"])
    batch = collate_episodes([ds[i] for i in range(bs)])
    q, s, sm, qm = (batch[k] for k in ("query_img", "support_imgs", "support_masks", "query_mask"))
    groups = model.param_groups(float(t["lr"]), float(t["layer4_lr_scale"]), True)
    opt = torch.optim.AdamW(groups, lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
    model.train()

    def step():
        out = model(q, s, sm, query_mask=qm)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step()  # fills the cache for this batch (and builds the graph once)
    frozen = _timed(step, steps)
    res = {"arm": spec, "model": arm.model, "overrides": arm.overrides, "batch": bs,
           "train_step_frozen_s": min(frozen), "train_step_frozen_all_s": frozen}
    uses_l4 = bool(getattr(model, "use_prior", False))
    if uses_l4:
        model.backbone.set_layer4_trainable(True)
        step()
        trained = _timed(step, steps)
        res.update(train_step_trained_s=min(trained), train_step_trained_all_s=trained)
    else:  # the Baseline never runs layer4: training it changes nothing
        res.update(train_step_trained_s=res["train_step_frozen_s"], train_step_trained_all_s=None,
                   note="no prior: layer4 is never run, its step is the frozen one")
    vb = int(t["val_batch_size"])
    qe = q.repeat((vb + bs - 1) // bs, 1, 1, 1)[:vb]
    se, sme = s.repeat((vb + bs - 1) // bs, 1, 1, 1, 1)[:vb], sm.repeat((vb + bs - 1) // bs, 1, 1, 1)[:vb]
    model.eval()

    def ev():
        with torch.no_grad():
            model(qe, se, sme)

    ev()
    res["eval_forward_s"] = min(_timed(ev, steps))
    res["eval_batch"] = vb
    res["layer4_trained_in_eval"] = uses_l4
    return res


def project(cfg: dict, arm: dict) -> dict:
    """Minutes of one run of the recipe from the measured step costs (feature-cache fill excluded)."""
    t, d, e = cfg["train"], cfg["data"], cfg["eval"]
    ipe = int(d["train_episodes"]) // int(t["batch_size"])
    epochs = int(t["epochs"])
    start = int(t["layer4_start_epoch"]) if t["finetune_layer4"] else epochs
    start = min(start, epochs)
    frozen_it, trained_it = start * ipe, (epochs - start) * ipe
    n_val = len([ep for ep in range(1, epochs + 1) if ep % int(t["val_every"]) == 0 or ep == epochs])
    vb = arm["eval_batch"]
    # the eval forward was timed with layer4 trained (not cached); before layer4 trains it is cached, so
    # the validations of the frozen epochs are overestimated (by at most layer4's share)
    val_s = n_val * (int(t["val_episodes"]) / vb) * arm["eval_forward_s"]
    test_s = (int(e["episodes"]) * len(e["seeds"]) / vb) * arm["eval_forward_s"]
    train_s = frozen_it * arm["train_step_frozen_s"] + trained_it * arm["train_step_trained_s"]
    return {"iterations_frozen": frozen_it, "iterations_trained": trained_it, "validations": n_val,
            "train_min": train_s / 60, "validation_min": val_s / 60, "final_eval_min": test_s / 60,
            "total_min": (train_s + val_s + test_s) / 60}


def main(argv=None) -> int:
    from benchmarks.engine.config import add_config_args, load_config, overrides_from_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, include=["data_root", "fold"])
    p.add_argument("--arms", nargs="+", default=["baseline", "dpcn[nodcm]", "dpcn"])
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting (min is reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--components-only", action="store_true", help="time SAM and layer4 alone, no arm")
    p.add_argument("--arms-from", default=None, metavar="JSON",
                   help="take the arms' step costs from an earlier --json of this script (projected anew for "
                        "the recipe as it is now) instead of measuring them again")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = args.config or "dpcn_voc_lite0_paper"
    base = overrides_from_args(args) + [f"run.threads={args.threads}"]
    cfg = load_config(recipe, base)
    size = -(-int(cfg["data"]["train_size"]) // 8)  # Lite0 output stride 8
    from models.dpcn import PAPER_SAM_WINDOWS
    windows = cfg["model"]["flags"].get("sam_windows") or PAPER_SAM_WINDOWS
    out = {"recipe": recipe, "overrides": base, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
           "sam": sam_cost(320, size, int(cfg["train"]["batch_size"]), windows, args.steps),
           "layer4": layer4_cost(cfg, args.steps), "arms": []}
    s, l4 = out["sam"], out["layer4"]
    print(f"torch {torch.__version__}, {out['threads']} thread(s)")
    print(f"SAM alone {s['shape']}: forward {s['forward_s']:.2f} s, forward+backward {s['forward_backward_s']:.2f} s "
          f"(backward {s['backward_s']:.2f} s = {s['backward_over_forward']:.1f}x forward)")
    print(f"layer4 alone ({l4['images']} images, {l4['size']}x{l4['size']}): forward {l4['forward_s']:.2f} s, "
          f"forward+backward {l4['forward_backward_s']:.2f} s")
    earlier = json.loads(pathlib.Path(args.arms_from).read_text())["arms"] if args.arms_from else None
    if earlier is not None:
        out["arms_from"] = args.arms_from
    if not args.components_only:
        for spec in args.arms:
            a = next(x for x in earlier if x["arm"] == spec) if earlier is not None else arm_cost(recipe, base, spec,
                                                                                                  args.steps)
            a["projection"] = project(cfg, a)
            out["arms"].append(a)
            pr = a["projection"]
            print(f"{spec:14s} step frozen {a['train_step_frozen_s']:.2f} s, trained {a['train_step_trained_s']:.2f} s, "
                  f"eval forward ({a['eval_batch']}) {a['eval_forward_s']:.2f} s -> run ≈ {pr['total_min']:.1f} min "
                  f"(train {pr['train_min']:.1f}, validation {pr['validation_min']:.1f}, test {pr['final_eval_min']:.1f})")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
