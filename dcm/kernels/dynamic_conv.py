"""Fused Triton kernels for several dynamic depthwise convolutions of one input (DCM, DPCN Eq. 8).

Twin (pure PyTorch, the oracle): :func:`dcm.functional.dynamic_depthwise_conv2d_multi` with the
``"torch"`` backend (one grouped convolution, ``groups = B·C``, per kernel set).

Forward: one program handles ``BLOCK`` flattened positions of one ``(b, c)`` plane. It loops over the
*union* of the kernels' taps (for 5×1, 1×5 and 5×5: 25 offsets), loads the shifted input once per
offset (masked at the borders: "same" zero padding) and adds it, times each kernel's weight, to the
accumulator of every kernel that has that tap. So ``x`` is read from device memory once and each
output is written once; accumulation is float32 whatever the input dtype.

Backward (one kernel): ``dx`` is the same stencil with the taps mirrored (a transposed correlation,
summed over the kernel sets), and the weight gradient ``dW_k[b, c, i, j] = Σ_{h,w} g_k[h, w] ·
x[h + i - kh//2, w + j - kw//2]`` is reduced per program (one partial sum per block of positions,
summed afterwards in float32), so ``x`` and the output gradients are read once.

Autograd: in eager mode a :class:`torch.autograd.Function` (no custom-op dispatch overhead); under
``torch.compile`` the same kernels run through the ``dcm::dynconv_fwd`` / ``dcm::dynconv_bwd``
custom ops (with fake implementations and a registered autograd formula), so graphs stay whole.
Both paths capture in CUDA graphs (no host synchronisation).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["dynamic_depthwise_conv2d_multi", "supported"]

_MAX_PER_LAUNCH = 3


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dw_fwd_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, o0_ptr, o1_ptr, o2_ptr,
    H, W, HW,
    NOUT: tl.constexpr,
    KH0: tl.constexpr, KW0: tl.constexpr, KH1: tl.constexpr, KW1: tl.constexpr,
    KH2: tl.constexpr, KW2: tl.constexpr,
    PHM: tl.constexpr, PWM: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_s = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    offs = pid_s * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    hh = offs // W
    ww = offs % W
    xb = x_ptr + plane * HW
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for di in tl.static_range(2 * PHM + 1):
        dh = di - PHM
        rok = inb & (hh + dh >= 0) & (hh + dh < H)
        for dj in tl.static_range(2 * PWM + 1):
            dw = dj - PWM
            u0 = (dh * dh <= (KH0 // 2) * (KH0 // 2)) & (dw * dw <= (KW0 // 2) * (KW0 // 2))
            u1 = (NOUT > 1) & (dh * dh <= (KH1 // 2) * (KH1 // 2)) & (dw * dw <= (KW1 // 2) * (KW1 // 2))
            u2 = (NOUT > 2) & (dh * dh <= (KH2 // 2) * (KH2 // 2)) & (dw * dw <= (KW2 // 2) * (KW2 // 2))
            if u0 | u1 | u2:
                m = rok & (ww + dw >= 0) & (ww + dw < W)
                v = tl.load(xb + offs + (dh * W + dw), mask=m, other=0.0).to(tl.float32)
                if u0:
                    t0 = tl.load(w0_ptr + plane * (KH0 * KW0) + ((dh + KH0 // 2) * KW0 + dw + KW0 // 2))
                    acc0 += v * t0.to(tl.float32)
                if u1:
                    t1 = tl.load(w1_ptr + plane * (KH1 * KW1) + ((dh + KH1 // 2) * KW1 + dw + KW1 // 2))
                    acc1 += v * t1.to(tl.float32)
                if u2:
                    t2 = tl.load(w2_ptr + plane * (KH2 * KW2) + ((dh + KH2 // 2) * KW2 + dw + KW2 // 2))
                    acc2 += v * t2.to(tl.float32)
    tl.store(o0_ptr + plane * HW + offs, acc0.to(o0_ptr.dtype.element_ty), mask=inb)
    if NOUT > 1:
        tl.store(o1_ptr + plane * HW + offs, acc1.to(o1_ptr.dtype.element_ty), mask=inb)
    if NOUT > 2:
        tl.store(o2_ptr + plane * HW + offs, acc2.to(o2_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _dx_taps(acc, g_ptr, w_ptr, plane, offs, hh, ww, inb, H, W, HW, KH: tl.constexpr, KW: tl.constexpr):
    # dx[h, w] += Σ_{i,j} g[h - dh, w - dw] · w[i, j]   with (dh, dw) = (i - KH//2, j - KW//2)
    gb = g_ptr + plane * HW
    for i in tl.static_range(KH):
        dh = i - KH // 2
        rok = inb & (hh - dh >= 0) & (hh - dh < H)
        for j in tl.static_range(KW):
            dw = j - KW // 2
            m = rok & (ww - dw >= 0) & (ww - dw < W)
            v = tl.load(gb + offs - (dh * W + dw), mask=m, other=0.0).to(tl.float32)
            t = tl.load(w_ptr + plane * (KH * KW) + (i * KW + j)).to(tl.float32)
            acc += v * t
    return acc


@triton.jit
def _dw_bwd_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, g0_ptr, g1_ptr, g2_ptr, dx_ptr, p0_ptr, p1_ptr, p2_ptr,
    H, W, HW, NPLANES,
    NOUT: tl.constexpr,
    KH0: tl.constexpr, KW0: tl.constexpr, KH1: tl.constexpr, KW1: tl.constexpr,
    KH2: tl.constexpr, KW2: tl.constexpr,
    PHM: tl.constexpr, PWM: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_s = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    offs = pid_s * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    hh = offs // W
    ww = offs % W
    # weight gradients: partial sums over this block, one per (kernel, tap)
    g0 = tl.load(g0_ptr + plane * HW + offs, mask=inb, other=0.0).to(tl.float32)
    g1 = g0
    g2 = g0
    if NOUT > 1:
        g1 = tl.load(g1_ptr + plane * HW + offs, mask=inb, other=0.0).to(tl.float32)
    if NOUT > 2:
        g2 = tl.load(g2_ptr + plane * HW + offs, mask=inb, other=0.0).to(tl.float32)
    prow = pid_s.to(tl.int64) * NPLANES + plane
    xb = x_ptr + plane * HW
    for di in tl.static_range(2 * PHM + 1):
        dh = di - PHM
        rok = inb & (hh + dh >= 0) & (hh + dh < H)
        for dj in tl.static_range(2 * PWM + 1):
            dw = dj - PWM
            u0 = (dh * dh <= (KH0 // 2) * (KH0 // 2)) & (dw * dw <= (KW0 // 2) * (KW0 // 2))
            u1 = (NOUT > 1) & (dh * dh <= (KH1 // 2) * (KH1 // 2)) & (dw * dw <= (KW1 // 2) * (KW1 // 2))
            u2 = (NOUT > 2) & (dh * dh <= (KH2 // 2) * (KH2 // 2)) & (dw * dw <= (KW2 // 2) * (KW2 // 2))
            if u0 | u1 | u2:
                m = rok & (ww + dw >= 0) & (ww + dw < W)
                v = tl.load(xb + offs + (dh * W + dw), mask=m, other=0.0).to(tl.float32)
                if u0:
                    tl.store(p0_ptr + prow * (KH0 * KW0) + ((dh + KH0 // 2) * KW0 + dw + KW0 // 2), tl.sum(v * g0, 0))
                if u1:
                    tl.store(p1_ptr + prow * (KH1 * KW1) + ((dh + KH1 // 2) * KW1 + dw + KW1 // 2), tl.sum(v * g1, 0))
                if u2:
                    tl.store(p2_ptr + prow * (KH2 * KW2) + ((dh + KH2 // 2) * KW2 + dw + KW2 // 2), tl.sum(v * g2, 0))
    # input gradient: mirrored stencil of every kernel set, summed
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc = _dx_taps(acc, g0_ptr, w0_ptr, plane, offs, hh, ww, inb, H, W, HW, KH0, KW0)
    if NOUT > 1:
        acc = _dx_taps(acc, g1_ptr, w1_ptr, plane, offs, hh, ww, inb, H, W, HW, KH1, KW1)
    if NOUT > 2:
        acc = _dx_taps(acc, g2_ptr, w2_ptr, plane, offs, hh, ww, inb, H, W, HW, KH2, KW2)
    tl.store(dx_ptr + plane * HW + offs, acc.to(dx_ptr.dtype.element_ty), mask=inb)


# --------------------------------------------------------------------------------------------------
# launchers (shared by the eager autograd.Function and the custom ops)
# --------------------------------------------------------------------------------------------------
def _block(hw: int) -> int:
    """Positions per program: the power of two in [128, 1024] that wastes the fewest lanes."""
    best, waste = 1024, None
    for b in (1024, 512, 256, 128):
        w = -(-hw // b) * b - hw
        if waste is None or w < waste:
            best, waste = b, w
    return best


def _warps(block: int) -> int:
    return 4 if block >= 512 else 2


def _meta(ws: Sequence[torch.Tensor]):
    ks = [(int(w.shape[-2]), int(w.shape[-1])) for w in ws]
    ks3 = ks + [(1, 1)] * (_MAX_PER_LAUNCH - len(ks))
    phm = max(k[0] for k in ks) // 2
    pwm = max(k[1] for k in ks) // 2
    meta = dict(NOUT=len(ks), PHM=phm, PWM=pwm)
    for i, (kh, kw) in enumerate(ks3):
        meta[f"KH{i}"], meta[f"KW{i}"] = kh, kw
    return meta


def _fwd_launch(x: torch.Tensor, ws: Sequence[torch.Tensor], out_dtype: torch.dtype) -> List[torch.Tensor]:
    B, C, H, W = x.shape
    HW = H * W
    outs = [torch.empty((B, C, H, W), device=x.device, dtype=out_dtype) for _ in ws]
    if B * C * HW == 0:
        return outs
    block = _block(HW)
    for s in range(0, len(ws), _MAX_PER_LAUNCH):
        wg = list(ws[s : s + _MAX_PER_LAUNCH])
        og = outs[s : s + _MAX_PER_LAUNCH]
        pw = wg + [wg[0]] * (_MAX_PER_LAUNCH - len(wg))
        po = og + [og[0]] * (_MAX_PER_LAUNCH - len(og))
        grid = (triton.cdiv(HW, block), B * C)
        _dw_fwd_kernel[grid](x, *pw, *po, H, W, HW, BLOCK=block, num_warps=_warps(block), **_meta(wg))
    return outs


def _bwd_launch(x: torch.Tensor, ws: Sequence[torch.Tensor], gs: Sequence[torch.Tensor]):
    B, C, H, W = x.shape
    HW = H * W
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B * C * HW == 0:
        return dx.zero_(), [torch.zeros_like(w) for w in ws]
    block = _block(HW)
    nblk = triton.cdiv(HW, block)
    dws: List[torch.Tensor] = []
    dx_parts = []
    for s in range(0, len(ws), _MAX_PER_LAUNCH):
        wg = list(ws[s : s + _MAX_PER_LAUNCH])
        gg = list(gs[s : s + _MAX_PER_LAUNCH])
        parts = [torch.empty((nblk, B * C, w.shape[-2] * w.shape[-1]), device=x.device, dtype=torch.float32) for w in wg]
        tgt = dx if s == 0 else torch.empty_like(dx)
        pw = wg + [wg[0]] * (_MAX_PER_LAUNCH - len(wg))
        pg = gg + [gg[0]] * (_MAX_PER_LAUNCH - len(gg))
        pp = parts + [parts[0]] * (_MAX_PER_LAUNCH - len(parts))
        grid = (nblk, B * C)
        _dw_bwd_kernel[grid](x, *pw, *pg, tgt, *pp, H, W, HW, B * C, BLOCK=block, num_warps=_warps(block), **_meta(wg))
        if s:
            dx_parts.append(tgt)
        for w, p in zip(wg, parts):
            dws.append(p.sum(0).reshape(w.shape).to(w.dtype))
    for t in dx_parts:
        dx += t
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
    return [x.new_empty(x.shape, dtype=out_dtype, memory_format=torch.contiguous_format) for _ in weights]


@torch.library.custom_op("dcm::dynconv_bwd", mutates_args=())
def _dynconv_bwd_op(x: torch.Tensor, weights: List[torch.Tensor], grads: List[torch.Tensor]) -> List[torch.Tensor]:
    x, ws = _prep(x, weights)
    dx, dws = _bwd_launch(x, ws, [g.contiguous() for g in grads])
    return [dx] + dws


@_dynconv_bwd_op.register_fake
def _(x, weights, grads):
    return [x.new_empty(x.shape, memory_format=torch.contiguous_format)] + [w.new_empty(w.shape) for w in weights]


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
    return _DynConvFn.apply(out_dtype, x, *weights)
