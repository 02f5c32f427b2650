"""Support activation (DPCN SAM) on CUDA: one Gram GEMM plus one Triton window/max kernel.

Twin (pure PyTorch, the oracle): ``dcm.functional.support_activation._raw_torch``.

For masked support features ``s`` (``[B, K, C, Hs, Ws]``) and query features ``q`` (``[B, C, Hq, Wq]``)
the un-normalised activation of window ``w = (dh, dw)`` is::

    raw[b, k, w, r] = max_p  1/(dh·dw) · Σ_δ  G[b, k, p + δ, r + δ],     G = ŝᵀ q̂

with per-position unit vectors ``ŝ = s·m / max(m·|s|, eps)``, ``q̂ = q / max(|q|, eps)`` and zero
vectors outside the maps. The pipeline:

1. **prep** (Triton): scale each position by its inverse norm (the norms come from one
   ``torch.linalg.vector_norm`` pass) and write ``ŝ``, ``q̂`` transposed to ``[rows, C]`` in the GEMM
   dtype, padding ``C`` and the query positions to multiples of 8 (cuBLAS alignment: ``N = 3599``
   runs ~4.5× slower than ``N = 3600``).
2. **Gram GEMM** (cuBLAS): ``G = ŝ q̂ᵀ`` in ``[B, K·HsWs, HqWq]`` with float32 output
   (``torch.bmm(..., out_dtype=torch.float32)``).
   * under CUDA autocast (bf16 / fp16): one GEMM in the autocast dtype, fp32 accumulation;
   * otherwise (float32-accurate mode): a **bf16x3 split**. Each fp32 value ``v`` is written as
     ``v_hi = bf16(v)``, ``v_lo = bf16(v - v_hi)``; the GEMM runs over the concatenated inner
     dimension ``[ŝ_hi | ŝ_hi | ŝ_lo] · [q̂_hi | q̂_lo | q̂_hi]ᵀ = ŝ_hi q̂_hiᵀ + ŝ_hi q̂_loᵀ + ŝ_lo q̂_hiᵀ``
     with fp32 accumulation: only ``ŝ_lo q̂_lo`` (relative 2⁻¹⁶) and the rounding of the low parts
     (2⁻¹⁷) are lost, so the Gram entries land within ~1e-6 of float64, three bf16 tensor-core GEMMs
     instead of one slow fp32 (non-TF32) GEMM.
3. **window/max** (Triton): one program takes a block of query positions and a range of support
   positions, and for every support block forms all windows' diagonally shifted sums from the
   *union* of the windows' offsets (13 shifted tile loads for (5,1), (3,3), (1,5)), keeping a
   running max and argmax per window. The support range is split over a few programs when the grid
   would be too small; a tiny ``max`` over the splits combines them.

Backward (exact sub-gradient of the max: the first argmax): the Gram gradient
``dG[p*+δ, r+δ] += g[r]/(dh·dw)`` is built densely, without atomics, by a Triton kernel in the GEMM
dtype (hi/lo parts in the float32 mode), followed by two GEMMs (``dŝ = dG q̂``, ``dq̂ = dGᵀ ŝ``,
three each in the split mode) and a Triton kernel for the normalisation backward
``dx = scale·(dx̂ - [not clamped]·x̂⟨x̂, dx̂⟩)``. The support mask gets no gradient.

Extra memory (forward): the two prepared operands (GEMM dtype, ×3 in the split mode) and ``G`` in
float32; at B=8, C=2048, 60×60, bf16: 118 + 118 + 415 MB.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .launch import LAUNCH_OPTS, tuning

__all__ = ["sam_raw", "supported"]

MODE_X3, MODE_BF16, MODE_FP16 = 0, 1, 2
_MAXW = 3


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _prep_kernel(x_ptr, sc_ptr, o_ptr, C, HW, ROWS, LD, CP, MODE: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    p = pid_p * BP + tl.arange(0, BP)
    c = pid_c * BC + tl.arange(0, BC)
    m = (p < HW)[:, None] & (c < C)[None, :]
    v = tl.load(x_ptr + g * C * HW + c[None, :].to(tl.int64) * HW + p[:, None], mask=m, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + g * HW + p, mask=p < HW, other=0.0)
    v = v * sc[:, None]
    optr = o_ptr + (g * ROWS + p)[:, None] * LD + c[None, :]
    om = (p < ROWS)[:, None] & (c < CP)[None, :]
    if MODE == 0:
        tl.store(optr, v.to(o_ptr.dtype.element_ty), mask=om)
    else:
        hi = v.to(tl.bfloat16)
        lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
        if MODE == 1:  # support order: hi, hi, lo
            tl.store(optr, hi, mask=om)
            tl.store(optr + CP, hi, mask=om)
            tl.store(optr + 2 * CP, lo, mask=om)
        else:  # query order: hi, lo, hi
            tl.store(optr, hi, mask=om)
            tl.store(optr + CP, lo, mask=om)
            tl.store(optr + 2 * CP, hi, mask=om)


@triton.jit
def _in_win(dh, dw, DH: tl.constexpr, DW: tl.constexpr):
    return (dh * dh <= (DH // 2) * (DH // 2)) & (dw * dw <= (DW // 2) * (DW // 2))


@triton.jit
def _run_update(acc, pv, p0, best, barg):
    a = tl.where(pv[:, None], acc, float("-inf"))
    bm = tl.max(a, 0)
    ba = tl.argmax(a, 0) + p0
    upd = bm > best
    return tl.where(upd, bm, best), tl.where(upd, ba, barg)


@triton.jit
def _win_kernel(
    s_ptr, val_ptr, arg_ptr,
    Hs, Ws, HWs, Hq, Wq, HWq, LDS, PCHUNK, NSPLIT, NWT, WOFF,
    NWIN: tl.constexpr,
    DH0: tl.constexpr, DW0: tl.constexpr, DH1: tl.constexpr, DW1: tl.constexpr,
    DH2: tl.constexpr, DW2: tl.constexpr,
    PHM: tl.constexpr, PWM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
):
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    r = pid_r * BR + tl.arange(0, BR)
    rv = r < HWq
    rh = r // Wq
    rw = r % Wq
    sb = s_ptr + g * HWs * LDS
    pstart = split * PCHUNK
    pend = tl.minimum(pstart + PCHUNK, HWs)
    best0 = tl.full([BR], float("-inf"), tl.float32)
    best1 = best0
    best2 = best0
    arg0 = tl.zeros([BR], tl.int32)
    arg1 = arg0
    arg2 = arg0
    for p0 in range(pstart, pend, BP):
        p = p0 + tl.arange(0, BP)
        pv = p < pend
        ph = p // Ws
        pw = p % Ws
        acc0 = tl.zeros([BP, BR], tl.float32)
        acc1 = tl.zeros([BP, BR], tl.float32)
        acc2 = tl.zeros([BP, BR], tl.float32)
        for di in tl.static_range(2 * PHM + 1):
            dh = di - PHM
            pokh = pv & (ph + dh >= 0) & (ph + dh < Hs)
            rokh = rv & (rh + dh >= 0) & (rh + dh < Hq)
            for dj in tl.static_range(2 * PWM + 1):
                dw = dj - PWM
                u0 = _in_win(dh, dw, DH0, DW0)
                u1 = (NWIN > 1) & _in_win(dh, dw, DH1, DW1)
                u2 = (NWIN > 2) & _in_win(dh, dw, DH2, DW2)
                if u0 | u1 | u2:
                    pm = pokh & (pw + dw >= 0) & (pw + dw < Ws)
                    rm = rokh & (rw + dw >= 0) & (rw + dw < Wq)
                    ptr = sb + (p + (dh * Ws + dw))[:, None] * LDS + (r + (dh * Wq + dw))[None, :]
                    v = tl.load(ptr, mask=pm[:, None] & rm[None, :], other=0.0)
                    if u0:
                        acc0 += v
                    if u1:
                        acc1 += v
                    if u2:
                        acc2 += v
        best0, arg0 = _run_update(acc0, pv, p0, best0, arg0)
        if NWIN > 1:
            best1, arg1 = _run_update(acc1, pv, p0, best1, arg1)
        if NWIN > 2:
            best2, arg2 = _run_update(acc2, pv, p0, best2, arg2)
    o = ((g * NWT + WOFF) * NSPLIT + split) * HWq + r
    tl.store(val_ptr + o, best0 * (1.0 / (DH0 * DW0)), mask=rv)
    tl.store(arg_ptr + o, arg0, mask=rv)
    if NWIN > 1:
        tl.store(val_ptr + o + NSPLIT * HWq, best1 * (1.0 / (DH1 * DW1)), mask=rv)
        tl.store(arg_ptr + o + NSPLIT * HWq, arg1, mask=rv)
    if NWIN > 2:
        tl.store(val_ptr + o + 2 * NSPLIT * HWq, best2 * (1.0 / (DH2 * DW2)), mask=rv)
        tl.store(arg_ptr + o + 2 * NSPLIT * HWq, arg2, mask=rv)


@triton.jit
def _dg_window(val, arg_ptr, g_ptr, p, ph, pw, r, rh, rw, Hs, Ws, Hq, Wq, HWq, DH: tl.constexpr, DW: tl.constexpr):
    scale = 1.0 / (DH * DW)
    for di in tl.static_range(DH):
        dh = di - DH // 2
        for dj in tl.static_range(DW):
            dw = dj - DW // 2
            rm = (r < HWq) & (rh - dh >= 0) & (rh - dh < Hq) & (rw - dw >= 0) & (rw - dw < Wq)
            rs = r - (dh * Wq + dw)
            a = tl.load(arg_ptr + rs, mask=rm, other=-1)
            gv = tl.load(g_ptr + rs, mask=rm, other=0.0) * scale
            pm = (ph - dh >= 0) & (ph - dh < Hs) & (pw - dw >= 0) & (pw - dw < Ws)
            ps = tl.where(pm, p - (dh * Ws + dw), -2)
            val += tl.where(ps[:, None] == a[None, :], gv[None, :], 0.0)
    return val


@triton.jit
def _dg_kernel(
    arg_ptr, g_ptr, d_ptr, dl_ptr,
    Hs, Ws, HWs, Hq, Wq, HWq, NP, NWT, WOFF,
    NWIN: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
    DH0: tl.constexpr, DW0: tl.constexpr, DH1: tl.constexpr, DW1: tl.constexpr,
    DH2: tl.constexpr, DW2: tl.constexpr,
    BP: tl.constexpr, BR: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_p = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    r = pid_r * BR + tl.arange(0, BR)
    rh = r // Wq
    rw = r % Wq
    p = pid_p * BP + tl.arange(0, BP)
    ph = p // Ws
    pw = p % Ws
    val = tl.zeros([BP, BR], tl.float32)
    base = (g * NWT + WOFF) * HWq
    val = _dg_window(val, arg_ptr + base, g_ptr + base, p, ph, pw, r, rh, rw, Hs, Ws, Hq, Wq, HWq, DH0, DW0)
    if NWIN > 1:
        val = _dg_window(val, arg_ptr + base + HWq, g_ptr + base + HWq, p, ph, pw, r, rh, rw, Hs, Ws, Hq, Wq, HWq, DH1, DW1)
    if NWIN > 2:
        val = _dg_window(val, arg_ptr + base + 2 * HWq, g_ptr + base + 2 * HWq, p, ph, pw, r, rh, rw, Hs, Ws, Hq, Wq, HWq, DH2, DW2)
    optr = (g * HWs + p)[:, None] * NP + r[None, :]
    om = (p < HWs)[:, None] & (r < NP)[None, :]
    if ACC:
        val += tl.load(d_ptr + optr, mask=om, other=0.0).to(tl.float32)
        if SPLIT:
            val += tl.load(dl_ptr + optr, mask=om, other=0.0).to(tl.float32)
    if SPLIT:
        hi = val.to(tl.bfloat16)
        tl.store(d_ptr + optr, hi, mask=om)
        tl.store(dl_ptr + optr, (val - hi.to(tl.float32)).to(tl.bfloat16), mask=om)
    else:
        tl.store(d_ptr + optr, val.to(d_ptr.dtype.element_ty), mask=om)


@triton.jit
def _norm_bwd_kernel(x_ptr, dn_ptr, sc_ptr, nc_ptr, dx_ptr, C, HW, ROWS, LD, BP: tl.constexpr, BC: tl.constexpr):
    # dx[c, p] = sc[p] · (dn[p, c] - nc[p] · x̂[c, p] · Σ_c' x̂[c', p] dn[p, c'])     x̂ = x · sc
    pid_p = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    p = pid_p * BP + tl.arange(0, BP)
    pv = p < HW
    sc = tl.load(sc_ptr + g * HW + p, mask=pv, other=0.0)
    nc = tl.load(nc_ptr + g * HW + p, mask=pv, other=0.0)
    xb = x_ptr + g * C * HW
    db = dn_ptr + (g * ROWS + p)[:, None] * LD
    dot = tl.zeros([BP], tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        m = pv[:, None] & (c < C)[None, :]
        xv = tl.load(xb + c[None, :].to(tl.int64) * HW + p[:, None], mask=m, other=0.0).to(tl.float32)
        dv = tl.load(db + c[None, :], mask=m, other=0.0)
        dot += tl.sum(xv * dv, 1)
    coef = nc * sc * sc * sc * dot
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        m = pv[:, None] & (c < C)[None, :]
        xptr = c[None, :].to(tl.int64) * HW + p[:, None]
        xv = tl.load(xb + xptr, mask=m, other=0.0).to(tl.float32)
        dv = tl.load(db + c[None, :], mask=m, other=0.0)
        dx = sc[:, None] * dv - coef[:, None] * xv
        tl.store(dx_ptr + g * C * HW + xptr, dx.to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
#: launch configuration of the window kernel (knobs SAM_BP, SAM_BR, SAM_WARPS, SAM_PROGS), read at import
_WIN_BP, _WIN_BR, _WIN_WARPS, _WIN_PROGRAMS = (tuning(f"SAM_{k}") for k in ("BP", "BR", "WARPS", "PROGS"))


def _ceil8(n: int) -> int:
    return (n + 7) // 8 * 8


@functools.lru_cache(maxsize=None)
def _has_dtype_mm(dev: str) -> Tuple[bool, bool]:
    """(bmm with out_dtype works, baddbmm with out_dtype works) on this torch build."""
    a = torch.ones(1, 8, 8, device=dev, dtype=torch.bfloat16)
    ok_bmm = ok_badd = False
    try:
        ok_bmm = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:
        pass
    try:
        c = torch.zeros(1, 8, 8, device=dev, dtype=torch.float32)
        ok_badd = torch.baddbmm(c, a, a, out_dtype=torch.float32).dtype == torch.float32
    except Exception:
        pass
    return ok_bmm, ok_badd


def _bmm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype == torch.float32 or not a.is_cuda:
        return torch.bmm(a.float(), b.float())
    if _has_dtype_mm(str(a.device))[0]:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b).float()  # old torch: output rounded to the GEMM dtype


def _bmm32_sum(pairs) -> torch.Tensor:
    out = _bmm32(*pairs[0])
    use_badd = pairs[0][0].is_cuda and pairs[0][0].dtype != torch.float32 and _has_dtype_mm(str(pairs[0][0].device))[1]
    for a, b in pairs[1:]:
        if use_badd:
            out = torch.baddbmm(out, a, b, out_dtype=torch.float32)
        else:
            out += _bmm32(a, b)
    return out


def _gemm_dtype(mode: int) -> torch.dtype:
    return torch.float16 if mode == MODE_FP16 else torch.bfloat16


def _win_groups(wins: Sequence[Tuple[int, int]]):
    for s in range(0, len(wins), _MAXW):
        grp = list(wins[s : s + _MAXW])
        meta = dict(NWIN=len(grp))
        for i, (dh, dw) in enumerate(grp + [(1, 1)] * (_MAXW - len(grp))):
            meta[f"DH{i}"], meta[f"DW{i}"] = dh, dw
        yield s, grp, meta


def _scales(x: torch.Tensor, mask: Optional[torch.Tensor], eps: float):
    """Per-position scale ``m / max(m·|x|, eps)`` and the not-clamped flag, float32 ``[G, HW]``."""
    n = torch.linalg.vector_norm(x, dim=-3, dtype=torch.float32)  # [..., H, W]
    if mask is not None:
        n = n * mask
        sc = mask / n.clamp_min(eps)
    else:
        sc = 1.0 / n.clamp_min(eps)
    return sc.flatten(-2).reshape(-1, n.shape[-2] * n.shape[-1]).contiguous(), (n > eps).float().flatten(-2).reshape(-1, n.shape[-2] * n.shape[-1]).contiguous()


# --------------------------------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------------------------------
def _forward(query, support, mask, wins, eps, mode):
    B, K, C, Hs, Ws = support.shape
    Hq, Wq = query.shape[-2:]
    HWs, HWq = Hs * Ws, Hq * Wq
    npad = _ceil8(HWq)
    q = query.contiguous()
    s = support.contiguous()
    sc_s, nc_s = _scales(s, mask, eps)
    sc_q, nc_q = _scales(q, None, eps)
    nw = len(wins)
    if B * K * HWs * HWq == 0 or C == 0:
        raw = torch.zeros((B, K, nw, Hq, Wq), device=q.device, dtype=torch.float32)
        return raw, torch.zeros((B, K, nw, Hq, Wq), device=q.device, dtype=torch.int32), sc_s, nc_s, sc_q, nc_q
    s_cat = _prep(s, sc_s, HWs, B * K, mode, "s").view(B, K * HWs, -1)
    q_cat = _prep(q, sc_q, npad, B, mode, "q").view(B, npad, -1)
    gram = _bmm32(s_cat, q_cat.transpose(1, 2))  # [B, K·HWs, npad] fp32
    del s_cat, q_cat
    G = B * K
    BP, BR = _WIN_BP, _WIN_BR
    nr = triton.cdiv(HWq, BR)
    nsplit = max(1, min(triton.cdiv(HWs, BP), triton.cdiv(_WIN_PROGRAMS, nr * G)))
    pchunk = triton.cdiv(triton.cdiv(HWs, nsplit), BP) * BP
    nsplit = triton.cdiv(HWs, pchunk)
    val = torch.empty((G, nw, nsplit, HWq), device=q.device, dtype=torch.float32)
    arg = torch.empty((G, nw, nsplit, HWq), device=q.device, dtype=torch.int32)
    for woff, grp, meta in _win_groups(wins):
        phm = max(w[0] for w in grp) // 2
        pwm = max(w[1] for w in grp) // 2
        _win_kernel[(nr, nsplit, G)](
            gram, val, arg, Hs, Ws, HWs, Hq, Wq, HWq, npad, pchunk, nsplit, nw, woff,
            PHM=phm, PWM=pwm, BP=BP, BR=BR, **LAUNCH_OPTS, num_warps=_WIN_WARPS, **meta,
        )
    if nsplit > 1:
        v, idx = val.max(dim=2)
        arg = arg.gather(2, idx[:, :, None]).squeeze(2)
    else:
        v, arg = val.squeeze(2), arg.squeeze(2)
    return v.view(B, K, nw, Hq, Wq), arg.view(B, K, nw, Hq, Wq), sc_s, nc_s, sc_q, nc_q


def _prep(x, sc, rows, g, mode, side):
    """Normalised, transposed GEMM operand of ``x`` (``side``: ``"q"`` query or ``"s"`` support; in the
    bf16x3 mode the two sides lay out their hi/lo parts differently, see the module docstring)."""
    C, HW = x.shape[-3], x.shape[-2] * x.shape[-1]
    cp = _ceil8(C)
    parts = 3 if mode == MODE_X3 else 1
    out = torch.empty((g * rows, parts * cp), device=x.device, dtype=_gemm_dtype(mode))
    BP, BC = 64, 64
    grid = (triton.cdiv(rows, BP), triton.cdiv(cp, BC), g)
    kmode = 0 if mode != MODE_X3 else (2 if side == "q" else 1)
    _prep_kernel[grid](x, sc, out, C, HW, rows, parts * cp, cp, MODE=kmode, BP=BP, BC=BC, **LAUNCH_OPTS, num_warps=4)
    return out


def _backward(query, support, mask, arg, sc_s, nc_s, sc_q, nc_q, graw, wins, eps, mode):
    B, K, C, Hs, Ws = support.shape
    Hq, Wq = query.shape[-2:]
    HWs, HWq = Hs * Ws, Hq * Wq
    npad = _ceil8(HWq)
    cp = _ceil8(C)
    q = query.contiguous()
    s = support.contiguous()
    dq = torch.empty_like(q)
    ds = torch.empty_like(s)
    if B * K * HWs * HWq == 0 or C == 0:
        return dq.zero_(), ds.zero_()
    G, nw = B * K, len(wins)
    graw = graw.contiguous().float()
    arg = arg.contiguous()
    split = mode == MODE_X3
    d = torch.empty((B, K * HWs, npad), device=q.device, dtype=_gemm_dtype(mode))
    dl = torch.empty_like(d) if split else d
    BP, BR = 32, 64
    grid = (triton.cdiv(npad, BR), triton.cdiv(HWs, BP), G)
    for woff, grp, meta in _win_groups(wins):
        _dg_kernel[grid](
            arg, graw, d, dl, Hs, Ws, HWs, Hq, Wq, HWq, npad, nw, woff,
            SPLIT=split, ACC=woff > 0, BP=BP, BR=BR, **LAUNCH_OPTS, num_warps=4, **meta,
        )
    s_cat = _prep(s, sc_s, HWs, G, mode, "s").view(B, K * HWs, -1)
    q_cat = _prep(q, sc_q, npad, B, mode, "q").view(B, npad, -1)
    if split:
        qh, ql = q_cat[..., :cp], q_cat[..., cp : 2 * cp]
        sh, sl = s_cat[..., :cp], s_cat[..., 2 * cp :]
        dn_s = _bmm32_sum([(d, qh), (d, ql), (dl, qh)])
        dt, dlt = d.transpose(1, 2), dl.transpose(1, 2)
        dn_q = _bmm32_sum([(dt, sh), (dt, sl), (dlt, sh)])
    else:
        dn_s = _bmm32(d, q_cat)
        dn_q = _bmm32(d.transpose(1, 2), s_cat)
    del d, dl, s_cat, q_cat
    # normalisation backward (writes the input gradients in the inputs' dtype and NCHW layout)
    BPn, BCn = 32, 64
    _norm_bwd_kernel[(triton.cdiv(HWs, BPn), G)](s, dn_s, sc_s, nc_s, ds, C, HWs, HWs, cp, BP=BPn, BC=BCn, **LAUNCH_OPTS, num_warps=4)
    _norm_bwd_kernel[(triton.cdiv(HWq, BPn), B)](q, dn_q, sc_q, nc_q, dq, C, HWq, npad, cp, BP=BPn, BC=BCn, **LAUNCH_OPTS, num_warps=4)
    return dq, ds


# --------------------------------------------------------------------------------------------------
# autograd: eager Function and custom ops for torch.compile
# --------------------------------------------------------------------------------------------------
def _flat(wins) -> List[int]:
    return [int(v) for w in wins for v in w]


def _unflat(flat: Sequence[int]) -> List[Tuple[int, int]]:
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


class _SamFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, support, mask, wins, eps, mode):
        raw, arg, sc_s, nc_s, sc_q, nc_q = _forward(query, support, mask, wins, eps, mode)
        ctx.save_for_backward(query, support, mask, arg, sc_s, nc_s, sc_q, nc_q)
        ctx.cfg = (wins, eps, mode)
        ctx.mark_non_differentiable(arg)
        return raw

    @staticmethod
    def backward(ctx, g):
        query, support, mask, arg, sc_s, nc_s, sc_q, nc_q = ctx.saved_tensors
        wins, eps, mode = ctx.cfg
        dq, ds = _backward(query, support, mask, arg, sc_s, nc_s, sc_q, nc_q, g, wins, eps, mode)
        return dq, ds, None, None, None, None


@torch.library.custom_op("dcm::sam_fwd", mutates_args=())
def _sam_fwd_op(
    query: torch.Tensor, support: torch.Tensor, mask: Optional[torch.Tensor], windows: List[int], eps: float, mode: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(query, support, mask, _unflat(windows), eps, mode)


@_sam_fwd_op.register_fake
def _(query, support, mask, windows, eps, mode):
    B, K, C, Hs, Ws = support.shape
    Hq, Wq = query.shape[-2:]
    nw = len(windows) // 2
    f = torch.float32
    return (
        query.new_empty((B, K, nw, Hq, Wq), dtype=f),
        query.new_empty((B, K, nw, Hq, Wq), dtype=torch.int32),
        query.new_empty((B * K, Hs * Ws), dtype=f),
        query.new_empty((B * K, Hs * Ws), dtype=f),
        query.new_empty((B, Hq * Wq), dtype=f),
        query.new_empty((B, Hq * Wq), dtype=f),
    )


@torch.library.custom_op("dcm::sam_bwd", mutates_args=())
def _sam_bwd_op(
    query: torch.Tensor, support: torch.Tensor, mask: Optional[torch.Tensor], arg: torch.Tensor,
    sc_s: torch.Tensor, nc_s: torch.Tensor, sc_q: torch.Tensor, nc_q: torch.Tensor, g: torch.Tensor,
    windows: List[int], eps: float, mode: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _backward(query, support, mask, arg, sc_s, nc_s, sc_q, nc_q, g, _unflat(windows), eps, mode)


@_sam_bwd_op.register_fake
def _(query, support, mask, arg, sc_s, nc_s, sc_q, nc_q, g, windows, eps, mode):
    return (
        query.new_empty(query.shape),
        support.new_empty(support.shape),
    )


def _sam_setup(ctx, inputs, output):
    query, support, mask, windows, eps, mode = inputs
    raw, arg, sc_s, nc_s, sc_q, nc_q = output
    ctx.save_for_backward(query, support, mask, arg, sc_s, nc_s, sc_q, nc_q)
    ctx.cfg = (windows, eps, mode)


def _sam_bwd_formula(ctx, g_raw, *unused):
    query, support, mask, arg, sc_s, nc_s, sc_q, nc_q = ctx.saved_tensors
    windows, eps, mode = ctx.cfg
    if g_raw is None:
        g_raw = torch.zeros(arg.shape, device=arg.device, dtype=torch.float32)
    dq, ds = torch.ops.dcm.sam_bwd(query, support, mask, arg, sc_s, nc_s, sc_q, nc_q, g_raw, windows, eps, mode)
    return dq, ds, None, None, None, None


_sam_fwd_op.register_autograd(_sam_bwd_formula, setup_context=_sam_setup)


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
def _gemm_mode(x: torch.Tensor) -> int:
    """GEMM precision: the CUDA autocast dtype when autocast is on, else the float32-accurate split."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        if dt == torch.bfloat16:
            return MODE_BF16
        if dt == torch.float16:
            return MODE_FP16
    return MODE_X3


def supported(query: torch.Tensor, support: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """Whether the fused path handles these inputs (else the caller uses the PyTorch twin)."""
    ok = (torch.float16, torch.bfloat16, torch.float32)
    if query.dtype not in ok or support.dtype not in ok:
        return False
    if mask is not None and mask.requires_grad:
        return False
    return True


def sam_raw(
    query: torch.Tensor,
    support: torch.Tensor,
    mask: Optional[torch.Tensor],
    windows: Sequence[Tuple[int, int]],
    eps: float = 1e-7,
) -> torch.Tensor:
    """Un-normalised activations ``Tensor[B, K, nW, Hq, Wq]`` (float32) of raw features.

    Args:
        query: ``Tensor[B, C, Hq, Wq]`` (not normalised); support: ``Tensor[B, K, C, Hs, Ws]``;
        mask: per-position support weights ``Tensor[B, K, Hs, Ws]`` (≥ 0, no gradient) or ``None``
            (``support`` already masked); the cosine uses ``s·m`` exactly as the PyTorch twin.
    """
    wins = [(int(a), int(b)) for a, b in windows]
    mode = _gemm_mode(query)
    if mask is not None:
        mask = mask.detach().to(torch.float32).contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.dcm.sam_fwd(query, support, mask, _flat(wins), float(eps), mode)[0]
    return _SamFn.apply(query, support, mask, wins, float(eps), mode)
