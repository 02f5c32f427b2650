"""The Triton fast paths (dcm.kernels) against float64 references on CUDA. Skipped without a GPU.

Tolerances (‖got − ref‖ / ‖ref‖ unless stated), measured on an H100 and chosen with margin:

| path | float32 | bfloat16 | float16 |
|---|---|---|---|
| dynamic conv (fp32 accumulate, output rounded to the dtype) | 1e-5 | 1e-2 | 2e-3 |
| support activation, no autocast (bf16x3 Gram, any input dtype) | max abs 2e-5 | same | same |
| support activation under autocast (Gram in the autocast dtype) | — | max abs 3e-2 | max abs 5e-3 |
| gradients (relative norm) | 1e-4 (x3) | 0.2 under autocast | 0.1 under autocast |

Under autocast the Gram entries carry ~1e-3 (bf16) errors, so the arg-max support position of a query
position can switch between two near-equal candidates; the gradient then lands on another support
position, which is as valid a sub-gradient but far from the float64 one in norm. The float32-mode
tests check the backward itself tightly.

The float64 reference is the same op with the ``"torch"`` backend on upcast inputs (itself tested
against the literal paper transcriptions in ``test_dcm_parity.py``).
"""
import warnings

import pytest
import torch

import dcm
import dcm.functional as DF

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
D = torch.float64


def _kernels_ok():
    from dcm import kernels

    return kernels.available()


@pytest.fixture(autouse=True)
def _need_kernels():
    if not _kernels_ok():
        pytest.skip("dcm.kernels unavailable (Triton)")
    dcm.set_backend("auto")
    yield
    dcm.set_backend("auto")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def maxabs(a, b):
    return (a.double() - b.double()).abs().max().item()


def seeded(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


# ---------------------------------------------------------------------------------- dynamic conv
DW_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DW_SIZES = [(2, 16, 61, 59), (3, 5, 7, 9), (1, 3, 1, 1), (2, 4, 2, 3)]
KSETS = {
    "vhs5": [(5, 1), (1, 5), (5, 5)],
    "sq3": [(3, 3)],
    "four": [(5, 1), (1, 5), (5, 5), (7, 3)],
    "big": [(9, 9)],
}


def _dw_case(shape, ks, dtype, seed=0):
    B, C, H, W = shape
    g = seeded(seed)
    x = torch.randn(B, C, H, W, device=DEV, generator=g).to(dtype)
    ws = [torch.randn(B, C, *k, device=DEV, generator=g).to(dtype) / k[0] for k in ks]
    return x, ws


def _dw_ref(x, ws, gs=None):
    xd = x.detach().double().requires_grad_()
    wd = [w.detach().double().requires_grad_() for w in ws]
    with dcm.use_backend("torch"):
        out = DF.dynamic_depthwise_conv2d_multi(xd, wd)
    if gs is None:
        return out
    grads = torch.autograd.grad(out, [xd] + wd, [g.double() for g in gs])
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", DW_SIZES)
@pytest.mark.parametrize("kset", list(KSETS))
def test_dynamic_conv_forward_backward(dtype, shape, kset):
    x, ws = _dw_case(shape, KSETS[kset], dtype)
    x.requires_grad_()
    for w in ws:
        w.requires_grad_()
    outs = DF.dynamic_depthwise_conv2d_multi(x, ws)
    assert all(o.dtype == dtype and o.shape == x.shape for o in outs)
    gs = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, [x] + ws, gs)
    ref, rgrads = _dw_ref(x, ws, gs)
    tol = DW_TOL[dtype]
    for o, r in zip(outs, ref):
        assert rel(o, r) < tol
    for g, r in zip(grads, rgrads):
        assert g.dtype == dtype
        assert rel(g, r) < 2 * tol


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_conv_every_rows_per_step(monkeypatch, rows, dtype):
    """Each value of the ``DW_ROWS`` knob on the GPU, with several row chunks per plane."""
    from dcm.kernels import dynamic_conv as K

    monkeypatch.setattr(K, "_ROWS", rows)
    K._roll_cfg.cache_clear()
    try:
        x, ws = _dw_case((2, 24, 37, 45), KSETS["four"], dtype, seed=rows)
        assert K._roll_cfg(2 * 24, 37, 45)[-1] > 1
        x.requires_grad_()
        for w in ws:
            w.requires_grad_()
        outs = DF.dynamic_depthwise_conv2d_multi(x, ws)
        gs = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, [x] + ws, gs)
        ref, rgrads = _dw_ref(x, ws, gs)
        for o, r in zip(outs, ref):
            assert rel(o, r) < DW_TOL[dtype]
        for g, r in zip(grads, rgrads):
            assert rel(g, r) < 2 * DW_TOL[dtype]
    finally:
        K._roll_cfg.cache_clear()


def test_dynamic_conv_noncontiguous_and_empty():
    x, ws = _dw_case((2, 8, 13, 11), KSETS["vhs5"], torch.float32, seed=3)
    xc = x.contiguous(memory_format=torch.channels_last)
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    wt = [w.transpose(0, 1).contiguous().transpose(0, 1) for w in ws]
    ref = _dw_ref(x, ws)
    for xi, wi in ((xc, ws), (xt, wt), (x[:, ::2], [w[:, ::2] for w in ws])):
        got = DF.dynamic_depthwise_conv2d_multi(xi, wi)
        exp = ref if xi.shape[1] == x.shape[1] else [r[:, ::2] for r in ref]
        for o, r in zip(got, exp):
            assert rel(o, r) < 1e-5
    e = DF.dynamic_depthwise_conv2d_multi(x[:0], [w[:0] for w in ws])
    assert all(t.shape == (0, 8, 13, 11) for t in e)


def test_dynamic_conv_autocast_dtype():
    x, ws = _dw_case((2, 8, 9, 7), KSETS["vhs5"], torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = DF.dynamic_depthwise_conv2d_multi(x, ws)
        with dcm.use_backend("torch"):
            exp = DF.dynamic_depthwise_conv2d_multi(x, ws)
    for o, r in zip(got, exp):
        assert o.dtype == r.dtype == torch.bfloat16
        assert rel(o, r) < 1e-2


def test_dynamic_conv_opcheck():
    x, ws = _dw_case((2, 4, 7, 9), KSETS["vhs5"], torch.float32)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.dcm.dynconv_fwd, (x, ws, torch.float32))


# ---------------------------------------------------------------------------- support activation
def _sam_inputs(B, K, C, hs, hq, seed=0, dtype=torch.float32, p=0.4):
    g = seeded(seed)
    q = torch.randn(B, C, *hq, device=DEV, generator=g).relu().to(dtype)
    s = torch.randn(B, K, C, *hs, device=DEV, generator=g).relu().to(dtype)
    m = (torch.rand(B, K, 2 * hs[0] + 1, 2 * hs[1] - 1, device=DEV, generator=g) < p).long()
    return q, s, m


def _sam_ref(q, s, m, windows, grad=None):
    qd = q.detach().double().requires_grad_()
    sd = s.detach().double().requires_grad_()
    with dcm.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        out = DF.support_activation(qd, sd, m, windows)
    if grad is None:
        return out
    return out, torch.autograd.grad(out, [qd, sd], grad.double())


def _raw_ref(q, s, windows, grad=None):
    qd = q.detach().double().requires_grad_()
    sd = s.detach().double().requires_grad_()
    with dcm.use_backend("torch"):
        out = DF.support_activation_raw(qd, sd, windows)
    if grad is None:
        return out
    return out, torch.autograd.grad(out, [qd, sd], grad.double())


WIN3 = ((5, 1), (3, 3), (1, 5))
SAM_CASES = {
    "61x59": dict(B=2, K=1, C=64, hs=(61, 59), hq=(61, 59)),
    "k5_7x9": dict(B=2, K=5, C=40, hs=(7, 9), hq=(9, 7)),
    "small": dict(B=3, K=2, C=33, hs=(4, 5), hq=(3, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(SAM_CASES))
@pytest.mark.parametrize("windows", [WIN3, ((1, 1),), ((3, 5), (1, 1), (5, 5), (3, 3))])
def test_sam_raw_fp32_mode(dtype, case, windows):
    """No autocast: bf16x3 Gram, float32-level results for any input dtype."""
    c = SAM_CASES[case]
    q, s, _ = _sam_inputs(c["B"], c["K"], c["C"], c["hs"], c["hq"], dtype=dtype)
    q.requires_grad_()
    s.requires_grad_()
    out = DF.support_activation_raw(q, s, windows)
    assert out.dtype == torch.float32
    g = torch.randn_like(out)
    dq, ds = torch.autograd.grad(out, [q, s], g)
    ref, (rq, rs) = _raw_ref(q, s, windows, g)
    assert maxabs(out, ref) < 2e-5
    assert dq.dtype == dtype and ds.dtype == dtype
    gt = 1e-4 if dtype == torch.float32 else DW_TOL[dtype] * 2
    assert rel(dq, rq) < gt and rel(ds, rs) < gt


@pytest.mark.parametrize("dtype,tol,gtol", [(torch.bfloat16, 3e-2, 0.2), (torch.float16, 5e-3, 0.1)])
@pytest.mark.parametrize("case", ["61x59", "k5_7x9"])
def test_sam_raw_autocast(dtype, tol, gtol, case):
    c = SAM_CASES[case]
    q, s, _ = _sam_inputs(c["B"], c["K"], c["C"], c["hs"], c["hq"], seed=1)
    q.requires_grad_()
    s.requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        out = DF.support_activation_raw(q, s, WIN3)
    g = torch.randn_like(out)
    dq, ds = torch.autograd.grad(out, [q, s], g)
    ref, (rq, rs) = _raw_ref(q, s, WIN3, g)
    assert maxabs(out, ref) < tol
    assert rel(dq, rq) < gtol and rel(ds, rs) < gtol


@pytest.mark.parametrize("case", list(SAM_CASES))
def test_sam_full_with_masks_and_empty_shots(case):
    c = SAM_CASES[case]
    q, s, m = _sam_inputs(c["B"], c["K"], c["C"], c["hs"], c["hq"], seed=2)
    m[0, 0] = 0  # empty shot (all-empty sample when K = 1)
    if c["K"] > 1:
        m[1] = 0  # an all-empty sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        got = DF.support_activation(q, s, m, WIN3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf = DF.support_activation(q, s, m, WIN3)
    ref = _sam_ref(q, s, m, WIN3)
    assert torch.isfinite(got).all()
    assert maxabs(got, ref) < 1e-3  # min-max normalisation amplifies tiny Gram differences
    assert maxabs(got_bf, ref) < 0.1


def test_sam_grad_with_mask_matches_reference():
    q, s, m = _sam_inputs(2, 2, 32, (9, 8), (8, 9), seed=5, p=0.6)
    q.requires_grad_()
    s.requires_grad_()
    out = DF.support_activation(q, s, m, WIN3)
    g = torch.randn_like(out)
    dq, ds = torch.autograd.grad(out, [q, s], g)
    ref, (rq, rs) = _sam_ref(q, s, m, WIN3, g)
    assert maxabs(out, ref) < 1e-4
    assert rel(dq, rq) < 1e-3 and rel(ds, rs) < 1e-3


def test_sam_noncontiguous_inputs():
    q, s, m = _sam_inputs(2, 2, 16, (6, 7), (7, 6), seed=3)
    qc = q.contiguous(memory_format=torch.channels_last)
    st = s.transpose(-1, -2).contiguous().transpose(-1, -2)
    ref = _raw_ref(q, s, WIN3)
    assert maxabs(DF.support_activation_raw(qc, st, WIN3), ref) < 2e-5


def test_sam_opcheck():
    q, s, _ = _sam_inputs(1, 2, 16, (5, 4), (4, 5), seed=4)
    q.requires_grad_()
    s.requires_grad_()
    m = torch.ones(1, 2, 5, 4, device=DEV)
    torch.library.opcheck(torch.ops.dcm.sam_fwd, (q, s, m, [5, 1, 3, 3], 1e-7, 0), test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------ modules: compile and graphs
def _module_inputs(seed=0):
    g = seeded(seed)
    q = torch.randn(2, 16, 13, 11, device=DEV, generator=g).relu()
    s = torch.randn(2, 3, 16, 13, 11, device=DEV, generator=g).relu()
    m = (torch.rand(2, 3, 26, 22, device=DEV, generator=g) < 0.5).float()
    return q, s, m


def _run_modules(sam, dcmod, ffm, q, s, m):
    act = sam(q, s, m)
    filt = ffm(q, s, m, act.pseudo_mask).filtered
    outs = dcmod(filt, s, m)
    return act.maps, torch.cat(outs, 1)


def test_modules_torch_compile_fullgraph():
    torch.manual_seed(0)
    sam = dcm.SupportActivation()
    dcmod = dcm.DynamicConvModule(16).to(DEV)
    ffm = dcm.FeatureFiltering(16).to(DEV)
    q, s, m = _module_inputs()
    dcm.set_data_checks(False)
    try:
        q.requires_grad_()
        exp = _run_modules(sam, dcmod, ffm, q, s, m)
        eg = torch.autograd.grad(exp[0].sum() + exp[1].square().sum(), q)[0]
        comp = torch.compile(_run_modules, fullgraph=True)
        got = comp(sam, dcmod, ffm, q, s, m)
        gg = torch.autograd.grad(got[0].sum() + got[1].square().sum(), q)[0]
    finally:
        dcm.set_data_checks(True)
    for a, b in zip(got, exp):
        assert maxabs(a, b) < 1e-4
    assert rel(gg, eg) < 1e-4


def test_modules_cuda_graph_capture():
    torch.manual_seed(0)
    sam = dcm.SupportActivation()
    dcmod = dcm.DynamicConvModule(16).to(DEV)
    ffm = dcm.FeatureFiltering(16).to(DEV)
    q, s, m = _module_inputs(1)
    exp = _run_modules(sam, dcmod, ffm, q, s, m)
    sq, ss, sm = q.clone(), s.clone(), m.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (Triton compilation, cuBLAS handles) off the graph
        for _ in range(2):
            _run_modules(sam, dcmod, ffm, sq, ss, sm)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _run_modules(sam, dcmod, ffm, sq, ss, sm)
    q2, s2, m2 = _module_inputs(2)
    sq.copy_(q2)
    ss.copy_(s2)
    sm.copy_(m2)
    graph.replay()
    torch.cuda.synchronize()
    exp2 = _run_modules(sam, dcmod, ffm, q2, s2, m2)
    for a, b in zip(out, exp2):
        assert maxabs(a, b) < 1e-5
    assert maxabs(exp2[0], exp[0]) > 1e-3  # the replay really used the new inputs


def test_training_step_graph_free_of_syncs():
    """Forward + backward of the three modules with data checks off runs without host syncs."""
    torch.manual_seed(0)
    sam = dcm.SupportActivation()
    dcmod = dcm.DynamicConvModule(16).to(DEV)
    q, s, m = _module_inputs(3)
    q.requires_grad_()
    dcm.set_data_checks(False)
    try:
        torch.cuda.set_sync_debug_mode("error")
        maps = sam(q, s, m).maps
        loss = maps.sum() + sum(o.square().sum() for o in dcmod(q, s, m))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        dcm.set_data_checks(True)
    assert torch.isfinite(q.grad).all()
