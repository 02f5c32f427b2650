"""Triton kernels for foreground extraction + adaptive 1-D pooling to S bins (DPCN Eq. 5, 6, 11).

Twin (pure PyTorch, the oracle): :func:`dcm.functional.foreground_pool` with the ``"torch"``
backend (a ``[B, S, K·H·W]`` pooling matrix and one ``bmm`` per number of bins).

Four kernels, no host synchronisation, no full-resolution temporaries:

* ``_fg_select_kernel`` (one program per sample) reads the masks ``[B, K, h, w]`` at their own
  resolution and dtype, resizes them as :func:`dcm.functional.masks.prepare_mask` does (255 -> 0,
  bilinear, ``align_corners=True``, float32, reading only the four source pixels of each feature
  position) and applies the selection rule per shot (``> thr``; else ``== shot max`` when the max is
  positive; else none). It writes the rank of every selected
  position over the concatenated shots (raster order; ``-1`` elsewhere) and the number ``n`` of
  selected positions per sample.
* ``_fg_pool_fwd_kernel`` (one program per sample, channel block and chunk of positions) reads each
  feature of its chunk once and adds it to every bin whose rank interval holds its rank: the
  ``[channels, positions] x [positions, bins]`` product with the 0/1 membership matrix, built in
  registers from the ranks and :func:`torch.nn.functional.adaptive_avg_pool1d`'s bin boundaries
  (``floor(i·n/S)``, ``ceil((i+1)·n/S)``), on tensor cores with float32 accumulation (bf16 / fp16
  features in their own dtype, exact products; float32 features use ``tf32x3``, float32-level sums). All requested
  ``S`` side by side in one matrix. The chunks give the GPU enough programs at any batch size; they
  write float32 partial sums.
* ``_fg_pool_finish_kernel`` adds the chunks' partial sums, divides by the bin sizes and writes each
  bin set. A sample with ``n = 0`` gets the whole-image average (all ``K·H·W`` positions) in every bin.
* ``_fg_pool_bwd_kernel`` (one program per sample, position block and channel block):
  ``dfeat[b, :, l] = Σ_i [start_i ≤ rank_l < end_i] · dout[b, :, i] / (end_i − start_i)``; the bins
  containing rank ``r`` are ``i ∈ [floor(r·S/n), ceil((r+1)·S/n) − 1]`` (at most ``⌈S/n⌉ + 1``), so
  each position visits only those; every element written once, no atomics.

Autograd: eager :class:`torch.autograd.Function`; under ``torch.compile`` the custom ops
``dcm::fg_select``, ``dcm::fg_pool`` and ``dcm::fg_pool_bwd`` (with fake implementations and a
registered autograd formula).
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .launch import LAUNCH_OPTS, tuning

__all__ = ["foreground_pool", "supported"]

#: Compile options of the selection kernel: no FMA contraction. The resize computes the bilinear
#: weight ``ly = scale·y − floor(scale·y)`` and compares the blended mask with the threshold; contracted
#: to ``fma(scale, y, −y0)`` the weight keeps the unrounded product (0.49999988 instead of 0.5 where
#: ``scale·y`` rounds to an exact half), so a position exactly at the threshold (a 0/1 mask halfway
#: between two rows) is selected on the GPU and not by PyTorch's resize. Seen on an H100 (Triton
#: 3.6): DynamicConvModule under the kernels gave a relative error of 0.0965 against the float64
#: reference on a 26×22 → 15×10 mask, which an emulation of the contracted weight reproduces to four
#: digits. Each operation rounded on its own (as here) is what PyTorch's CPU float32 resize computes.
#: Triton's interpreter does not reproduce this at every such tie (on some shapes it selects other
#: positions than PyTorch's float32 resize), so these ties are tested on the GPU
#: (tests/test_kernels_foreground_cuda.py) and by the PTX check of tests/test_kernels_compile.py.
SELECT_OPTS = {**LAUNCH_OPTS, "enable_fp_fusion": False}

_MAX_SETS = 4
_MAX_BINS = 256


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _resized_mask(mk, p, valid, h, w, W, sh, sw):
    """The mask of one shot at feature positions ``p`` (raster order, width ``W``) as
    :func:`dcm.functional.masks.prepare_mask` makes it: the label 255 read as 0, then bilinear with
    ``align_corners=True`` from ``h x w``, in float32 with PyTorch's formula (source index
    ``scale · dst``, truncated; ``scale = (in − 1) / (out − 1)`` rounded to float32 on the host)."""
    y = p // W
    x = p - y * W
    yr = sh * y.to(tl.float32)
    xr = sw * x.to(tl.float32)
    y0 = yr.to(tl.int32)
    x0 = xr.to(tl.int32)
    ly = yr - y0.to(tl.float32)
    lx = xr - x0.to(tl.float32)
    y1 = y0 + (y0 < h - 1).to(tl.int32)
    x1 = x0 + (x0 < w - 1).to(tl.int32)
    v00 = tl.load(mk + y0 * w + x0, mask=valid, other=0).to(tl.float32)
    v01 = tl.load(mk + y0 * w + x1, mask=valid, other=0).to(tl.float32)
    v10 = tl.load(mk + y1 * w + x0, mask=valid, other=0).to(tl.float32)
    v11 = tl.load(mk + y1 * w + x1, mask=valid, other=0).to(tl.float32)
    v00 = tl.where(v00 == 255.0, 0.0, v00)
    v01 = tl.where(v01 == 255.0, 0.0, v01)
    v10 = tl.where(v10 == 255.0, 0.0, v10)
    v11 = tl.where(v11 == 255.0, 0.0, v11)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit
def _fg_select_kernel(m_ptr, rank_ptr, n_ptr, K, h, w, H, W, sh, sw, thr, BL: tl.constexpr):
    # one program per sample; per shot: the max of its resized mask, then the selection and the
    # running count (the resized mask is computed twice from the original one instead of stored)
    b = tl.program_id(0).to(tl.int64)
    HW = H * W
    L = K * HW
    offs = tl.arange(0, BL)
    carry = tl.zeros((), dtype=tl.int32)
    for k in range(K):
        mk = m_ptr + (b * K + k) * h * w
        rmax = tl.full((), float("-inf"), tl.float32)
        for s in range(0, HW, BL):
            p = s + offs
            valid = p < HW
            v = tl.where(valid, _resized_mask(mk, p, valid, h, w, W, sh, sw), float("-inf"))
            rmax = tl.maximum(rmax, tl.max(v, 0))
        use_thr = (rmax > thr).to(tl.int32)
        use_max = ((rmax <= thr) & (rmax > 0)).to(tl.int32)
        for s in range(0, HW, BL):
            p = s + offs
            valid = p < HW
            v = _resized_mask(mk, p, valid, h, w, W, sh, sw)
            sel = (((v > thr).to(tl.int32) * use_thr + (v >= rmax).to(tl.int32) * use_max) > 0) & valid
            cs = tl.cumsum(sel.to(tl.int32), 0) + carry  # inclusive count up to this position
            tl.store(rank_ptr + b * L + k * HW + p, tl.where(sel, cs - 1, -1), mask=valid)
            carry += tl.sum(sel.to(tl.int32), 0)
    tl.store(n_ptr + b, carry)


@triton.jit
def _bin_bounds(n, L, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr, NB: tl.constexpr):
    """Rank interval ``[start_j, end_j)`` of every output column ``j`` (all bin sets side by side,
    padded to ``NB`` with empty intervals): adaptive_avg_pool1d's ``floor(i·n/S)``, ``ceil((i+1)·n/S)``;
    ``[0, L)`` for every bin of a sample without foreground."""
    j = tl.arange(0, NB)
    c1 = S1
    c2 = S1 + S2
    c3 = S1 + S2 + S3
    c4 = S1 + S2 + S3 + S4
    S = tl.where(j < c1, S1, tl.where(j < c2, S2, tl.where(j < c3, S3, tl.maximum(S4, 1))))
    i = j - tl.where(j < c1, 0, tl.where(j < c2, c1, tl.where(j < c3, c2, c3)))
    start = (i * n) // S
    end = ((i + 1) * n + S - 1) // S
    empty = (j * 0 + n) == 0
    start = tl.where(empty, 0, start)
    end = tl.where(empty, L, end)
    col = j < c4
    return tl.where(col, start, 0), tl.where(col, end, 0)


@triton.jit
def _fg_pool_fwd_kernel(
    f_ptr, rank_ptr, n_ptr, part_ptr,
    C, HW, L, CHUNK,
    S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr, NB: tl.constexpr,
    BC: tl.constexpr, BL: tl.constexpr, FP32: tl.constexpr, HALF_DOT: tl.constexpr,
):
    # one program per (sample, channel block, chunk of positions): one pass over the chunk,
    # part[b, chunk, c, j] = Σ_{l in chunk, start_j ≤ rank_l < end_j} feat[b, c, l] as a
    # [BC, BL] x [BL, NB] product with the 0/1 bin-membership matrix (exact in every dtype)
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    sp = tl.program_id(2)
    n = tl.load(n_ptr + b)
    start, end = _bin_bounds(n, L, S1, S2, S3, S4, NB)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    coff = c.to(tl.int64) * HW
    fb = f_ptr + b * C * L
    rb = rank_ptr + b * L
    acc = tl.zeros([BC, NB], dtype=tl.float32)
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for s in range(lo, hi, BL):
        p = s + tl.arange(0, BL)
        pm = p < hi
        r = tl.load(rb + p, mask=pm, other=-1)
        r = tl.where(((p * 0 + n) == 0) & pm, p, r)  # no foreground: every position, in raster order
        ind = (r[:, None] >= start[None, :]) & (r[:, None] < end[None, :])
        k = p // HW
        poff = k.to(tl.int64) * C * HW + (p - k * HW)
        x = tl.load(fb + coff[:, None] + poff[None, :], mask=cm[:, None] & (r >= 0)[None, :], other=0.0)
        # tensor cores, float32 accumulation, exact products (the 0/1 matrix is exact in every dtype):
        # bf16 / fp16 features in their own dtype (no conversion, half the MMA instructions of a
        # tf32 pass); float32 features: tf32x3 (split into a high and a low tf32 part), float32-level
        # sums. HALF_DOT is off only for bf16 under Triton's CPU interpreter, whose tl.dot on bf16
        # operands is wrong: there the features are converted to float32 first (exact in tf32, the
        # same sums)
        if FP32:
            acc = tl.dot(x, ind.to(tl.float32), acc, input_precision="tf32x3")
        elif HALF_DOT:
            acc = tl.dot(x, ind.to(x.dtype), acc)
        else:
            acc = tl.dot(x.to(tl.float32), ind.to(tl.float32), acc, input_precision="tf32")
    j = tl.arange(0, NB)
    out = part_ptr + ((b * tl.num_programs(2) + sp) * C + c.to(tl.int64))[:, None] * NB + j[None, :]
    tl.store(out, acc, mask=cm[:, None])


@triton.jit
def _fg_pool_finish_kernel(
    part_ptr, n_ptr, o1_ptr, o2_ptr, o3_ptr, o4_ptr,
    C, L, NSPLIT,
    S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr, NB: tl.constexpr,
    BC: tl.constexpr,
):
    # out_set[b, c, i] = Σ_chunks part[b, chunk, c, j] / (end_j − start_j), written per bin set
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    n = tl.load(n_ptr + b)
    start, end = _bin_bounds(n, L, S1, S2, S3, S4, NB)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    j = tl.arange(0, NB)
    acc = tl.zeros([BC, NB], dtype=tl.float32)
    for sp in range(0, NSPLIT):
        acc += tl.load(part_ptr + ((b * NSPLIT + sp) * C + c.to(tl.int64))[:, None] * NB + j[None, :],
                       mask=cm[:, None], other=0.0)
    res = acc / tl.maximum(end - start, 1).to(tl.float32)[None, :]
    row = (b * C + c.to(tl.int64))[:, None]
    c1 = S1
    c2 = S1 + S2
    c3 = S1 + S2 + S3
    tl.store(o1_ptr + row * S1 + j[None, :], res.to(o1_ptr.dtype.element_ty), mask=cm[:, None] & (j < c1)[None, :])
    if S2 > 0:
        tl.store(o2_ptr + row * S2 + (j - c1)[None, :], res.to(o2_ptr.dtype.element_ty),
                 mask=cm[:, None] & ((j >= c1) & (j < c2))[None, :])
    if S3 > 0:
        tl.store(o3_ptr + row * S3 + (j - c2)[None, :], res.to(o3_ptr.dtype.element_ty),
                 mask=cm[:, None] & ((j >= c2) & (j < c3))[None, :])
    if S4 > 0:
        tl.store(o4_ptr + row * S4 + (j - c3)[None, :], res.to(o4_ptr.dtype.element_ty),
                 mask=cm[:, None] & ((j >= c3) & (j < c3 + S4))[None, :])


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


def _align_corners_scale(src: int, dst: int) -> float:
    """PyTorch's bilinear ``align_corners=True`` scale, ``(src − 1) / (dst − 1)`` in float32 (0 for dst = 1)."""
    if dst <= 1:
        return 0.0
    return float(torch.tensor(src - 1, dtype=torch.float32) / torch.tensor(dst - 1, dtype=torch.float32))


def _select_launch(mask: torch.Tensor, H: int, W: int, threshold: float):
    """(rank, n) for the masks ``[B, K, h, w]`` (any resolution and dtype; resized to ``H x W`` in the
    kernel): rank of each selected position (-1 elsewhere) and the number of selected positions per
    sample; int32, ``[B, K·H·W]`` and ``[B]``."""
    B, K, h, w = mask.shape
    L = K * H * W
    rank = torch.empty((B, L), device=mask.device, dtype=torch.int32)
    n = torch.empty((B,), device=mask.device, dtype=torch.int32)
    if B == 0 or L == 0:
        return rank, n.zero_()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    BL = min(4096, max(128, triton.next_power_of_2(H * W)))
    _fg_select_kernel[(B,)](mask.contiguous(), rank, n, K, h, w, H, W, _align_corners_scale(h, H), _align_corners_scale(w, W),
                            float(threshold), BL=BL, **SELECT_OPTS, num_warps=8 if BL >= 2048 else 4)
    return rank, n


#: programs per SM the pooling kernel aims for (knob FG_SM_PROGRAMS): each sample's positions are split
#: into as many chunks as that needs (at least one block each); a program walks its chunk block by block
_SM_PROGRAMS = tuning("FG_SM_PROGRAMS")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any value, it only sets how the positions are split
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fwd_meta(B: int, C: int, L: int, bins: Sequence[int], device: torch.device, fp32: bool = True):
    """Block sizes and the split of the positions into chunks: enough programs to fill the GPU
    (about ``FG_SM_PROGRAMS`` per SM) whatever the batch size, without splitting finer than one block. Block sizes
    chosen from ptxas's register counts for sm_90 (float32: the three tf32 products of a
    [32, 64] x [64, 32] block need 255 registers, [32, 32] 168), not yet timed."""
    NB = max(16, triton.next_power_of_2(sum(bins)))
    BC = 32 if NB <= 64 else 16
    BL = 32 if NB > 64 or fp32 else 64
    blocks = triton.cdiv(L, BL)
    split = max(1, min(blocks, triton.cdiv(_SM_PROGRAMS * _sm_count(device), B * triton.cdiv(C, BC))))
    chunk = BL * triton.cdiv(blocks, split)
    return NB, BC, BL, chunk, triton.cdiv(L, chunk)


def _half_dot(feat: torch.Tensor) -> bool:
    """bf16 / fp16 features go to the pooling product in their own dtype, except bf16 on CPU tensors
    (Triton's interpreter computes tl.dot on bf16 wrongly; see _fg_pool_fwd_kernel)."""
    return feat.dtype == torch.float16 or (feat.dtype == torch.bfloat16 and feat.is_cuda)


def _fwd_launch(feat: torch.Tensor, rank: torch.Tensor, n: torch.Tensor, bins: Sequence[int]) -> List[torch.Tensor]:
    B, K, C, H, W = feat.shape
    outs = [torch.empty((B, C, s), device=feat.device, dtype=feat.dtype) for s in bins]
    if B * C == 0:
        return outs
    L = K * H * W
    fp32 = feat.dtype == torch.float32
    NB, BC, BL, chunk, nsplit = _fwd_meta(B, C, L, bins, feat.device, fp32)
    part = torch.empty((B, nsplit, C, NB), device=feat.device, dtype=torch.float32)
    sets = _sets(bins)
    _fg_pool_fwd_kernel[(B, triton.cdiv(C, BC), nsplit)](
        feat, rank, n, part, C, H * W, L, chunk, NB=NB, BC=BC, BL=BL, FP32=fp32,
        HALF_DOT=_half_dot(feat),
        **LAUNCH_OPTS, num_warps=4, **sets
    )
    o = outs + [outs[0]] * (_MAX_SETS - len(outs))
    BCF = 32 if NB <= 64 else 8
    _fg_pool_finish_kernel[(B, triton.cdiv(C, BCF))](part, n, *o, C, L, nsplit, NB=NB, BC=BCF, **LAUNCH_OPTS, num_warps=4, **sets)
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
        *g, rank, n, df, C, H * W, L, BC=BC, BL=BL, **LAUNCH_OPTS, num_warps=4, **_sets(bins)
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
    def forward(ctx, feat, rank, n, bins):
        ctx.bins = tuple(bins)
        ctx.save_for_backward(feat, rank, n)
        return tuple(_fwd_launch(feat, rank, n, bins))

    @staticmethod
    def backward(ctx, *gs):
        feat, rank, n = ctx.saved_tensors
        df = _bwd_launch(_grads(gs, feat, ctx.bins), rank, n, feat, ctx.bins)
        return df, None, None, None


# --------------------------------------------------------------------------------------------------
# torch.compile path: custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("dcm::fg_select", mutates_args=())
def _fg_select_op(mask: torch.Tensor, H: int, W: int, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _select_launch(mask, H, W, threshold)


@_fg_select_op.register_fake
def _(mask, H, W, threshold):
    B, K = mask.shape[:2]
    i32 = torch.int32
    return mask.new_empty((B, K * H * W), dtype=i32), mask.new_empty((B,), dtype=i32)


@torch.library.custom_op("dcm::fg_pool", mutates_args=())
def _fg_pool_op(feat: torch.Tensor, rank: torch.Tensor, n: torch.Tensor, bins: List[int]) -> List[torch.Tensor]:
    return _fwd_launch(feat.contiguous(), rank, n, bins)


@_fg_pool_op.register_fake
def _(feat, rank, n, bins):
    B, K, C = feat.shape[:3]
    return [feat.new_empty((B, C, s)) for s in bins]


@torch.library.custom_op("dcm::fg_pool_bwd", mutates_args=())
def _fg_pool_bwd_op(grads: List[torch.Tensor], rank: torch.Tensor, n: torch.Tensor, feat: torch.Tensor, bins: List[int]) -> torch.Tensor:
    return _bwd_launch([g.contiguous() for g in grads], rank, n, feat, bins)


@_fg_pool_bwd_op.register_fake
def _(grads, rank, n, feat, bins):
    return feat.new_empty(feat.shape)


def _setup_context(ctx, inputs, output):
    feat, rank, n, bins = inputs
    ctx.bins = list(bins)
    ctx.save_for_backward(feat, rank, n)


def _backward(ctx, grads):
    feat, rank, n = ctx.saved_tensors
    B, _, C = feat.shape[:3]
    gs = [torch.zeros((B, C, s), device=feat.device, dtype=feat.dtype) if g is None else g for g, s in zip(grads, ctx.bins)]
    return torch.ops.dcm.fg_pool_bwd(gs, rank, n, feat, ctx.bins), None, None, None


_fg_pool_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# entry point used by dcm.functional.foreground
# --------------------------------------------------------------------------------------------------
def supported(feat: torch.Tensor, bins: Sequence[int]) -> bool:
    """Whether the kernels handle these inputs (else the caller uses the pooling-matrix ``bmm``); the
    device is the caller's choice (:func:`dcm.config.resolve_backend`)."""
    if feat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not 1 <= len(bins) <= _MAX_SETS or sum(bins) > _MAX_BINS:
        return False
    B, K, C, H, W = feat.shape
    L = K * H * W
    return L > 0 and (L + 1) * (max(bins) + 1) < 2**31 and B * C < 2**31


def foreground_pool(feat: torch.Tensor, mask: torch.Tensor, bins: Sequence[int], threshold: float):
    """``(outs, n)``: pooled ``Tensor[B, C, S]`` per entry of ``bins`` (``feat.dtype``) and the
    number of selected positions per sample (int32, for the empty-foreground warning).

    ``feat``: ``Tensor[B, K, C, H, W]``; ``mask``: validated masks ``Tensor[B, K, h, w]`` at any
    resolution (values in ``[0, 1]`` or 255; resized to ``H x W`` inside the selection kernel).
    """
    bins = [int(s) for s in bins]
    H, W = feat.shape[-2:]
    if torch.compiler.is_compiling():
        rank, n = torch.ops.dcm.fg_select(mask, H, W, float(threshold))
        return tuple(torch.ops.dcm.fg_pool(feat, rank, n, bins)), n
    rank, n = _select_launch(mask, H, W, threshold)
    feat = feat.contiguous()
    if not torch.is_grad_enabled() or not feat.requires_grad:
        return tuple(_fwd_launch(feat, rank, n, bins)), n
    return _PoolFn.apply(feat, rank, n, bins), n
