"""Fused Triton kernels for several dynamic depthwise convolutions of one input (DCM, DPCN Eq. 8).

Twin (pure PyTorch, the oracle): :func:`dcm.functional.dynamic_depthwise_conv2d_multi` with the
``"torch"`` backend (one grouped convolution, ``groups = B·C``, per kernel set).

Kernels up to 5×5 (the paper's sizes) use the *rolling-row* kernels of
:mod:`dcm.kernels.generated.dynconv_rolling` (generated code): one program owns a column block of one
``(b, c)`` plane and a chunk of rows, walks down the rows, loads each input row once at its five
column shifts and keeps the five partial output rows in registers, so ``x`` is read from device
memory once, each output is written once, and each element is loaded ~5 times from L1 instead of
once per tap (25 for 5×5). Accumulation is float32 whatever the input dtype. Each loop step loads
``ROWS`` input rows (knob ``DW_ROWS``, default 4) before it stores any output row: the compiler cannot
move loads past stores that may alias, so with one row per step every step waits a full memory
latency with a single row load in flight per warp.

Backward (two kernels): ``dx`` is the same rolling stencil with the taps mirrored (a transposed
correlation, summed over the kernel sets); the weight gradient
``dW_k[b, c, i, j] = Σ_{h,w} g_k[h, w] · x[h + i - kh//2, w + j - kw//2]`` keeps a ring of the last
five gradient rows and one register accumulator per tap, reduced once per program (float32 partial
sums per row chunk, summed afterwards).

Larger kernels fall back to 2-D tile kernels (``_dw_fwd_kernel``, ``_dw_dx_kernel``,
``_dw_dw_kernel``: one masked shifted load per tap, the taps of ``dW`` as a tensor dimension).

Autograd: in eager mode a :class:`torch.autograd.Function` (no custom-op dispatch overhead); under
``torch.compile`` the same kernels run through the ``dcm::dynconv_fwd`` / ``dcm::dynconv_bwd``
custom ops (with fake implementations and a registered autograd formula), so graphs stay whole.
Both paths capture in CUDA graphs (no host synchronisation).
"""
from __future__ import annotations

import functools
from typing import List, Sequence, Tuple


import torch
import triton
import triton.language as tl

from .launch import LAUNCH_OPTS, tuning
from .generated.dynconv_rolling import _dw_dw_roll, _dw_dx_roll, _dw_fwd_roll

__all__ = ["dynamic_depthwise_conv2d_multi", "supported"]

_MAX_PER_LAUNCH = 3


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _uses(dh, dw, KH: tl.constexpr, KW: tl.constexpr):
    return (dh * dh <= (KH // 2) * (KH // 2)) & (dw * dw <= (KW // 2) * (KW // 2))


@triton.jit
def _dw_fwd_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, o0_ptr, o1_ptr, o2_ptr,
    H, W,
    NOUT: tl.constexpr,
    KH0: tl.constexpr, KW0: tl.constexpr, KH1: tl.constexpr, KW1: tl.constexpr,
    KH2: tl.constexpr, KW2: tl.constexpr,
    PHM: tl.constexpr, PWM: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    # one [BH, BW] tile of one (b, c) plane; loop over the union of the kernels' taps
    plane = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    ww = tl.program_id(2) * BW + tl.arange(0, BW)
    HW = H * W
    off = hh[:, None] * W + ww[None, :]
    xb = x_ptr + plane * HW
    acc0 = tl.zeros([BH, BW], dtype=tl.float32)
    acc1 = tl.zeros([BH, BW], dtype=tl.float32)
    acc2 = tl.zeros([BH, BW], dtype=tl.float32)
    for di in tl.static_range(2 * PHM + 1):
        dh = di - PHM
        rok = ((hh + dh >= 0) & (hh + dh < H))[:, None]
        prow = xb + (off + dh * W)
        for dj in tl.static_range(2 * PWM + 1):
            dw = dj - PWM
            u0 = _uses(dh, dw, KH0, KW0)
            u1 = (NOUT > 1) & _uses(dh, dw, KH1, KW1)
            u2 = (NOUT > 2) & _uses(dh, dw, KH2, KW2)
            if u0 | u1 | u2:
                cok = ((ww + dw >= 0) & (ww + dw < W))[None, :]
                v = tl.load(prow + dw, mask=rok & cok, other=0.0).to(tl.float32)
                if u0:
                    t0 = tl.load(w0_ptr + plane * (KH0 * KW0) + ((dh + KH0 // 2) * KW0 + dw + KW0 // 2))
                    acc0 += v * t0.to(tl.float32)
                if u1:
                    t1 = tl.load(w1_ptr + plane * (KH1 * KW1) + ((dh + KH1 // 2) * KW1 + dw + KW1 // 2))
                    acc1 += v * t1.to(tl.float32)
                if u2:
                    t2 = tl.load(w2_ptr + plane * (KH2 * KW2) + ((dh + KH2 // 2) * KW2 + dw + KW2 // 2))
                    acc2 += v * t2.to(tl.float32)
    inb = (hh < H)[:, None] & (ww < W)[None, :]
    tl.store(o0_ptr + plane * HW + off, acc0.to(o0_ptr.dtype.element_ty), mask=inb)
    if NOUT > 1:
        tl.store(o1_ptr + plane * HW + off, acc1.to(o1_ptr.dtype.element_ty), mask=inb)
    if NOUT > 2:
        tl.store(o2_ptr + plane * HW + off, acc2.to(o2_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _dx_taps(acc, g_ptr, w_ptr, plane, off, hh, ww, H, W, KH: tl.constexpr, KW: tl.constexpr):
    # dx[h, w] += Σ_{i,j} g[h - dh, w - dw] · w[i, j]   with (dh, dw) = (i - KH//2, j - KW//2)
    gb = g_ptr + plane * (H * W)
    for i in tl.static_range(KH):
        dh = i - KH // 2
        rok = ((hh - dh >= 0) & (hh - dh < H))[:, None]
        prow = gb + (off - dh * W)
        for j in tl.static_range(KW):
            dw = j - KW // 2
            cok = ((ww - dw >= 0) & (ww - dw < W))[None, :]
            v = tl.load(prow - dw, mask=rok & cok, other=0.0).to(tl.float32)
            t = tl.load(w_ptr + plane * (KH * KW) + (i * KW + j)).to(tl.float32)
            acc += v * t
    return acc


@triton.jit
def _dw_dx_kernel(
    g0_ptr, g1_ptr, g2_ptr, w0_ptr, w1_ptr, w2_ptr, dx_ptr,
    H, W,
    NOUT: tl.constexpr,
    KH0: tl.constexpr, KW0: tl.constexpr, KH1: tl.constexpr, KW1: tl.constexpr,
    KH2: tl.constexpr, KW2: tl.constexpr,
    ACC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    ww = tl.program_id(2) * BW + tl.arange(0, BW)
    off = hh[:, None] * W + ww[None, :]
    acc = tl.zeros([BH, BW], dtype=tl.float32)
    acc = _dx_taps(acc, g0_ptr, w0_ptr, plane, off, hh, ww, H, W, KH0, KW0)
    if NOUT > 1:
        acc = _dx_taps(acc, g1_ptr, w1_ptr, plane, off, hh, ww, H, W, KH1, KW1)
    if NOUT > 2:
        acc = _dx_taps(acc, g2_ptr, w2_ptr, plane, off, hh, ww, H, W, KH2, KW2)
    inb = (hh < H)[:, None] & (ww < W)[None, :]
    optr = dx_ptr + plane * (H * W) + off
    if ACC:
        acc += tl.load(optr, mask=inb, other=0.0).to(tl.float32)
    tl.store(optr, acc.to(dx_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _dw_store_taps(p_ptr, prow, tsum, tdh, tdw, tv, KH: tl.constexpr, KW: tl.constexpr):
    inside = tv & (tdh * tdh <= (KH // 2) * (KH // 2)) & (tdw * tdw <= (KW // 2) * (KW // 2))
    idx = (tdh + KH // 2) * KW + (tdw + KW // 2)
    tl.store(p_ptr + prow * (KH * KW) + idx, tsum, mask=inside)


@triton.jit
def _dw_dw_kernel(
    x_ptr, g0_ptr, g1_ptr, g2_ptr, p0_ptr, p1_ptr, p2_ptr,
    H, W, RCHUNK, NPLANES,
    NOUT: tl.constexpr,
    KH0: tl.constexpr, KW0: tl.constexpr, KH1: tl.constexpr, KW1: tl.constexpr,
    KH2: tl.constexpr, KW2: tl.constexpr,
    PHM: tl.constexpr, PWM: tl.constexpr, TU: tl.constexpr, BW: tl.constexpr,
):
    # dW_k[tap] = Σ_{h,w} g_k[h, w] · x[h + dh, w + dw]: the taps are a tensor dimension, one
    # [TU, BW] gather of x per row (union of all kernels' taps), fp32 accumulators, one reduction
    plane = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cb = tl.program_id(2)
    HW = H * W
    ww = cb * BW + tl.arange(0, BW)
    wv = ww < W
    t = tl.arange(0, TU)
    tdh = t // (2 * PWM + 1) - PHM
    tdw = t % (2 * PWM + 1) - PWM
    tv = t < (2 * PHM + 1) * (2 * PWM + 1)
    cok = tv[:, None] & wv[None, :] & (ww[None, :] + tdw[:, None] >= 0) & (ww[None, :] + tdw[:, None] < W)
    offc = tdh[:, None] * W + ww[None, :] + tdw[:, None]
    xb = x_ptr + plane * HW
    acc0 = tl.zeros([TU, BW], dtype=tl.float32)
    acc1 = tl.zeros([TU, BW], dtype=tl.float32)
    acc2 = tl.zeros([TU, BW], dtype=tl.float32)
    h0 = split * RCHUNK
    h1 = tl.minimum(h0 + RCHUNK, H)
    for h in range(h0, h1):
        rok = (h + tdh >= 0) & (h + tdh < H)
        xs = tl.load(xb + h * W + offc, mask=cok & rok[:, None], other=0.0).to(tl.float32)
        gr0 = tl.load(g0_ptr + plane * HW + h * W + ww, mask=wv, other=0.0).to(tl.float32)
        acc0 += xs * gr0[None, :]
        if NOUT > 1:
            gr1 = tl.load(g1_ptr + plane * HW + h * W + ww, mask=wv, other=0.0).to(tl.float32)
            acc1 += xs * gr1[None, :]
        if NOUT > 2:
            gr2 = tl.load(g2_ptr + plane * HW + h * W + ww, mask=wv, other=0.0).to(tl.float32)
            acc2 += xs * gr2[None, :]
    prow = (split * tl.num_programs(2) + cb).to(tl.int64) * NPLANES + plane
    _dw_store_taps(p0_ptr, prow, tl.sum(acc0, 1), tdh, tdw, tv, KH0, KW0)
    if NOUT > 1:
        _dw_store_taps(p1_ptr, prow, tl.sum(acc1, 1), tdh, tdw, tv, KH1, KW1)
    if NOUT > 2:
        _dw_store_taps(p2_ptr, prow, tl.sum(acc2, 1), tdh, tdw, tv, KH2, KW2)


# --------------------------------------------------------------------------------------------------
# launchers (shared by the eager autograd.Function and the custom ops)
# --------------------------------------------------------------------------------------------------
def _tile(H: int, W: int) -> Tuple[int, int, int]:
    """(BH, BW, num_warps): whole rows up to 128 wide, ~512 positions per program, least waste."""
    BW = min(128, max(16, triton.next_power_of_2(W)))
    best = None
    for BH in (16, 8, 4, 2, 1):
        if BH * BW > 1024 or BH * BW < 128 and BH != 1:
            continue
        waste = -(-H // BH) * BH - H
        key = (waste, -BH if BH * BW <= 512 else BH)
        if best is None or key < best[0]:
            best = (key, BH)
    BH = best[1]
    return BH, BW, 4 if BH * BW >= 512 else 2


def _meta(ws: Sequence[torch.Tensor]):
    return _meta_cached(tuple((int(w.shape[-2]), int(w.shape[-1])) for w in ws))


@functools.lru_cache(maxsize=256)
def _meta_cached(ks):
    ks = list(ks)
    ks3 = ks + [(1, 1)] * (_MAX_PER_LAUNCH - len(ks))
    meta = dict(NOUT=len(ks))
    for i, (kh, kw) in enumerate(ks3):
        meta[f"KH{i}"], meta[f"KW{i}"] = kh, kw
    return meta, max(k[0] for k in ks) // 2, max(k[1] for k in ks) // 2


def _groups(seq):
    for s in range(0, len(seq), _MAX_PER_LAUNCH):
        yield s, list(seq[s : s + _MAX_PER_LAUNCH])


def _pad3(lst):
    return lst + [lst[0]] * (_MAX_PER_LAUNCH - len(lst))


def _rolling_ok(ws) -> bool:
    return all(w.shape[-2] <= 5 and w.shape[-1] <= 5 for w in ws)


#: programs the rolling kernels aim for (row chunks per plane follow from it)
_TARGET_PROGRAMS = tuning("DW_PROGRAMS")
#: input rows the rolling forward / dx kernels load per loop step, all before the step's stores, so
#: that ROWS row loads per warp are in flight (at ROWS = 1 the loop waits for one row load per step)
_ROWS = tuning("DW_ROWS")


@functools.lru_cache(maxsize=1024)
def _roll_cfg(planes: int, H: int, W: int):
    """(BW, num_warps, n column blocks, rows per program, n row chunks) of the rolling kernels."""
    BW = min(128, max(32, triton.next_power_of_2(W)))
    nw = max(1, BW // 64)
    ncb = triton.cdiv(W, BW)
    target = _TARGET_PROGRAMS
    nsplit = max(1, min(triton.cdiv(H, 8), triton.cdiv(target, planes * ncb)))
    rchunk = triton.cdiv(H, nsplit)
    return BW, nw, ncb, rchunk, triton.cdiv(H, rchunk)


def _fwd_launch(x: torch.Tensor, ws: Sequence[torch.Tensor], out_dtype: torch.dtype) -> List[torch.Tensor]:
    B, C, H, W = x.shape
    outs = [torch.empty((B, C, H, W), device=x.device, dtype=out_dtype) for _ in ws]
    if B * C * H * W == 0:
        return outs
    if _rolling_ok(ws):
        BW, nw, ncb, rchunk, nsplit = _roll_cfg(B * C, H, W)
        for s, wg in _groups(ws):
            meta, _, _ = _meta(wg)
            og = outs[s : s + _MAX_PER_LAUNCH]
            _dw_fwd_roll[(B * C, nsplit, ncb)](
                x, *_pad3(wg), *_pad3(og), H, W, rchunk, BW=BW, ROWS=_ROWS, **LAUNCH_OPTS, num_warps=nw, **meta
            )
        return outs
    BH, BW, nwarps = _tile(H, W)
    grid = (B * C, triton.cdiv(H, BH), triton.cdiv(W, BW))
    for s, wg in _groups(ws):
        meta, phm, pwm = _meta(wg)
        og = outs[s : s + _MAX_PER_LAUNCH]
        _dw_fwd_kernel[grid](x, *_pad3(wg), *_pad3(og), H, W, PHM=phm, PWM=pwm, BH=BH, BW=BW, **LAUNCH_OPTS, num_warps=nwarps, **meta)
    return outs


def _bwd_launch(x: torch.Tensor, ws: Sequence[torch.Tensor], gs: Sequence[torch.Tensor]):
    B, C, H, W = x.shape
    dx = torch.empty((B, C, H, W), device=x.device, dtype=x.dtype)
    if B * C * H * W == 0:
        return dx.zero_(), [torch.zeros_like(w) for w in ws]
    planes = B * C
    dws: List[torch.Tensor] = []
    if _rolling_ok(ws):
        BW, nw, ncb, rchunk, nsplit = _roll_cfg(planes, H, W)
        for s, wg in _groups(ws):
            gg = list(gs[s : s + _MAX_PER_LAUNCH])
            meta, _, _ = _meta(wg)
            _dw_dx_roll[(planes, nsplit, ncb)](
                *_pad3(gg), *_pad3(wg), dx, H, W, rchunk, ACC=s > 0, BW=BW, ROWS=_ROWS, **LAUNCH_OPTS, num_warps=nw, **meta
            )
            parts = [torch.empty((nsplit * ncb, planes, w.shape[-2] * w.shape[-1]), device=x.device, dtype=torch.float32) for w in wg]
            _dw_dw_roll[(planes, nsplit, ncb)](x, *_pad3(gg), *_pad3(parts), H, W, rchunk, planes, BW=BW, **LAUNCH_OPTS, num_warps=nw, **meta)
            for w, p in zip(wg, parts):
                d = p[0] if p.shape[0] == 1 else p.sum(0)
                dws.append(d.view(w.shape).to(w.dtype))
        return dx, dws
    BH, BW, nwarps = _tile(H, W)
    grid = (planes, triton.cdiv(H, BH), triton.cdiv(W, BW))
    BWd = min(64, max(16, triton.next_power_of_2(W)))
    ncb = triton.cdiv(W, BWd)
    nsplit = max(1, min(H, triton.cdiv(4 * 132, planes * ncb)))
    rchunk = triton.cdiv(H, nsplit)
    nsplit = triton.cdiv(H, rchunk)
    for s, wg in _groups(ws):
        gg = list(gs[s : s + _MAX_PER_LAUNCH])
        meta, phm, pwm = _meta(wg)
        _dw_dx_kernel[grid](*_pad3(gg), *_pad3(wg), dx, H, W, ACC=s > 0, BH=BH, BW=BW, **LAUNCH_OPTS, num_warps=nwarps, **meta)
        parts = [torch.empty((nsplit * ncb, planes, w.shape[-2] * w.shape[-1]), device=x.device, dtype=torch.float32) for w in wg]
        tu = triton.next_power_of_2((2 * phm + 1) * (2 * pwm + 1))
        _dw_dw_kernel[(planes, nsplit, ncb)](
            x, *_pad3(gg), *_pad3(parts), H, W, rchunk, planes, PHM=phm, PWM=pwm, TU=tu, BW=BWd, **LAUNCH_OPTS, num_warps=4, **meta
        )
        for w, p in zip(wg, parts):
            d = p[0] if p.shape[0] == 1 else p.sum(0)
            dws.append(d.view(w.shape).to(w.dtype))
    return dx, dws


def _prep(x: torch.Tensor, ws: Sequence[torch.Tensor]):
    return x.contiguous(), [w.contiguous() for w in ws]


# --------------------------------------------------------------------------------------------------
# eager path: autograd.Function
# --------------------------------------------------------------------------------------------------
class _DynConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_dtype, x, *ws):
        x, ws = _prep(x, ws)
        ctx.save_for_backward(x, *ws)
        return tuple(_fwd_launch(x, ws, out_dtype))

    @staticmethod
    def backward(ctx, *gs):
        x, *ws = ctx.saved_tensors
        gs = [torch.zeros_like(x) if g is None else g.contiguous() for g in gs]
        dx, dws = _bwd_launch(x, ws, gs)
        return (None, dx, *dws)


# --------------------------------------------------------------------------------------------------
# torch.compile path: custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("dcm::dynconv_fwd", mutates_args=())
def _dynconv_fwd_op(x: torch.Tensor, weights: List[torch.Tensor], out_dtype: torch.dtype) -> List[torch.Tensor]:
    x, ws = _prep(x, weights)
    return _fwd_launch(x, ws, out_dtype)


@_dynconv_fwd_op.register_fake
def _(x, weights, out_dtype):
    return [x.new_empty(x.shape, dtype=out_dtype) for _ in weights]


@torch.library.custom_op("dcm::dynconv_bwd", mutates_args=())
def _dynconv_bwd_op(x: torch.Tensor, weights: List[torch.Tensor], grads: List[torch.Tensor]) -> List[torch.Tensor]:
    x, ws = _prep(x, weights)
    dx, dws = _bwd_launch(x, ws, [g.contiguous() for g in grads])
    return [dx] + dws


@_dynconv_bwd_op.register_fake
def _(x, weights, grads):
    return [x.new_empty(x.shape)] + [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    x, weights, _ = inputs
    ctx.save_for_backward(x, *weights)


def _backward(ctx, grads):
    x, *ws = ctx.saved_tensors
    grads = [torch.zeros_like(x) if g is None else g for g in grads]
    res = torch.ops.dcm.dynconv_bwd(x, ws, grads)
    return res[0], list(res[1:]), None


_dynconv_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# entry point used by dcm.functional
# --------------------------------------------------------------------------------------------------
def supported(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether the fused kernel handles these inputs (else the caller uses the grouped convolution)."""
    ok = (torch.float16, torch.bfloat16, torch.float32)
    return x.dtype in ok and all(w.dtype in ok for w in weights) and len(weights) > 0


def _out_dtype(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)  # what F.conv2d returns under autocast
    dt = x.dtype
    for w in weights:
        dt = torch.promote_types(dt, w.dtype)
    return dt


def dynamic_depthwise_conv2d_multi(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """``tuple(conv_groups(x, w) for w in weights)`` in one fused pass (see the module docstring).

    ``x``: ``Tensor[B, C, H, W]`` (any strides; copied to contiguous NCHW if needed); ``weights``:
    ``Tensor[B, C, kh_i, kw_i]`` with odd sizes. Float16/bfloat16/float32, float32 accumulation.
    """
    weights = list(weights)
    out_dtype = _out_dtype(x, weights)
    if torch.compiler.is_compiling():
        return tuple(torch.ops.dcm.dynconv_fwd(x, weights, out_dtype))
    if not torch.is_grad_enabled() or not (x.requires_grad or any(w.requires_grad for w in weights)):
        x, weights = _prep(x, weights)  # inference: skip the autograd.Function bookkeeping
        return tuple(_fwd_launch(x, weights, out_dtype))
    return _DynConvFn.apply(out_dtype, x, *weights)
