"""Few-shot segmentation metrics (docs/PROTOCOLS.md#metrics): class mIoU and FB-IoU by accumulation, 255 ignored.

Per episode ``e`` with prediction ``P`` (argmax of the 2-class logits) and target ``T`` in {0, 1, 255}:
``P := 255`` where ``T == 255``; for ``k`` in {0 (background), 1 (foreground)}
``I_k(e) = #{P == k and T == k}``, ``U_k(e) = #{P == k} + #{T == k} - I_k(e)``.

* **class mIoU** (headline): ``IoU_c = Σ_{e: class(e)=c} I_1(e) / (Σ_{e: class(e)=c} U_1(e) + 1e-10)``, averaged
  over the fold's classes (PFENet). Classes that received no episode are reported as NaN and left out
  of the mean with a warning (PFENet would silently count them as 0).
* **FB-IoU**: ``IoU_k = Σ_e I_k(e) / Σ_e U_k(e)`` for k = bg, fg; mean of the two.
* **episode-wise fg IoU** (extra, off by default in reports): mean over episodes of ``I_1(e)/U_1(e)``;
  episodes with ``U_1(e) = 0`` (empty target and empty prediction) count as 1.

Every episode's class, query image and ``I_1(e)``, ``U_1(e)`` are kept as well
(:meth:`FewShotIoU.episode_records`): the two-level bootstrap of :mod:`benchmarks.scoring.stats` resamples them.

All values are fractions in [0, 1]; :mod:`benchmarks.scoring.protocols` reports percentages.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Sequence

import torch

__all__ = ["intersection_and_union", "FewShotIoU"]

EPS = 1e-10


def intersection_and_union(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 2,
                           ignore_index: int = 255):
    """Per-sample intersection and union areas of each class.

    Args:
        pred: integer ``Tensor[H, W]`` or ``Tensor[B, H, W]`` of class indices in ``0..num_classes-1``.
        target: same shape, values in ``0..num_classes-1`` or ``ignore_index``.
    Returns:
        ``(inter, union)``, int64 tensors ``[num_classes]`` (unbatched) or ``[B, num_classes]``.

    Example:
        >>> p = torch.tensor([[1, 1, 0], [0, 1, 1]])
        >>> t = torch.tensor([[1, 0, 0], [255, 1, 1]])
        >>> i, u = intersection_and_union(p, t)
        >>> i.tolist(), u.tolist()
        ([1, 3], [2, 4])
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}")
    if pred.dim() not in (2, 3):
        raise ValueError(f"pred: expected shape (H, W) or (B, H, W), got {tuple(pred.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("pred and target must be integer class-index tensors (take argmax of the logits first)")
    unbatched = pred.dim() == 2
    if unbatched:
        pred, target = pred[None], target[None]
    B = pred.shape[0]
    pred = pred.reshape(B, -1).long()
    target = target.reshape(B, -1).long()
    valid = target != ignore_index
    bad_t = valid & ((target < 0) | (target >= num_classes))
    if bool(bad_t.any()):
        raise ValueError(f"target: values must be in 0..{num_classes - 1} or {ignore_index}, got "
                         f"{sorted(set(target[bad_t].unique().tolist()))[:5]}")
    if bool(((pred < 0) | (pred >= num_classes)).any()):
        raise ValueError(f"pred: values must be in 0..{num_classes - 1}")
    offs = torch.arange(B, device=pred.device)[:, None] * num_classes
    n = B * num_classes

    def hist(x, m):
        return torch.bincount((x + offs)[m], minlength=n).view(B, num_classes)

    area_p = hist(pred, valid)
    area_t = hist(target, valid)
    inter = hist(target, valid & (pred == target))
    union = area_p + area_t - inter
    if unbatched:
        return inter[0], union[0]
    return inter, union


class FewShotIoU:
    """Accumulates per-class foreground and global fg/bg intersection/union over episodes.

    Args:
        class_ids: the fold's episode classes, in class-index order (index ``i`` <-> ``class_ids[i]``).
        ignore_index: target value excluded from every count (255).
        episode_iou: also keep the per-episode foreground IoU (for the episode-wise mean).

    Example:
        >>> m = FewShotIoU([7, 9])
        >>> m.update(torch.tensor([[1, 0], [0, 0]]), torch.tensor([[1, 1], [0, 255]]), class_index=0)
        >>> m.update(torch.tensor([[1, 1], [1, 1]]), torch.tensor([[1, 0], [0, 0]]), class_index=1)
        >>> r = m.compute()
        >>> {c: round(v, 4) for c, v in r["class_iou"].items()}, round(r["miou"], 4), round(r["fbiou"], 4)
        ({7: 0.5, 9: 0.25}, 0.375, 0.2667)
    """

    def __init__(self, class_ids: Sequence[int], ignore_index: int = 255, episode_iou: bool = False):
        self.class_ids = [int(c) for c in class_ids]
        if not self.class_ids:
            raise ValueError("class_ids: expected at least one class")
        self.ignore_index = ignore_index
        self.keep_episodes = episode_iou
        self.reset()

    def reset(self) -> None:
        n = len(self.class_ids)
        self.fg_inter = torch.zeros(n, dtype=torch.float64)
        self.fg_union = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.long)
        self.fb_inter = torch.zeros(2, dtype=torch.float64)
        self.fb_union = torch.zeros(2, dtype=torch.float64)
        self.episode_fg_iou = []
        self._ep_class: list = []
        self._ep_query: list = []
        self._ep_inter: list = []
        self._ep_union: list = []

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_index, query=None) -> None:
        """Add episodes: ``pred``/``target`` ``[H, W]`` or ``[B, H, W]``; ``class_index`` int or ``[B]``;
        ``query``: the query image's name (a string, or one per episode), kept in :meth:`episode_records`."""
        inter, union = intersection_and_union(pred, target, 2, self.ignore_index)
        if inter.dim() == 1:
            inter, union = inter[None], union[None]
        ci = torch.as_tensor(class_index, dtype=torch.long).reshape(-1).cpu()
        if ci.numel() != inter.shape[0]:
            raise ValueError(f"class_index: expected {inter.shape[0]} entries (one per episode), got {ci.numel()}")
        if bool(((ci < 0) | (ci >= len(self.class_ids))).any()):
            raise ValueError(f"class_index: values must be in 0..{len(self.class_ids) - 1}, got {ci.tolist()}")
        queries = [query] * ci.numel() if query is None or isinstance(query, str) else [str(q) for q in query]
        if len(queries) != ci.numel():
            raise ValueError(f"query: expected {ci.numel()} names (one per episode), got {len(queries)}")
        self._ep_class += [self.class_ids[i] for i in ci.tolist()]
        self._ep_query += queries
        self._ep_inter += [int(x) for x in inter[:, 1].tolist()]
        self._ep_union += [int(x) for x in union[:, 1].tolist()]
        inter, union = inter.cpu().double(), union.cpu().double()
        self.fg_inter.index_add_(0, ci, inter[:, 1])
        self.fg_union.index_add_(0, ci, union[:, 1])
        self.counts.index_add_(0, ci, torch.ones_like(ci))
        self.fb_inter += inter.sum(0)
        self.fb_union += union.sum(0)
        if self.keep_episodes:
            for i, u in zip(inter[:, 1].tolist(), union[:, 1].tolist()):
                self.episode_fg_iou.append(i / u if u > 0 else 1.0)

    @property
    def episodes(self) -> int:
        return int(self.counts.sum())

    def episode_records(self) -> Dict[str, list]:
        """Every episode so far, in order, as columns: ``{'class': class ids, 'query': query image names
        (None where not given), 'inter': foreground intersections, 'union': foreground unions}`` (pixels).
        ``IoU_c = Σ inter / Σ union`` over the episodes of class ``c`` is the class IoU of :meth:`compute`."""
        return {"class": list(self._ep_class), "query": list(self._ep_query), "inter": list(self._ep_inter),
                "union": list(self._ep_union)}

    def compute(self) -> Dict[str, object]:
        """``{'miou', 'fbiou', 'class_iou': {class_id: iou}, 'fg_iou', 'bg_iou', 'episodes', 'episodes_per_class'
        [, 'episode_miou']}`` (fractions; NaN for classes without episodes)."""
        iou = self.fg_inter / (self.fg_union + EPS)
        seen = self.counts > 0
        class_iou = {c: (float(iou[i]) if bool(seen[i]) else math.nan) for i, c in enumerate(self.class_ids)}
        missing = [c for i, c in enumerate(self.class_ids) if not bool(seen[i])]
        if missing and bool(seen.any()):
            warnings.warn(f"FewShotIoU: classes {missing} received no episode; mIoU averages the other "
                          f"{int(seen.sum())} classes", RuntimeWarning, stacklevel=2)
        miou = float(iou[seen].mean()) if bool(seen.any()) else math.nan
        fb = self.fb_inter / (self.fb_union + EPS)
        out = {
            "miou": miou, "fbiou": float(fb.mean()) if self.episodes else math.nan,
            "bg_iou": float(fb[0]), "fg_iou": float(fb[1]), "class_iou": class_iou,
            "episodes": self.episodes, "episodes_per_class": {c: int(n) for c, n in zip(self.class_ids, self.counts)},
        }
        if self.keep_episodes:
            e = self.episode_fg_iou
            out["episode_miou"] = sum(e) / len(e) if e else math.nan
        return out
