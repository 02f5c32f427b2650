"""Support activation (DPCN §3.3, Eq. 1): window-based region matching between support and query.

For a window ``(dh, dw)`` with offsets ``δ`` (``|δ_h| ≤ dh//2``, ``|δ_w| ≤ dw//2``), support
position ``p`` and query position ``r``::

    A(r) = max_p  1/(dh·dw) · Σ_δ  cos( s(p+δ), q(r+δ) )

with ``s = x_s ⊗ M_s`` (masked support), zero vectors outside the maps ("same" zero padding, as
``unfold``), and ``cos(a, b) = <a, b> / (max(|a|, eps) · max(|b|, eps))`` (0 for zero vectors).
The map is then min-max normalised per image: ``(A - min) / (max - min + eps)``.

Exact, efficient evaluation: since every term is a dot product of per-position unit vectors,
``Σ_δ cos(s(p+δ), q(r+δ)) = Σ_δ G[p+δ, r+δ]`` with the single Gram matrix
``G = ŝᵀ q̂ ∈ R^{HsWs × HqWq}`` shared by all windows. Each window is then a sum of diagonally
shifted slices of ``G`` followed by a max over ``p``; the ``dh·dw × HsWs × HqWq`` correlation tensor
of the paper is never formed. ``chunk_size`` bounds memory by processing query rows in bands
(with the halo rows the windows need), exactly.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _check, config
from .masks import prepare_mask, shot_weights

__all__ = ["support_activation", "support_activation_raw", "normalize_minmax"]


def normalize_minmax(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-map min-max normalisation over the last two dims: ``(x - min) / (max - min + eps)``.

    Example:
        >>> normalize_minmax(torch.tensor([[1., 3.], [2., 5.]]), eps=0.0)
        tensor([[0.0000, 0.5000],
                [0.2500, 1.0000]])
    """
    lo = maps.amin((-2, -1), keepdim=True)
    hi = maps.amax((-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo + eps)


def _window_sum_max(g: torch.Tensor, win: Tuple[int, int], rows: Tuple[int, int], ext0: int, Hq: int) -> torch.Tensor:
    """Σ_δ G[p+δ, r+δ] over the window, then max over p, for query rows ``rows`` (absolute).

    ``g``: ``[N, Hs, Ws, E, Wq]`` Gram slices for query rows ``[ext0, ext0 + E)``.
    Returns ``[N, r1 - r0, Wq]`` (the window sum, not yet divided by ``dh·dw``).
    """
    N, Hs, Ws, _, Wq = g.shape
    r0, r1 = rows
    ph, pw = win[0] // 2, win[1] // 2
    acc = g.new_zeros(N, Hs, Ws, r1 - r0, Wq)
    for di in range(-ph, ph + 1):
        h0, h1 = max(0, -di), min(Hs, Hs - di)
        a0, a1 = max(r0, -di), min(r1, Hq - di)
        if h0 >= h1 or a0 >= a1:
            continue
        for dj in range(-pw, pw + 1):
            w0, w1 = max(0, -dj), min(Ws, Ws - dj)
            c0, c1 = max(0, -dj), min(Wq, Wq - dj)
            if w0 >= w1 or c0 >= c1:
                continue
            acc[:, h0:h1, w0:w1, a0 - r0 : a1 - r0, c0:c1] += g[
                :, h0 + di : h1 + di, w0 + dj : w1 + dj, a0 + di - ext0 : a1 + di - ext0, c0 + dj : c1 + dj
            ]
    return acc.amax(dim=(1, 2))


def _raw_torch(s_hat: torch.Tensor, q_hat: torch.Tensor, wins, chunk_size: int | None) -> torch.Tensor:
    B, K, C, Hs, Ws = s_hat.shape
    Hq, Wq = q_hat.shape[-2:]
    s_flat = s_hat.permute(0, 1, 3, 4, 2).reshape(B, K * Hs * Ws, C)
    halo = max(w[0] // 2 for w in wins)
    step = Hq if chunk_size is None else chunk_size
    bands = []
    for r0 in range(0, Hq, step):
        r1 = min(Hq, r0 + step)
        e0, e1 = max(0, r0 - halo), min(Hq, r1 + halo)
        g = torch.bmm(s_flat, q_hat[:, :, e0:e1].reshape(B, C, -1))  # [B, K·Hs·Ws, E·Wq]
        g = g.reshape(B * K, Hs, Ws, e1 - e0, Wq)
        bands.append(torch.stack([_window_sum_max(g, w, (r0, r1), e0, Hq) / (w[0] * w[1]) for w in wins], 1))
    raw = bands[0] if len(bands) == 1 else torch.cat(bands, dim=2)
    return raw.reshape(B, K, len(wins), Hq, Wq)


def support_activation_raw(
    query: torch.Tensor,
    support: torch.Tensor,
    windows: Sequence[Tuple[int, int]] = ((5, 1), (3, 3), (1, 5)),
    eps: float = 1e-7,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Un-normalised activations ``max_p mean_δ cos`` per shot: ``Tensor[B, K, nW, Hq, Wq]``.

    ``support`` must already be masked (``Tensor[B, K, C, Hs, Ws]``, or ``Tensor[B, C, Hs, Ws]`` for
    K = 1, with the query's ``B`` and ``C``); ``query`` is ``Tensor[B, C, Hq, Wq]``. Computed in at least
    float32 (matmuls follow autocast). See :func:`support_activation` for the masked, normalised,
    shot-averaged maps.
    """
    query = _check.query("query", query)
    support = _check.support("support", support, batch=query.shape[0], channels=query.shape[1])
    _check.same_device("support", support, "query", query)
    return _support_activation_raw(query, support, _check.windows("windows", windows), eps, _chunk_size("chunk_size", chunk_size))


def _chunk_size(name: str, chunk_size) -> int | None:
    return _check.positive_int(name, chunk_size, or_none=True)


def _support_activation_raw(query: torch.Tensor, support: torch.Tensor, wins: Tuple[Tuple[int, int], ...], eps: float,
                            chunk_size: int | None) -> torch.Tensor:
    """:func:`support_activation_raw` on checked inputs."""
    fast = _fast_path(query, support, None, chunk_size)
    if fast is not None:
        return fast.sam_raw(query, support, None, wins, eps)
    acc = torch.promote_types(query.dtype, torch.float32)
    s_hat = F.normalize(support.to(acc), dim=2, eps=eps)
    q_hat = F.normalize(query.to(acc), dim=1, eps=eps)
    return _raw_torch(s_hat, q_hat, wins, chunk_size)


def _fast_path(query: torch.Tensor, support: torch.Tensor, mask, chunk_size):
    """The Triton module when it handles these inputs (CUDA, no ``chunk_size``), else ``None``."""
    if chunk_size is not None or config.resolve_backend(query, "support_activation") != "triton":
        return None
    from ..kernels import support_activation as _k

    return _k if _k.supported(query, support, mask) else None


def support_activation(
    query: torch.Tensor,
    support: torch.Tensor,
    support_mask: torch.Tensor,
    windows: Sequence[Tuple[int, int]] = ((5, 1), (3, 3), (1, 5)),
    eps: float = 1e-7,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Activation maps of the support object in the query, one per window (DPCN SAM).

    Args:
        query: high-level query features ``Tensor[B, C, Hq, Wq]``.
        support: high-level support features ``Tensor[B, K, C, Hs, Ws]`` or ``Tensor[B, C, Hs, Ws]``;
            ``(Hs, Ws)`` may differ from ``(Hq, Wq)``.
        support_mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``, any resolution, values in
            ``[0, 1]`` or ``{0, 1, 255}`` (255 = background). Resized bilinearly to ``(Hs, Ws)``;
            cosine is scale-invariant, so any positive value counts as full foreground.
        windows: odd ``(dh, dw)`` windows; ``((1, 1),)`` gives PFENet's prior mask.
        eps: cosine and normalisation epsilon.
        chunk_size: process this many query rows at a time (bounds memory to
            ``B·K·Hs·Ws·(chunk_size + dh - 1)·Wq`` elements); ``None`` = all rows at once. Setting it
            selects the PyTorch path (the Triton path's memory is ``B·K·Hs·Ws·Hq·Wq`` float32).

    Returns:
        ``Tensor[B, nW, Hq, Wq]`` in ``[0, 1]``, ``query.dtype``: per-shot maps min-max normalised,
        then averaged over the shots that have foreground. If no shot has foreground, the whole
        support image is used (with :class:`dcm.EmptyForegroundWarning` once). Support positions
        where the resized mask is 0 are zero vectors whatever their values (NaN / Inf included).
        ``B = 0`` gives an empty ``Tensor[0, nW, Hq, Wq]``.

    Example:
        >>> q, s = torch.rand(2, 8, 6, 7), torch.rand(2, 3, 8, 5, 5)
        >>> a = support_activation(q, s, torch.ones(2, 3, 5, 5))
        >>> tuple(a.shape), bool(a.min() >= 0), bool(a.max() <= 1)
        ((2, 3, 6, 7), True, True)
    """
    query, support, support_mask = _check.episode(query, support, support_mask)
    return _support_activation(query, support, support_mask, _check.windows("windows", windows), eps,
                               _chunk_size("chunk_size", chunk_size))


def _support_activation(query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, wins: Tuple[Tuple[int, int], ...],
                        eps: float, chunk_size: int | None) -> torch.Tensor:
    """:func:`support_activation` on checked inputs (:func:`dcm._check.episode`), windows and chunk size."""
    B, Hs, Ws = support.shape[0], support.shape[3], support.shape[4]
    if B == 0:  # empty outputs, still connected to the inputs' graphs (the sums of empty tensors are 0)
        return query.new_zeros((0, len(wins)) + tuple(query.shape[-2:])) + (query.sum() + support.sum()) * 0
    acc = torch.promote_types(query.dtype, torch.float32)
    m = prepare_mask(support_mask, (Hs, Ws), dtype=acc)
    weights, all_empty = shot_weights(m)
    _check.warn_if_empty(all_empty, "support_activation")
    m = torch.where(all_empty[:, None, None, None], torch.ones_like(m), m)
    keep = m[:, :, None] > 0  # excluded positions are zero vectors whatever they hold (NaN·0 = NaN)
    fast = _fast_path(query, support, m, chunk_size)
    if fast is not None:  # masks and normalises inside its prep kernel (no fp32 copy of the support)
        raw = fast.sam_raw(query, torch.where(keep, support, 0.0), m, wins, eps)
    else:
        raw = _support_activation_raw(query, torch.where(keep, support.to(acc) * m[:, :, None], 0.0), wins, eps, chunk_size)
    maps = normalize_minmax(raw, eps)
    return (maps * weights[:, :, None, None, None]).sum(1).to(query.dtype)
