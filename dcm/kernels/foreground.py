"""Triton kernels for foreground extraction + adaptive 1-D pooling to S bins (DPCN Eq. 5, 6, 11).

Twin (pure PyTorch, the oracle): :func:`dcm.functional.foreground_pool` with the ``"torch"``
backend (a ``[B, S, K·H·W]`` pooling matrix and one ``bmm`` per number of bins).

Three kernels, no host synchronisation:

* ``_fg_select_kernel`` (one program per sample) reads the resized masks ``m[B, K, H, W]`` (float32,
  from :func:`dcm.functional.masks.prepare_mask`) and applies the selection rule per shot (``> thr``;
  else ``== shot max`` when the max is positive; else none). It writes the inclusive prefix count
  ``csum`` of the selection over the concatenated shots (raster order), the rank of every selected
  position (``-1`` elsewhere) and the number ``n`` of selected positions per sample.
* ``_fg_pool_fwd_kernel`` (one program per sample, bin and channel block) computes the rank interval
  ``[start, end)`` of :func:`torch.nn.functional.adaptive_avg_pool1d` (``floor(i·n/S)``,
  ``ceil((i+1)·n/S)``), finds the position interval ``[lo, hi)`` holding those ranks by a two-level
  search of ``csum``, sums the features of the selected positions in it in float32 and divides by
  ``end − start``. All requested ``S`` in one launch. A sample with ``n = 0`` gets the whole-image
  average (all ``K·H·W`` positions) in every bin.
* ``_fg_pool_bwd_kernel`` (one program per sample, position block and channel block):
  ``dfeat[b, :, l] = Σ_i [start_i ≤ rank_l < end_i] · dout[b, :, i] / (end_i − start_i)``; the bins
  containing rank ``r`` are ``i ∈ [floor(r·S/n), ceil((r+1)·S/n) − 1]`` (at most ``⌈S/n⌉ + 1``), so
  each position visits only those; every element written once, no atomics.

Autograd: eager :class:`torch.autograd.Function`; under ``torch.compile`` the custom ops
``dcm::fg_select``, ``dcm::fg_pool`` and ``dcm::fg_pool_bwd`` (with fake implementations and a
registered autograd formula).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["foreground_pool", "supported"]

_MAX_SETS = 4
_MAX_BINS = 256


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _fg_select_kernel(m_ptr, rank_ptr, csum_ptr, n_ptr, K, HW, thr, BL: tl.constexpr):
    # one program per sample; per shot: its max, then the selection and the running prefix count
    b = tl.program_id(0).to(tl.int64)
    L = K * HW
    offs = tl.arange(0, BL)
    mb = m_ptr + b * L
    carry = tl.zeros((), dtype=tl.int32)
    for k in range(K):
        rmax = tl.full((), float("-inf"), tl.float32)
        for s in range(0, HW, BL):
            p = s + offs
            v = tl.load(mb + k * HW + p, mask=p < HW, other=float("-inf")).to(tl.float32)
            rmax = tl.maximum(rmax, tl.max(v, 0))
        use_thr = (rmax > thr).to(tl.int32)
        use_max = ((rmax <= thr) & (rmax > 0)).to(tl.int32)
        for s in range(0, HW, BL):
            p = s + offs
            valid = p < HW
            v = tl.load(mb + k * HW + p, mask=valid, other=float("-inf")).to(tl.float32)
            sel = (((v > thr).to(tl.int32) * use_thr + (v >= rmax).to(tl.int32) * use_max) > 0) & valid
            cs = tl.cumsum(sel.to(tl.int32), 0) + carry  # inclusive count up to this position
            pos = b * L + k * HW + p
            tl.store(csum_ptr + pos, cs, mask=valid)
            tl.store(rank_ptr + pos, tl.where(sel, cs - 1, -1), mask=valid)
            carry += tl.sum(sel.to(tl.int32), 0)
    tl.store(n_ptr + b, carry)


@triton.jit
def _first_index(cb, L, val, STRICT: tl.constexpr, STEP: tl.constexpr, T: tl.constexpr):
    """#{l < L : csum[l] <= val} (STRICT=False) or #{l : csum[l] < val} (STRICT=True); csum is
    non-decreasing, so this is the first index past those positions. Two-level: segment ends, then
    one segment."""
    q = tl.arange(0, T)
    qm = q * STEP < L
    last = tl.minimum(q * STEP + STEP - 1, L - 1)
    v = tl.load(cb + last, mask=qm, other=0)
    if STRICT:
        nseg = tl.sum((qm & (v < val)).to(tl.int32), 0)
    else:
        nseg = tl.sum((qm & (v <= val)).to(tl.int32), 0)
    u = nseg * STEP + tl.arange(0, STEP)
    um = u < L
    w = tl.load(cb + u, mask=um, other=0)
    if STRICT:
        cnt = tl.sum((um & (w < val)).to(tl.int32), 0)
    else:
        cnt = tl.sum((um & (w <= val)).to(tl.int32), 0)
    return tl.minimum(nseg * STEP + cnt, L)


@triton.jit
def _fg_pool_fwd_kernel(
    f_ptr, rank_ptr, csum_ptr, n_ptr, o1_ptr, o2_ptr, o3_ptr, o4_ptr,
    C, HW, L,
    S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr,
    BC: tl.constexpr, BL: tl.constexpr, STEP: tl.constexpr, T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cb = tl.program_id(2)
    c1 = S1
    c2 = S1 + S2
    c3 = S1 + S2 + S3
    S = tl.where(j < c1, S1, tl.where(j < c2, S2, tl.where(j < c3, S3, S4)))
    i = j - tl.where(j < c1, 0, tl.where(j < c2, c1, tl.where(j < c3, c2, c3)))
    n = tl.load(n_ptr + b)
    empty = n == 0
    rb = rank_ptr + b * L
    start = (i * n) // S
    end = ((i + 1) * n + S - 1) // S
    lo = _first_index(csum_ptr + b * L, L, start, False, STEP, T)
    hi = tl.minimum(_first_index(csum_ptr + b * L, L, end, True, STEP, T) + 1, L)
    # a sample without foreground: the whole-image average in every bin
    start = tl.where(empty, 0, start)
    end = tl.where(empty, L, end)
    lo = tl.where(empty, 0, lo)
    hi = tl.where(empty, L, hi)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    coff = c.to(tl.int64) * HW
    fb = f_ptr + b * C * L
    acc = tl.zeros([BC, BL], dtype=tl.float32)
    for s in range(lo, hi, BL):
        p = s + tl.arange(0, BL)
        pm = p < hi
        nv = tl.zeros([BL], dtype=tl.int32) + n
        r = tl.load(rb + p, mask=pm & (nv > 0), other=-1)
        w = ((r >= start) & (r < end)) | ((nv == 0) & pm)
        k = p // HW
        poff = k.to(tl.int64) * C * HW + (p - k * HW)
        x = tl.load(fb + coff[:, None] + poff[None, :], mask=cm[:, None] & w[None, :], other=0.0)
        acc += x.to(tl.float32)
    res = tl.sum(acc, 1) / (end - start).to(tl.float32)
    if j < S1:
        tl.store(o1_ptr + (b * C + c) * S1 + i, res.to(o1_ptr.dtype.element_ty), mask=cm)
    elif j < S1 + S2:
        tl.store(o2_ptr + (b * C + c) * S2 + i, res.to(o2_ptr.dtype.element_ty), mask=cm)
    elif j < S1 + S2 + S3:
        tl.store(o3_ptr + (b * C + c) * S3 + i, res.to(o3_ptr.dtype.element_ty), mask=cm)
    else:
        tl.store(o4_ptr + (b * C + c) * S4 + i, res.to(o4_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _bwd_set(acc, g_ptr, S: tl.constexpr, r, n, L, gc, cm, pm):
    # the bins of one bin set that contain rank r: i in [floor(r·S/n), ceil((r+1)·S/n) - 1]
    empty = n == 0
    ns = tl.maximum(n, 1)
    sel = (r >= 0) | ((r * 0 + n) == 0)
    rr = tl.maximum(r, 0)
    i_lo = tl.where(empty, 0, (rr * S) // ns)
    i_hi = tl.where(empty, S - 1, tl.minimum(((rr + 1) * S + ns - 1) // ns - 1, S - 1))
    tmax = tl.where(empty, S, tl.minimum((S + ns - 1) // ns + 1, S))
    ok = sel & pm
    for t in range(0, tmax):
        i = i_lo + t
        valid = ok & (i <= i_hi)
        start = (i * ns) // S
        end = ((i + 1) * ns + S - 1) // S
        inv = tl.where(empty, 1.0 / (L * 1.0), 1.0 / tl.maximum(end - start, 1).to(tl.float32))
        g = tl.load(g_ptr + gc[:, None] * S + i[None, :], mask=cm[:, None] & valid[None, :], other=0.0)
        acc += g.to(tl.float32) * inv[None, :]
    return acc


@triton.jit
def _fg_pool_bwd_kernel(
    g1_ptr, g2_ptr, g3_ptr, g4_ptr, rank_ptr, n_ptr, df_ptr,
    C, HW, L,
    S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr,
    BC: tl.constexpr, BL: tl.constexpr,
):
    # dfeat[b, c, l] = Σ_i [start_i ≤ rank_l < end_i] · dout[b, c, i] / (end_i − start_i)
    b = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    p = pb * BL + tl.arange(0, BL)
    pm = p < L
    n = tl.load(n_ptr + b)
    r = tl.load(rank_ptr + b * L + p, mask=pm, other=-1)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    gc = b * C + c
    acc = tl.zeros([BC, BL], dtype=tl.float32)
    acc = _bwd_set(acc, g1_ptr, S1, r, n, L, gc, cm, pm)
    if S2 > 0:
        acc = _bwd_set(acc, g2_ptr, S2, r, n, L, gc, cm, pm)
    if S3 > 0:
        acc = _bwd_set(acc, g3_ptr, S3, r, n, L, gc, cm, pm)
    if S4 > 0:
        acc = _bwd_set(acc, g4_ptr, S4, r, n, L, gc, cm, pm)
    k = p // HW
    poff = k.to(tl.int64) * C * HW + (p - k * HW)
    tl.store(df_ptr + b * C * L + c.to(tl.int64)[:, None] * HW + poff[None, :], acc.to(df_ptr.dtype.element_ty),
             mask=cm[:, None] & pm[None, :])


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _sets(bins: Sequence[int]) -> dict:
    s = list(bins) + [0] * (_MAX_SETS - len(bins))
    return dict(S1=s[0], S2=s[1], S3=s[2], S4=s[3])


def _select_launch(m: torch.Tensor, threshold: float):
    """(rank, csum, n): rank of each selected position (-1 elsewhere), inclusive prefix count, and
    the number of selected positions per sample; int32, ``[B, L]``, ``[B, L]``, ``[B]``."""
    B, K, H, W = m.shape
    L = K * H * W
    rank = torch.empty((B, L), device=m.device, dtype=torch.int32)
    csum = torch.empty((B, L), device=m.device, dtype=torch.int32)
    n = torch.empty((B,), device=m.device, dtype=torch.int32)
    if B == 0 or L == 0:
        return rank, csum, n.zero_()
    BL = min(4096, max(128, triton.next_power_of_2(H * W)))
    _fg_select_kernel[(B,)](m, rank, csum, n, K, H * W, float(threshold), BL=BL, num_warps=8 if BL >= 2048 else 4)
    return rank, csum, n


def _search_meta(L: int):
    step = max(16, triton.next_power_of_2(int(math.ceil(math.sqrt(L)))))
    return step, max(2, triton.next_power_of_2(triton.cdiv(L, step)))


def _fwd_launch(feat: torch.Tensor, rank: torch.Tensor, csum: torch.Tensor, n: torch.Tensor, bins: Sequence[int]) -> List[torch.Tensor]:
    B, K, C, H, W = feat.shape
    outs = [torch.empty((B, C, s), device=feat.device, dtype=feat.dtype) for s in bins]
    if B * C == 0:
        return outs
    BC, BL = 8, 512
    L = K * H * W
    step, t = _search_meta(L)
    o = outs + [outs[0]] * (_MAX_SETS - len(outs))
    _fg_pool_fwd_kernel[(B, sum(bins), triton.cdiv(C, BC))](
        feat, rank, csum, n, *o, C, H * W, L, BC=BC, BL=BL, STEP=step, T=t, num_warps=4, **_sets(bins)
    )
    return outs


def _bwd_launch(grads: Sequence[torch.Tensor], rank: torch.Tensor, n: torch.Tensor, feat: torch.Tensor, bins: Sequence[int]):
    B, K, C, H, W = feat.shape
    df = torch.empty(feat.shape, device=feat.device, dtype=feat.dtype)
    L = K * H * W
    if B * C * L == 0:
        return df
    BC, BL = 16, 256
    g = list(grads) + [grads[0]] * (_MAX_SETS - len(grads))
    _fg_pool_bwd_kernel[(B, triton.cdiv(L, BL), triton.cdiv(C, BC))](
        *g, rank, n, df, C, H * W, L, BC=BC, BL=BL, num_warps=4, **_sets(bins)
    )
    return df


def _grads(gs, feat, bins):
    B, _, C = feat.shape[:3]
    return [torch.zeros((B, C, s), device=feat.device, dtype=feat.dtype) if g is None else g.contiguous() for g, s in zip(gs, bins)]


# --------------------------------------------------------------------------------------------------
# eager path
# --------------------------------------------------------------------------------------------------
class _PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, rank, csum, n, bins):
        ctx.bins = tuple(bins)
        ctx.save_for_backward(feat, rank, n)
        return tuple(_fwd_launch(feat, rank, csum, n, bins))

    @staticmethod
    def backward(ctx, *gs):
        feat, rank, n = ctx.saved_tensors
        df = _bwd_launch(_grads(gs, feat, ctx.bins), rank, n, feat, ctx.bins)
        return df, None, None, None, None


# --------------------------------------------------------------------------------------------------
# torch.compile path: custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("dcm::fg_select", mutates_args=())
def _fg_select_op(m: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _select_launch(m.contiguous(), threshold)


@_fg_select_op.register_fake
def _(m, threshold):
    B, K, H, W = m.shape
    i32 = torch.int32
    return m.new_empty((B, K * H * W), dtype=i32), m.new_empty((B, K * H * W), dtype=i32), m.new_empty((B,), dtype=i32)


@torch.library.custom_op("dcm::fg_pool", mutates_args=())
def _fg_pool_op(feat: torch.Tensor, rank: torch.Tensor, csum: torch.Tensor, n: torch.Tensor, bins: List[int]) -> List[torch.Tensor]:
    return _fwd_launch(feat.contiguous(), rank, csum, n, bins)


@_fg_pool_op.register_fake
def _(feat, rank, csum, n, bins):
    B, K, C = feat.shape[:3]
    return [feat.new_empty((B, C, s)) for s in bins]


@torch.library.custom_op("dcm::fg_pool_bwd", mutates_args=())
def _fg_pool_bwd_op(grads: List[torch.Tensor], rank: torch.Tensor, n: torch.Tensor, feat: torch.Tensor, bins: List[int]) -> torch.Tensor:
    return _bwd_launch([g.contiguous() for g in grads], rank, n, feat, bins)


@_fg_pool_bwd_op.register_fake
def _(grads, rank, n, feat, bins):
    return feat.new_empty(feat.shape)


def _setup_context(ctx, inputs, output):
    feat, rank, csum, n, bins = inputs
    ctx.bins = list(bins)
    ctx.save_for_backward(feat, rank, n)


def _backward(ctx, grads):
    feat, rank, n = ctx.saved_tensors
    B, _, C = feat.shape[:3]
    gs = [torch.zeros((B, C, s), device=feat.device, dtype=feat.dtype) if g is None else g for g, s in zip(grads, ctx.bins)]
    return torch.ops.dcm.fg_pool_bwd(gs, rank, n, feat, ctx.bins), None, None, None, None


_fg_pool_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# entry point used by dcm.functional.foreground
# --------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    from . import interpreted

    return interpreted()


def supported(feat: torch.Tensor, bins: Sequence[int]) -> bool:
    """Whether the kernels handle these inputs (else the caller uses the pooling-matrix ``bmm``)."""
    if not (feat.is_cuda or _interpreted()) or feat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not 1 <= len(bins) <= _MAX_SETS or sum(bins) > _MAX_BINS:
        return False
    B, K, C, H, W = feat.shape
    L = K * H * W
    return L > 0 and (L + 1) * (max(bins) + 1) < 2**31 and B * C < 2**31


def foreground_pool(feat: torch.Tensor, m: torch.Tensor, bins: Sequence[int], threshold: float):
    """``(outs, n)``: pooled ``Tensor[B, C, S]`` per entry of ``bins`` (``feat.dtype``) and the
    number of selected positions per sample (int32, for the empty-foreground warning).

    ``feat``: ``Tensor[B, K, C, H, W]``; ``m``: resized masks ``Tensor[B, K, H, W]`` (float32).
    """
    bins = [int(s) for s in bins]
    m = m.to(torch.float32)
    if torch.compiler.is_compiling():
        rank, csum, n = torch.ops.dcm.fg_select(m, float(threshold))
        return tuple(torch.ops.dcm.fg_pool(feat, rank, csum, n, bins)), n
    rank, csum, n = _select_launch(m.contiguous(), threshold)
    feat = feat.contiguous()
    if not torch.is_grad_enabled() or not feat.requires_grad:
        return tuple(_fwd_launch(feat, rank, csum, n, bins)), n
    return _PoolFn.apply(feat, rank, csum, n, bins), n
