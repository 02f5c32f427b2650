"""Feature filtering (DPCN §3.4, Eq. 2–4): refine the pseudo mask and filter the query feature."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _check
from .masks import _masked_average_pool, prepare_mask, shot_weights

__all__ = ["FilterOutput", "support_prototype", "feature_filtering"]


class FilterOutput(NamedTuple):
    """Outputs of the feature filtering module."""

    prototype: torch.Tensor  #: ``Tensor[B, C]``, the support prototype ``p`` (Eq. 2)
    refined_mask: torch.Tensor  #: ``Tensor[B, 1, H, W]`` in ``(0, 1)``, ``M^r_pse`` (Eq. 3)
    filtered: torch.Tensor  #: ``Tensor[B, C, H, W]``, ``x̃_q = x_q ⊗ M^r + x_q`` (Eq. 4)


def support_prototype(support: torch.Tensor, support_mask: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    r"""Masked average pooling of the support (Eq. 2), averaged over the shots that have foreground.

    Args:
        support: ``Tensor[B, K, C, H, W]`` or ``Tensor[B, C, H, W]``.
        support_mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``, any resolution.
        eps: PFENet's 0.0005 added to the mask area (``>= 0``).

    Returns:
        ``Tensor[B, C]``. A sample whose shots are all empty gets the whole-image average
        (with :class:`dcm.EmptyForegroundWarning` once). Positions where the resized mask is 0, and
        empty shots of a sample with foreground, never reach it (NaN / Inf there included).

    Example:
        >>> s = torch.zeros(1, 2, 3, 2, 2); s[0, 0] += 1.0; s[0, 1] += 3.0
        >>> m = torch.zeros(1, 2, 2, 2); m[0, 0] = 1   # shot 1 is empty: left out of the average
        >>> support_prototype(s, m, eps=0.0)
        tensor([[1., 1., 1.]])
    """
    support, support_mask = _check.support_and_mask("support", support, "support_mask", support_mask)
    return _support_prototype(support, support_mask, _check.nonneg_eps("eps", eps))


def _support_prototype(support: torch.Tensor, support_mask: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`support_prototype` on checked ``support[B, K, C, H, W]``, ``support_mask[B, K, h, w]`` and ``eps``."""
    H, W = support.shape[-2:]
    protos = _masked_average_pool(support, support_mask, eps, "mean")  # [B, K, C]
    weights, all_empty = shot_weights(prepare_mask(support_mask, (H, W), dtype=support.dtype))
    _check.warn_if_empty(all_empty, "support_prototype")
    w = weights[..., None]
    return torch.where(w > 0, protos * w, 0.0).sum(1)  # an empty shot's whole-image mean is left out, even if NaN


def feature_filtering(
    query: torch.Tensor,
    prototype: torch.Tensor,
    pseudo_mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> FilterOutput:
    r"""Functional twin of :class:`dcm.FeatureFiltering` given the prototype and the conv parameters.

    ``M^r = σ(conv((x_q ⊗ M^0) ⊕ x_p))`` and ``x̃_q = (x_q ⊗ M^r) ⊕ x_q`` with ``x_p`` the prototype
    broadcast over ``H×W`` (Eq. 3–4).

    Args:
        query: ``Tensor[B, C, H, W]`` (mid-level query feature ``x_q``).
        prototype: ``Tensor[B, C]``.
        pseudo_mask: initial pseudo mask ``Tensor[B, 1, h, w]`` (or ``[B, h, w]``), any resolution,
            resized bilinearly (``align_corners=True``) to ``(H, W)``.
        weight: conv weight ``Tensor[1, C, k, k]`` (odd ``k``, "same" padding); bias ``Tensor[1]``.

    Example:
        >>> out = feature_filtering(torch.randn(2, 4, 5, 5), torch.randn(2, 4), torch.rand(2, 1, 3, 3), torch.randn(1, 4, 3, 3))
        >>> tuple(out.refined_mask.shape), tuple(out.filtered.shape)
        ((2, 1, 5, 5), (2, 4, 5, 5))
    """
    query = _check.query("query", query)
    B, C = query.shape[:2]
    _check.tensor("prototype", prototype)
    if tuple(prototype.shape) != (B, C):
        raise ValueError(f"prototype: expected shape (B={B}, C={C}), got {tuple(prototype.shape)}")
    pseudo_mask = _check_pseudo_mask(pseudo_mask, query)
    _check.rank("weight", weight, (4,), f"(1, C={C}, k, k)")
    if weight.shape[0] != 1 or weight.shape[1] != C:
        raise ValueError(f"weight: expected shape (1, C={C}, k, k), got {tuple(weight.shape)}")
    _check.odd_size("weight kernel size", (int(weight.shape[2]), int(weight.shape[3])))
    return _feature_filtering(query, prototype, pseudo_mask, weight, bias)


def _check_pseudo_mask(pseudo_mask, query: torch.Tensor) -> torch.Tensor:
    """A pseudo mask ``Tensor[B, 1, h, w]`` or ``Tensor[B, h, w]`` for a checked ``query[B, C, H, W]`` -> 4-D."""
    B = query.shape[0]
    _check.tensor("pseudo_mask", pseudo_mask)
    _check.rank("pseudo_mask", pseudo_mask, (3, 4), f"(B={B}, 1, h, w) or (B={B}, h, w)")
    if pseudo_mask.dim() == 3:
        pseudo_mask = pseudo_mask.unsqueeze(1)
    if pseudo_mask.shape[0] != B or pseudo_mask.shape[1] != 1:
        raise ValueError(f"pseudo_mask: expected shape (B={B}, 1, h, w), got {tuple(pseudo_mask.shape)}")
    _check.same_device("pseudo_mask", pseudo_mask, "query", query)
    return pseudo_mask


def _feature_filtering(query: torch.Tensor, prototype: torch.Tensor, pseudo_mask: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> FilterOutput:
    """:func:`feature_filtering` on checked inputs (``pseudo_mask`` 4-D, ``weight`` of odd size)."""
    H, W = query.shape[-2:]
    kh, kw = weight.shape[-2:]
    pm = pseudo_mask.to(query.dtype)
    if tuple(pm.shape[-2:]) != (H, W):
        pm = F.interpolate(pm, size=(H, W), mode="bilinear", align_corners=True)
    x = query * pm + prototype[:, :, None, None].to(query.dtype)
    refined = torch.sigmoid(F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2)))
    return FilterOutput(prototype, refined, query * refined + query)
