"""Foreground extraction and adaptive 1-D pooling of variable-length foregrounds (DPCN Eq. 5, 6, 11).

For each sample the foreground vectors of all K shots are concatenated in raster order (shot by shot,
row-major inside a shot) into a sequence ``P_fg`` of length ``N`` (varies per sample), which is then
average-pooled to ``S`` bins with exactly :func:`torch.nn.functional.adaptive_avg_pool1d`'s bin
boundaries: bin ``i`` covers ``[floor(i·N/S), ceil((i+1)·N/S))`` (bins overlap when S does not
divide N; when N < S elements are replicated). The pooling is written as one batched matrix product
with a ``[B, S, K·H·W]`` weight matrix, with no loop over samples, no boolean indexing and no host
synchronisation.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .. import _check, config
from .._compat import renamed_kwarg
from .masks import prepare_mask

__all__ = ["foreground_selection", "foreground_pool_weights", "foreground_pool"]


@renamed_kwarg("threshold", "fg_threshold")
def foreground_selection(mask: torch.Tensor, fg_threshold: float = 0.5) -> torch.Tensor:
    """Which positions of each shot are foreground: ``Tensor[B, K, H, W]`` bool.

    Rule per shot (docs/CONVENTIONS.md#foreground-extraction): values ``> fg_threshold``; if there are
    none, the positions that reach the shot's maximum when that maximum is positive (a small object
    that bilinear resizing blurred below the threshold); if the mask is all zero, none.

    Args:
        mask: resized masks ``Tensor[B, K, H, W]`` with values in ``[0, 1]``.
        fg_threshold: foreground threshold in the open interval ``(0, 1)`` (else ``ValueError``).

    Example:
        >>> m = torch.tensor([[[[0.2, 0.3], [0.0, 0.3]]]])
        >>> foreground_selection(m).int()
        tensor([[[[0, 1],
                  [0, 1]]]], dtype=torch.int32)
    """
    return _foreground_selection(mask, _check.fg_threshold("fg_threshold", fg_threshold))


def _foreground_selection(mask: torch.Tensor, fg_threshold: float) -> torch.Tensor:
    """:func:`foreground_selection` with a checked ``fg_threshold``."""
    flat = mask.flatten(2)
    above = flat > fg_threshold
    peak = flat.amax(-1, keepdim=True)
    fallback = (flat >= peak) & (peak > 0)
    sel = torch.where(above.any(-1, keepdim=True), above, fallback)
    return sel.reshape(mask.shape)


def foreground_pool_weights(sel: torch.Tensor, bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pooling weights ``Tensor[B, bins, L]`` for a selection ``Tensor[B, L]`` (bool).

    ``W[b, i, l]`` is ``1 / |bin i|`` when position ``l`` is the ``r``-th selected position of
    sample ``b`` and ``r`` lies in bin ``i`` (adaptive_avg_pool1d boundaries), else 0. Each row sums
    to 1. A sample with no selected position gets the uniform weights ``1 / L`` in every bin (the
    whole-image average, replicated).

    Example:
        >>> sel = torch.tensor([[True, False, True, True]])
        >>> foreground_pool_weights(sel, 2)
        tensor([[[0.5000, 0.0000, 0.5000, 0.0000],
                 [0.0000, 0.0000, 0.5000, 0.5000]]])
    """
    B, L = sel.shape
    sel_i = sel.to(torch.int64)
    n = sel_i.sum(1, keepdim=True)  # [B, 1]
    rank = sel_i.cumsum(1) - 1  # rank of each selected position, [B, L]
    i = torch.arange(bins, device=sel.device)
    start = torch.div(i[None] * n, bins, rounding_mode="floor")  # [B, S]
    end = torch.div((i[None] + 1) * n + bins - 1, bins, rounding_mode="floor")
    inside = sel[:, None, :] & (rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < end[..., None])
    size = (end - start).clamp_min(1).to(dtype)
    w = inside.to(dtype) / size[..., None]
    uniform = torch.full((), 1.0 / L, dtype=dtype, device=sel.device)
    return torch.where((n > 0)[..., None], w, uniform)


@renamed_kwarg("threshold", "fg_threshold")
def foreground_pool(
    feat: torch.Tensor,
    mask: torch.Tensor,
    bins: Sequence[int] = (5, 25),
    fg_threshold: float = 0.5,
) -> Tuple[torch.Tensor, ...]:
    r"""Extract the support foreground vectors of all shots and pool them to each number of bins.

    Args:
        feat: support features ``Tensor[B, K, C, H, W]`` or ``Tensor[B, C, H, W]``; float16/bfloat16/
            float32/float64 (pooling accumulates in at least float32).
        mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``, any resolution, values in ``[0, 1]`` or
            ``{0, 1, 255}``; resized to ``(H, W)`` with :func:`prepare_mask`.
        bins: the output lengths, e.g. ``(S, S*S)``.
        fg_threshold: foreground threshold in ``(0, 1)``, see :func:`foreground_selection`.

    Returns:
        one ``Tensor[B, C, bins_i]`` per entry of ``bins`` (the prototype sequences ``p_s``,
        ``p_{s^2}``), in ``feat.dtype``. A sample with foreground in no shot gets the whole-image
        average (over all shots) in every bin, and :class:`dcm.EmptyForegroundWarning` once.
        Positions that are not selected never reach the result: a NaN / Inf there changes nothing
        (docs/CONVENTIONS.md#non-finite).

    Example:
        >>> feat = torch.arange(6.).reshape(1, 1, 1, 2, 3)
        >>> mask = torch.tensor([[[[1, 0, 1], [0, 1, 1]]]])
        >>> foreground_pool(feat, mask, bins=(2,))[0]
        tensor([[[1.0000, 4.5000]]])
    """
    feat, mask = _check.support_and_mask("feat", feat, "mask", mask)
    return _foreground_pool(feat, mask, _check.positive_ints("bins", bins), _check.fg_threshold("fg_threshold", fg_threshold))


def _foreground_pool(feat: torch.Tensor, mask: torch.Tensor, bins: Tuple[int, ...], fg_threshold: float) -> Tuple[torch.Tensor, ...]:
    """:func:`foreground_pool` on checked ``feat[B, K, C, H, W]``, ``mask[B, K, h, w]``, ``bins`` and ``fg_threshold``."""
    B, K, C, H, W = feat.shape
    acc = torch.promote_types(feat.dtype, torch.float32)
    if config.resolve_backend(feat, "foreground") == "triton":
        from ..kernels import foreground as _k

        if _k.supported(feat, bins):  # same mask resize, selection rule and bins, fused (dcm.kernels.foreground)
            outs, n = _k.foreground_pool(feat, mask, bins, fg_threshold)
            if config.data_checks_enabled(feat):
                _check.warn_if_empty(n == 0, "foreground_pool")
            return outs
    m = prepare_mask(mask, (H, W), dtype=acc)
    sel = _foreground_selection(m, fg_threshold).reshape(B, K * H * W)
    empty = ~sel.any(1)
    _check.warn_if_empty(empty, "foreground_pool")
    f = feat.to(acc).permute(0, 2, 1, 3, 4).reshape(B, C, K * H * W)
    # unselected positions must not reach the result even when non-finite (a 0 weight would give NaN·0 = NaN);
    # an empty sample uses every position (the whole-image fallback)
    f = torch.where((sel | empty[:, None])[:, None, :], f, 0.0)
    return tuple(torch.bmm(f, foreground_pool_weights(sel, s, acc).transpose(1, 2)).to(feat.dtype) for s in bins)
