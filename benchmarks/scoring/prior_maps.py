"""What DPCN's prior knows about the query mask, measured on a network in memory: SAM's activation maps,
M⁰ and Mʳ against PFENet's prior (IoU@0.5 and ROC-AUC per map, per episode and per class).

The command ``benchmarks/dpcn_prior.py`` runs :func:`diagnose` on checkpoints and writes its tables
(its docstring defines the measurement); ``benchmarks/gpu_matrix.py`` calls :func:`diagnose` at the end of
every unit, since a lent GPU keeps no checkpoint.
"""
import copy
import math
import time
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["roc_auc", "map_episode_stats", "diagnose", "summarise_maps", "markdown", "maps_of_batch", "upsample",
           "LAYER4_VARIANTS", "MAP_ORDER"]

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


def upsample(x: Tensor, size) -> Tensor:
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
def maps_of_batch(model: nn.Module, batch: dict, device, amp: str = "off") -> Dict[str, Tensor]:
    """Every map of one batch at the query input's resolution, ``{name: Tensor[B, 1, H, W]}``."""
    from benchmarks.engine.device import amp_context
    from dcm import SupportActivation
    from dcm.functional import prepare_mask
    q = batch["query_img"].to(device)
    s = batch["support_imgs"].to(device)
    sm = batch["support_masks"].to(device)
    H, W = q.shape[-2:]
    out: Dict[str, Tensor] = {}
    with amp_context(device, amp):
        # the network's own forward (eval mode, no query mask), with the backbone run once for every map
        B, K = s.shape[:2]
        sm = sm if sm.dim() == 4 else sm[:, None]
        s_fg = prepare_mask(sm, tuple(sm.shape[-2:]), q.dtype)  # 255 -> 0, the network's own masks
        q_mid, q_l3 = model._mid(q)
        s_mid, s_l3 = model._mid(s.flatten(0, 1))
        q_l4 = model.backbone.forward_high(q_l3)
        s_l4_plain = model.backbone.forward_high(s_l3)
        s_l4 = model._support_high(s_l3, s_fg.flatten(0, 1), s_l4_plain) if getattr(model, "use_prior", False) \
            else s_l4_plain
        s_l4 = s_l4.reshape(B, K, *s_l4.shape[1:])
        prior = SupportActivation(windows=((1, 1),))(q_l4, s_l4, s_fg)
        out["pfenet_prior"] = upsample(prior.pseudo_mask, (H, W))
        if getattr(model, "use_prior", False) and model.sam is not None:
            r = model._head(q_mid, q_l4, s_mid.reshape(B, K, *s_mid.shape[1:]), s_l4, s_fg, (H, W))
            if model.use_sam:
                for i, (a, b) in enumerate(model.sam.windows):
                    out[f"sam_{a}x{b}"] = upsample(r["activation_maps"][:, i:i + 1], (H, W))
                out["M0"] = upsample(r["initial_pseudo_mask"], (H, W))
            if model.use_ffm:
                out["Mr"] = upsample(r["refined_pseudo_mask"], (H, W))
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
                for name, mp in maps_of_batch(m, batch, device, amp).items():
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
    from .stats import t_quantile_975
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
