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

:func:`diagnose` is the same measurement on a network in memory (``benchmarks/gpu_matrix.py`` calls it at
the end of every unit, since a lent GPU keeps no checkpoint).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Dict, Iterable, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

__all__ = ["roc_auc", "map_episode_stats", "diagnose", "summarise_maps", "markdown"]

LAYER4_VARIANTS = ("own", "imagenet")


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC-AUC of ``scores`` for the binary ``labels`` (Mann–Whitney U / (n⁺ n⁻), ties get average ranks).

    ``nan`` when one of the two classes is absent.

    Example:
        >>> roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
        >>> roc_auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1]))
        0.5
    """
    s = scores.reshape(-1).double()
    y = labels.reshape(-1).bool()
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    # average ranks of ties: rank of a value = mean of the 1-based positions it occupies
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s)
    ranks[order] = avg_rank[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def map_episode_stats(maps: Tensor, query_mask: Tensor, threshold: float = 0.5) -> List[dict]:
    """Per episode of a batch: foreground intersection / union of ``maps > threshold`` and the ROC-AUC.

    Args:
        maps: ``Tensor[B, 1, H, W]`` (or ``[B, H, W]``) values in [0, 1] at the mask's resolution.
        query_mask: ``Tensor[B, H, W]`` labels {0, 1, 255} (255 ignored).
    """
    m = maps.reshape(query_mask.shape).float()
    out = []
    for b in range(m.shape[0]):
        valid = query_mask[b] != 255
        fg = (query_mask[b] == 1) & valid
        pred = (m[b] > threshold) & valid
        out.append({"inter": int((pred & fg).sum()), "union": int((pred | fg).sum()),
                    "auc": roc_auc(m[b][valid], fg[valid])})
    return out


def _upsample(x: Tensor, size) -> Tensor:
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True)


def _reference_layer4(model: nn.Module, cfg: dict) -> Optional[dict]:
    """The state dict of the backbone as built from ``cfg``'s weights (``None`` for random weights)."""
    weights = cfg["model"]["backbone_weights"]
    if weights in (None, "random"):
        return None
    from models.backbones import build_backbone
    ref = build_backbone(cfg["model"]["backbone"], weights=weights)
    return ref.state_dict()


def _with_backbone_state(model: nn.Module, state: dict) -> nn.Module:
    m = copy.deepcopy(model)
    m.backbone.feature_cache = None  # the cache's namespace is the other weights' fingerprint
    m.backbone.load_state_dict(state)
    return m


@torch.no_grad()
def _maps_of_batch(model: nn.Module, batch: dict, device, amp: str = "off") -> Dict[str, Tensor]:
    """Every map of one batch at the query input's resolution, ``{name: Tensor[B, 1, H, W]}``."""
    from benchmarks.engine.device import amp_context
    from dcm import SupportActivation
    from models.dpcn import _fg_float
    q = batch["query_img"].to(device)
    s = batch["support_imgs"].to(device)
    sm = batch["support_masks"].to(device)
    H, W = q.shape[-2:]
    out: Dict[str, Tensor] = {}
    with amp_context(device, amp):
        # the network's own forward (eval mode, no query mask), with the backbone run once for every map
        B, K = s.shape[:2]
        s_fg = _fg_float(sm if sm.dim() == 4 else sm[:, None], q.dtype)
        q_mid, q_l3 = model._mid(q)
        s_mid, s_l3 = model._mid(s.flatten(0, 1))
        q_l4 = model.backbone.forward_high(q_l3)
        s_l4_plain = model.backbone.forward_high(s_l3)
        s_l4 = model._support_high(s_l3, s_fg.flatten(0, 1), s_l4_plain) if getattr(model, "use_prior", False) \
            else s_l4_plain
        s_l4 = s_l4.reshape(B, K, *s_l4.shape[1:])
        prior = SupportActivation(windows=((1, 1),))(q_l4, s_l4, s_fg)
        out["pfenet_prior"] = _upsample(prior.pseudo_mask, (H, W))
        if getattr(model, "use_prior", False) and model.sam is not None:
            r = model._head(q_mid, q_l4, s_mid.reshape(B, K, *s_mid.shape[1:]), s_l4, s_fg, (H, W))
            if model.use_sam:
                for i, (a, b) in enumerate(model.sam.windows):
                    out[f"sam_{a}x{b}"] = _upsample(r["activation_maps"][:, i:i + 1], (H, W))
                out["M0"] = _upsample(r["initial_pseudo_mask"], (H, W))
            if model.use_ffm:
                out["Mr"] = _upsample(r["refined_pseudo_mask"], (H, W))
    return out


@torch.no_grad()
def diagnose(model: nn.Module, cfg: dict, *, episodes: Optional[int] = None, seed: Optional[int] = None,
             split: Optional[str] = None, batch_size: int = 16, device=None, amp: str = "off",
             layer4: Sequence[str] = LAYER4_VARIANTS, num_workers: int = 0, factory=None) -> dict:
    """IoU@0.5 and ROC-AUC of every prior map of ``model`` on validation episodes (module docstring).

    Returns ``{"protocol": {...}, "variants": {layer4 variant: {map: {"iou": %, "auc": mean,
    "episodes": n, "auc_episodes": n, "class_iou": {class: %}}}}, "seconds"}``.
    """
    from torch.utils.data import DataLoader
    from benchmarks.datasets import collate_episodes
    from benchmarks.engine import eval_factory, eval_protocol
    t0 = time.perf_counter()
    net = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    device = torch.device(device) if device is not None else next(net.parameters()).device
    c = copy.deepcopy(cfg)
    if episodes is not None:
        c["train"]["val_episodes"] = int(episodes)
    if seed is not None:
        c["train"]["val_seed"] = int(seed)
    if split is not None:
        c["train"]["val_split"] = split
    protocol = eval_protocol(c, validation=True)
    factory = factory or eval_factory(c)
    size = protocol.scales[0]
    ds = factory(protocol, protocol.seeds[0], size)
    variants = {}
    ref_state = None
    for v in layer4:
        if v not in LAYER4_VARIANTS:
            raise ValueError(f"layer4: expected one of {LAYER4_VARIANTS}, got {v!r}")
        if v == "imagenet":
            ref_state = ref_state if ref_state is not None else _reference_layer4(net, c)
            if ref_state is None:
                variants[v] = {"skipped": "the recipe's backbone weights are random: no reference layer4"}
                continue
            m = _with_backbone_state(net, ref_state)
        else:
            m = net
        was = m.training
        m.eval()
        acc: Dict[str, dict] = defaultdict(lambda: {"inter": defaultdict(int), "union": defaultdict(int), "auc": []})
        n = 0
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate_episodes)
        try:
            for batch in loader:
                qm = batch["query_mask"]
                cls = batch["class_id"].tolist()
                for name, mp in _maps_of_batch(m, batch, device, amp).items():
                    for b, st in enumerate(map_episode_stats(mp.cpu(), qm)):
                        a = acc[name]
                        a["inter"][cls[b]] += st["inter"]
                        a["union"][cls[b]] += st["union"]
                        a["auc"].append(st["auc"])
                n += len(cls)
        finally:
            m.train(was)
        variants[v] = summarise_maps(acc, n)
    return {"protocol": protocol.describe() + "; maps scored against the query mask at the input resolution",
            "episodes": n, "variants": variants,
            "seconds": round(time.perf_counter() - t0, 1)}


def summarise_maps(acc: Dict[str, dict], n: int, reference: str = "pfenet_prior") -> Dict[str, dict]:
    """Per map: class mIoU of the thresholded map (%), mean episode AUC, the per-class IoU, the per-episode
    AUCs (episode order, ``None`` where undefined) and, for every map but ``reference``, the paired
    per-episode AUC difference map − reference with a 95 % Student-t interval over episodes."""
    from benchmarks.scoring.stats import t_quantile_975
    out = {}
    for name, a in acc.items():
        cls_iou = {int(c): 100.0 * a["inter"][c] / a["union"][c] for c in a["union"] if a["union"][c] > 0}
        aucs = [x for x in a["auc"] if not math.isnan(x)]
        out[name] = {"iou": sum(cls_iou.values()) / len(cls_iou) if cls_iou else float("nan"),
                     "auc": sum(aucs) / len(aucs) if aucs else float("nan"),
                     "episodes": n, "auc_episodes": len(aucs), "class_iou": cls_iou,
                     "auc_values": [None if math.isnan(x) else round(x, 5) for x in a["auc"]]}
    if reference in acc:
        ref = acc[reference]["auc"]
        for name, a in acc.items():
            if name == reference:
                continue
            d = [x - y for x, y in zip(a["auc"], ref) if not (math.isnan(x) or math.isnan(y))]
            if len(d) >= 2:
                m = sum(d) / len(d)
                sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
                h = t_quantile_975(len(d) - 1) * sd / math.sqrt(len(d))
                out[name]["auc_minus_" + reference] = {"mean": m, "ci95": [m - h, m + h], "n": len(d)}
    return out


MAP_ORDER = ("pfenet_prior", "sam_5x1", "sam_3x3", "sam_1x5", "M0", "Mr")


def markdown(rows: Iterable[dict]) -> str:
    """A table: one line per (run, layer4 variant, map) with IoU@0.5 and AUC."""
    lines = ["| run | layer4 | map | IoU@0.5 (class mIoU, %) | ROC-AUC, mean over episodes (paired difference from "
             "PFENet's prior, 95 % t interval over episodes) | episodes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for v, maps in r["result"]["variants"].items():
            if "skipped" in maps:
                lines.append(f"| {r['label']} | {v} | — | {maps['skipped']} | | |")
                continue
            names = [k for k in MAP_ORDER if k in maps] + sorted(k for k in maps if k not in MAP_ORDER)
            for k in names:
                s = maps[k]
                d = s.get("auc_minus_pfenet_prior")
                dd = f" ({d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] vs prior)" if d else ""
                lines.append(f"| {r['label']} | {v} | {k} | {s['iou']:.2f} | {s['auc']:.3f}{dd} | {s['auc_episodes']} |")
    return "\n".join(lines) + "\n"


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
