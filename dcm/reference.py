"""Slow, literal transcriptions of the paper's equations: the oracles dcm is tested against.

These follow the text of DPCN as directly as possible (per-sample Python loops, boolean indexing,
``unfold`` and the full ``dh·dw × HsWs × HqWq`` correlation tensor of SAM). They are meant for
tests and for the speed benchmark's "paper-literal" column, never for training. They share the
conventions of :mod:`dcm.functional` (mask resizing, empty-shot handling, cosine epsilon, support
positions outside the mask never read), which are documented there.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._compat import renamed_kwarg
from .functional.masks import prepare_mask

__all__ = [
    "cosine",
    "support_activation_literal",
    "foreground_pool_loop",
    "dynamic_conv_loop",
    "dynamic_convolution_loop",
    "feature_filtering_literal",
]


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``<a, b> / (max(|a|, eps) · max(|b|, eps))`` along dim 0 of ``a [C, P]`` and ``b [C, R]`` -> ``[P, R]``."""
    return (a.T @ b) / (a.norm(dim=0).clamp_min(eps)[:, None] * b.norm(dim=0).clamp_min(eps)[None, :])


def _shot_weights_loop(m: torch.Tensor):
    B, K = m.shape[:2]
    w = torch.zeros(B, K, dtype=m.dtype)
    empty = []
    for b in range(B):
        nonempty = [k for k in range(K) if m[b, k].max() > 0]
        empty.append(not nonempty)
        use = nonempty or list(range(K))
        for k in use:
            w[b, k] = 1.0 / len(use)
    return w, empty


def support_activation_literal(
    query: torch.Tensor,
    support: torch.Tensor,
    support_mask: torch.Tensor,
    windows: Sequence[Tuple[int, int]] = ((5, 1), (3, 3), (1, 5)),
    eps: float = 1e-7,
) -> torch.Tensor:
    """SAM exactly as Eq. 1 and Fig. 3: masked support, window extraction by ``unfold``, the full
    ``Corr ∈ R^{dh·dw × HsWs × HqWq}`` of per-offset cosines, mean over offsets, max over support
    positions, min-max normalisation; per-shot maps averaged over the non-empty shots.

    query ``[B, C, Hq, Wq]``, support ``[B, K, C, Hs, Ws]``, mask ``[B, K, h, w]`` -> ``[B, nW, Hq, Wq]``.
    """
    B, C, Hq, Wq = query.shape
    K, Hs, Ws = support.shape[1], support.shape[3], support.shape[4]
    m = prepare_mask(support_mask, (Hs, Ws), dtype=query.dtype)
    w, empty = _shot_weights_loop(m)
    out = torch.zeros(B, len(windows), Hq, Wq, dtype=query.dtype)
    for b in range(B):
        for k in range(K):
            if w[b, k] == 0:  # an empty shot of a sample with foreground: not averaged in
                continue
            mk = torch.ones_like(m[b, k]) if empty[b] else m[b, k]
            keep = mk > 0
            xs = torch.zeros_like(support[b, k])
            xs[:, keep] = support[b, k][:, keep] * mk[keep]  # x_s ⊗ M_s; positions outside the mask: zero vectors
            xs = xs[None]
            for i, (dh, dw) in enumerate(windows):
                pad = (dh // 2, dw // 2)
                Rs = F.unfold(xs, (dh, dw), padding=pad).reshape(C, dh * dw, Hs * Ws)
                Rq = F.unfold(query[b][None], (dh, dw), padding=pad).reshape(C, dh * dw, Hq * Wq)
                corr = torch.stack([cosine(Rs[:, o], Rq[:, o], eps) for o in range(dh * dw)])  # [dh·dw, HsWs, HqWq]
                act = corr.mean(0).max(0).values.reshape(Hq, Wq)  # Mean(0) & Max(1)
                act = (act - act.min()) / (act.max() - act.min() + eps)
                out[b, i] += w[b, k] * act
    return out


@renamed_kwarg("threshold", "fg_threshold")
def foreground_pool_loop(feat: torch.Tensor, mask: torch.Tensor, bins: Sequence[int], fg_threshold: float = 0.5):
    """Per-sample loop: boolean indexing of the foreground of every shot, concatenation, and
    ``F.adaptive_avg_pool1d`` to each number of bins. feat ``[B, K, C, H, W]``, mask ``[B, K, h, w]``."""
    B, K, C, H, W = feat.shape
    m = prepare_mask(mask, (H, W), dtype=feat.dtype)
    outs = [[] for _ in bins]
    for b in range(B):
        vecs = []
        for k in range(K):
            mk = m[b, k]
            sel = mk > fg_threshold
            if not sel.any() and mk.max() > 0:
                sel = mk >= mk.max()
            vecs.append(feat[b, k][:, sel])  # [C, N_k], raster order
        p_fg = torch.cat(vecs, dim=1)
        if p_fg.shape[1] == 0:
            p_fg = feat[b].permute(1, 0, 2, 3).reshape(C, -1).mean(1, keepdim=True)
        for j, s in enumerate(bins):
            outs[j].append(F.adaptive_avg_pool1d(p_fg[None], s)[0])
    return tuple(torch.stack(o) for o in outs)


def dynamic_conv_loop(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel ``F.conv2d`` with "same" padding: x ``[B, C, H, W]``, weight ``[B, C, kh, kw]``."""
    B, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    out = torch.empty_like(x)
    for b in range(B):
        for c in range(C):
            out[b, c] = F.conv2d(x[b, c][None, None], weight[b, c][None, None], padding=(kh // 2, kw // 2))[0, 0]
    return out


@renamed_kwarg("threshold", "fg_threshold")
def dynamic_convolution_loop(
    query: torch.Tensor,
    support: torch.Tensor,
    support_mask: torch.Tensor,
    generators: Mapping,
    kernel_size: int = 5,
    variants: Sequence[str] = ("v", "h", "s"),
    square_source: str = "serial",
    fg_threshold: float = 0.5,
    kernel_norm=None,
):
    """DCM per sample (Eq. 5–8): foreground by boolean indexing, pooling, generators, per-sample conv.

    ``kernel_norm`` (``None``, ``"l1"``, ``"l2"``): each kernel of each channel divided by the sum of its
    absolute taps / the square root of the sum of its squared taps, one channel at a time."""
    S = kernel_size
    outs = {v: [] for v in variants}
    for b in range(query.shape[0]):
        p_s, p_s2 = foreground_pool_loop(support[b : b + 1], support_mask[b : b + 1], (S, S * S), fg_threshold)
        ker = {}
        if "v" in generators:
            kv = generators["v"](p_s)
            ker["v"] = kv.reshape(1, -1, S, 1)
        if "h" in generators:
            kh = generators["h"](p_s)
            ker["h"] = kh.reshape(1, -1, 1, S)
        if "s" in variants:
            src = F.adaptive_avg_pool1d(torch.cat([kv, kh], 2), S * S) if square_source == "serial" else p_s2
            ker["s"] = generators["s"](src).reshape(1, -1, S, S)
        for v in variants:
            k = ker[v]
            if kernel_norm is not None:
                k = k.clone()
                for c in range(k.shape[1]):
                    taps = k[0, c]
                    n = taps.abs().sum() if kernel_norm == "l1" else (taps * taps).sum().sqrt()
                    k[0, c] = taps / torch.clamp(n, min=1e-12)
            outs[v].append(dynamic_conv_loop(query[b : b + 1], k))
    return tuple(torch.cat(outs[v]) for v in variants)


def feature_filtering_literal(query, support, support_mask, pseudo_mask, weight, bias, eps: float = 5e-4):
    """Eq. 2–4 per sample: ``p = average(x_s ⊗ R(M_s))`` (PFENet's Weighted_GAP, shots averaged over
    non-empty shots), ``M^r = σ(F((x_q ⊗ R(M^0)) ⊕ x_p))``, ``x̃_q = (x_q ⊗ M^r) ⊕ x_q``."""
    B, C, H, W = query.shape
    K, Hs, Ws = support.shape[1], support.shape[3], support.shape[4]
    m = prepare_mask(support_mask, (Hs, Ws), dtype=query.dtype)
    w, empty = _shot_weights_loop(m)
    protos, refined, filtered = [], [], []
    for b in range(B):
        p = torch.zeros(C, dtype=query.dtype)
        for k in range(K):
            if w[b, k] == 0:  # an empty shot of a sample with foreground: not averaged in
                continue
            if empty[b]:
                pk = support[b, k].mean((1, 2))
            else:
                keep = m[b, k] > 0  # positions outside the mask are never read
                pk = (support[b, k][:, keep] * m[b, k][keep]).sum(1) / (m[b, k].sum() + eps)
            p = p + w[b, k] * pk
        m0 = F.interpolate(pseudo_mask[b : b + 1], size=(H, W), mode="bilinear", align_corners=True)[0]
        x_p = p[:, None, None].expand(C, H, W)
        k = weight.shape[-1]
        mr = torch.sigmoid(F.conv2d((query[b] * m0 + x_p)[None], weight, bias, padding=k // 2))[0]
        protos.append(p)
        refined.append(mr)
        filtered.append(query[b] * mr + query[b])
    return torch.stack(protos), torch.stack(refined), torch.stack(filtered)
