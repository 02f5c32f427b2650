"""Support masks: resizing to the feature size, empty-shot handling, masked average pooling.

Conventions shared by all dcm ops
---------------------------------
* A support mask holds values in ``[0, 1]`` (soft or binary) or the label convention
  ``{0, 1, 255}``; 255 means *ignore* and counts as background for prototypes (as PFENet's
  ``s_y == 1``).
* Masks of any resolution are resized to the feature size bilinearly with
  ``align_corners=True`` (PFENet), after 255 has been mapped to 0.
* **Empty foreground.** A shot is *empty* when its resized mask is all zero. Empty shots are left
  out of every average over shots as long as one shot of the sample has foreground. When *every*
  shot of a sample is empty, the whole support image is treated as foreground (masked pooling gives
  the whole-image average; the dynamic convolution uses the whole-image average as its single
  foreground vector), and :class:`dcm.EmptyForegroundWarning` is issued once per process.
* **Non-finite features.** A position the (resized) mask excludes never reaches an output: ops select
  with ``torch.where`` rather than multiply by 0 (NaN·0 = NaN), so a NaN / Inf there changes nothing,
  forward or backward. Non-finite values at included positions propagate. A NaN *mask* value is an
  error (``ValueError`` naming the argument), not an empty mask.

The reasons for these rules: docs/CONVENTIONS.md#masks, #mask-resizing, #empty-foreground, #non-finite.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .. import _check

__all__ = ["prepare_mask", "masked_average_pool", "shot_weights"]


def prepare_mask(mask: torch.Tensor, size: Tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""Map 255 to background and resize masks bilinearly (``align_corners=True``) to ``size``.

    Args:
        mask: ``Tensor[B, K, h, w]`` (or any ``[..., h, w]``) with values in ``[0, 1]`` or ``{0, 1, 255}``;
            bool, integer or floating.
        size: target ``(H, W)``.
        dtype: floating dtype of the result; default ``mask.dtype`` if floating, else float32.

    Returns:
        ``Tensor[..., H, W]`` of ``dtype`` with values in ``[0, 1]``.

    Example:
        >>> m = torch.tensor([[[[0, 1], [255, 1]]]])
        >>> prepare_mask(m, (2, 2))
        tensor([[[[0., 1.],
                  [0., 1.]]]])
    """
    if dtype is None:
        dtype = mask.dtype if mask.is_floating_point() else torch.float32
    m = mask.to(dtype) if mask.dtype != torch.bool else mask.to(dtype)
    m = torch.where(m == 255, torch.zeros((), dtype=dtype, device=m.device), m)
    if tuple(m.shape[-2:]) != tuple(size):
        lead = m.shape[:-2]
        if m.numel() == 0:  # batch 0 (interpolate rejects empty inputs)
            return m.new_zeros(*lead, *size)
        m = F.interpolate(m.reshape(1, -1, *m.shape[-2:]), size=tuple(size), mode="bilinear", align_corners=True)
        m = m.reshape(*lead, *size)
    return m


def shot_weights(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-shot averaging weights and the all-empty flag for resized masks ``Tensor[B, K, H, W]``.

    Returns:
        ``(weights[B, K], all_empty[B])``: weights are 1/(number of non-empty shots) on the non-empty
        shots and 0 on empty ones; for a sample whose shots are all empty, ``all_empty`` is True and
        the weights are 1/K on every shot (each shot then uses its fallback).

    Example:
        >>> m = torch.zeros(1, 3, 2, 2); m[0, 0, 0, 0] = 1; m[0, 2] = 0.5
        >>> shot_weights(m)[0]
        tensor([[0.5000, 0.0000, 0.5000]])
    """
    nonempty = mask.flatten(2).amax(-1) > 0  # [B, K]
    all_empty = ~nonempty.any(1)
    use = nonempty | all_empty[:, None]
    w = use.to(mask.dtype)
    return w / w.sum(1, keepdim=True), all_empty


def masked_average_pool(
    feat: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 5e-4,
    empty: str = "zero",
) -> torch.Tensor:
    r"""Masked average pooling ("Weighted_GAP" of PFENet): ``Σ f·m / (Σ m + eps)`` per shot.

    Args:
        feat: ``Tensor[B, K, C, H, W]`` or ``Tensor[B, C, H, W]``.
        mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``, any resolution, values in ``[0, 1]`` or
            ``{0, 1, 255}`` (resized with :func:`prepare_mask`).
        eps: ``>= 0``, added to the mask area (PFENet: 0.0005).
        empty: ``"zero"`` (PFENet: an all-zero mask gives a zero prototype, for any ``eps``, 0
            included) or ``"mean"`` (an all-zero mask gives the whole-image average).

    Returns:
        ``Tensor[B, K, C]`` (or ``Tensor[B, C]`` for 4-D ``feat``), in ``feat.dtype``. Positions
        where the resized mask is 0 never reach it (NaN / Inf there included).

    Example:
        >>> f = torch.arange(4.).reshape(1, 1, 2, 2)
        >>> masked_average_pool(f, torch.tensor([[[1, 0], [0, 1]]]), eps=0.0)
        tensor([[1.5000]])
    """
    squeeze = isinstance(feat, torch.Tensor) and feat.dim() == 4
    feat, mask = _check.support_and_mask("feat", feat, "mask", mask)
    proto = _masked_average_pool(feat, mask, _check.nonneg_eps("eps", eps), _check.one_of("empty", empty, ("zero", "mean")))
    return proto[:, 0] if squeeze else proto


def _masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float, empty: str) -> torch.Tensor:
    """:func:`masked_average_pool` on checked ``feat[B, K, C, H, W]``, ``mask[B, K, h, w]`` -> ``[B, K, C]``."""
    H, W = feat.shape[-2:]
    m = prepare_mask(mask, (H, W), dtype=feat.dtype)
    area = m.sum((-2, -1))  # [B, K]
    mk = m[:, :, None]
    num = torch.where(mk > 0, feat * mk, 0.0).sum((-2, -1))  # excluded positions never reach it (NaN·0 = NaN)
    den = area[..., None] + eps
    proto = num / torch.where(den > 0, den, 1.0)  # eps = 0 and an empty mask: 0 / 1, the zero prototype
    if empty == "mean":
        proto = torch.where((area > 0)[..., None], proto, feat.mean((-2, -1)))
    return proto
