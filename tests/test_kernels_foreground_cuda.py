"""The Triton foreground-pooling path (dcm.kernels.foreground) against the float64 torch path on CUDA.

Skipped without a GPU. The oracle is :func:`dcm.functional.foreground_pool` with the ``"torch"``
backend on float64 features. Masks are given at feature resolution with float32 values, so both
paths select exactly the same positions (a float64 bilinear resize could put a value on the other
side of the threshold than the float32 resize the fast path uses); the tests of masks at their own
resolution (resized inside the selection kernel) compare against the float32 torch path instead.

Tolerances (max abs on O(1) features): float32 1e-5; bfloat16 / float16 outputs are rounded to the
dtype: relative 1e-2 / 2e-3. Gradients: float32 1e-5.
"""
import warnings

import pytest
import torch

import dcm
import dcm.functional as DF

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


@pytest.fixture(autouse=True)
def _need_kernels():
    from dcm import kernels

    if not kernels.available():
        pytest.skip("dcm.kernels unavailable (Triton)")
    from dcm.kernels import foreground  # noqa: F401  (must import on a CUDA machine)

    dcm.set_backend("auto")
    yield
    dcm.set_backend("auto")


def maxabs(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ref(feat, mask, bins, threshold=0.5, dtype=torch.float64):
    with dcm.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DF.foreground_pool(feat.to(dtype), mask, bins, threshold)


def _fast(feat, mask, bins, threshold=0.5):
    with dcm.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DF.foreground_pool(feat, mask, bins, threshold)


def _inputs(B, K, C, H, W, seed=0, p=0.3, special=True, dtype=torch.float32):
    """Features and float32 masks at feature resolution: random fg, plus empty / peak-fallback /
    3-pixel / empty-shot samples."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    feat = torch.randn(B, K, C, H, W, device=DEV, generator=g).to(dtype)
    mask = torch.rand(B, K, H, W, device=DEV, generator=g)
    mask = torch.where(mask < p, torch.rand(B, K, H, W, device=DEV, generator=g) * 0.5 + 0.5, mask * 0.5)
    if special:
        mask[0] = 0  # empty sample: whole-image average
        if B > 1:
            mask[1] = 0.2  # all below threshold: peak fallback selects the positions equal to the max
            mask[1, 0, 0, 0] = 0.4
            mask[1, -1, H - 1, W - 1] = 0.4
        if B > 2:
            mask[2] = 0  # 3 foreground pixels (fewer than S and S²)
            mask[2, 0, 0, min(2, W - 1)] = 1
            mask[2, -1, H // 2, W // 2] = 0.9
            mask[2, -1, H - 1, 0] = 0.7
        if B > 3 and K > 1:
            mask[3, 1] = 0  # one empty shot among others
    return feat, mask


CASES = [
    # B, K, C, H, W, bins
    (8, 1, 256, 60, 60, (5, 25)),
    (5, 5, 64, 13, 7, (5, 25)),
    (4, 2, 33, 17, 29, (3,)),
    (6, 1, 40, 9, 11, (1, 2, 9, 7)),
    (3, 5, 16, 1, 1, (5, 25)),
    (4, 3, 70, 23, 19, (4, 16)),
]


@pytest.mark.parametrize("B,K,C,H,W,bins", CASES)
def test_forward_parity_fp32(B, K, C, H, W, bins):
    feat, mask = _inputs(B, K, C, H, W)
    got = _fast(feat, mask, bins)
    exp = _ref(feat, mask, bins)
    assert len(got) == len(bins)
    for g, e, s in zip(got, exp, bins):
        assert g.shape == (B, C, s) and g.dtype == feat.dtype and g.is_contiguous()
        assert maxabs(g, e) < 1e-5


@pytest.mark.parametrize("B,K,C,H,W,bins", CASES[:3])
def test_backward_parity_fp32(B, K, C, H, W, bins):
    feat, mask = _inputs(B, K, C, H, W, seed=1)
    f64 = feat.double().requires_grad_()
    f32 = feat.clone().requires_grad_()
    ws = [torch.randn(B, C, s, device=DEV, dtype=torch.float64) for s in bins]
    exp = _ref(f64, mask, bins)
    ge = torch.autograd.grad(sum((o * w).sum() for o, w in zip(exp, ws)), f64)[0]
    got = _fast(f32, mask, bins)
    gg = torch.autograd.grad(sum((o * w.float()).sum() for o, w in zip(got, ws)), f32)[0]
    assert gg.dtype == torch.float32
    assert maxabs(gg, ge) < 1e-5
    # only one output used: the other gets a zero gradient
    got = _fast(f32, mask, bins)
    gg1 = torch.autograd.grad(got[-1].sum(), f32)[0]
    exp = _ref(f64, mask, bins)
    ge1 = torch.autograd.grad(exp[-1].sum(), f64)[0]
    assert maxabs(gg1, ge1) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision(dtype, tol):
    feat, mask = _inputs(4, 2, 96, 31, 31, seed=2, dtype=dtype)
    got = _fast(feat, mask, (5, 25))
    exp = _ref(feat, mask, (5, 25))
    for g, e in zip(got, exp):
        assert g.dtype == dtype
        assert rel(g, e) < tol
    f = feat.clone().requires_grad_()
    gg = torch.autograd.grad(_fast(f, mask, (5, 25))[1].float().sum(), f)[0]
    f64 = feat.double().requires_grad_()
    ge = torch.autograd.grad(_ref(f64, mask, (5, 25))[1].sum(), f64)[0]
    assert gg.dtype == dtype and rel(gg, ge) < tol


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.uint8, torch.bool])
@pytest.mark.parametrize("hw", [(240, 240), (473, 473), (97, 61)])
def test_resized_binary_mask_matches_fp32_torch_path(mask_dtype, hw):
    """Masks at their own resolution: the selection kernel's bilinear resize (PyTorch's CUDA formula in
    float32) selects the positions that F.interpolate + threshold selects on the same device."""
    g = torch.Generator(device=DEV).manual_seed(3)
    feat = torch.randn(6, 2, 32, 30, 30, device=DEV, generator=g)
    mask = (torch.rand(6, 2, *hw, device=DEV, generator=g) < 0.3).to(torch.uint8)
    mask[0] = 0
    if mask_dtype != torch.bool:
        mask[1, :, :5] = 255  # ignore label
        mask[2][torch.rand(2, *hw, device=DEV, generator=g) < 0.1] = 255
    mask = mask.bool() if mask_dtype == torch.bool else mask.to(mask_dtype)
    got = _fast(feat, mask, (5, 25))
    exp = _ref(feat, mask, (5, 25), dtype=torch.float32)
    for a, b in zip(got, exp):
        assert maxabs(a, b) < 1e-5


@pytest.mark.parametrize("hw, feat_hw", [((26, 22), (15, 10)), ((23, 27), (13, 21)), ((26, 26), (19, 23))])
def test_threshold_ties_select_what_the_cpu_float32_resize_selects(hw, feat_hw):
    """0/1 masks with rows / columns whose source coordinate scale·y rounds to an exact half in float32:
    the blended mask is then 0.5 at a 0/1 boundary, not above the threshold, in PyTorch's float32
    resize (here its CPU path, the formula rounded operation by operation). With FMA contraction the
    kernel's weight kept the unrounded product and selected such positions: DynamicConvModule's CUDA
    test failed by 0.0965 on the first of these shapes (H100, Triton 3.6), and an emulation of the
    contracted weight selects 17, 59 and 46 positions more or fewer on these three shapes."""
    g = torch.Generator(device=DEV).manual_seed(5)
    feat = torch.randn(4, 2, 16, *feat_hw, device=DEV, generator=g)
    mask = (torch.rand(4, 2, *hw, device=DEV, generator=g) < 0.4).to(torch.uint8)
    mask[1, -1, :, :3] = 255
    got = _fast(feat, mask, (5, 25))
    with dcm.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = DF.foreground_pool(feat.cpu(), mask.cpu(), (5, 25))
    for a, b in zip(got, exp):
        assert maxabs(a.cpu(), b) < 1e-5


def test_empty_warning_and_dispatch(monkeypatch):
    from dcm import _check
    from dcm.kernels import foreground as K

    calls = []
    orig = K.foreground_pool
    monkeypatch.setattr(K, "foreground_pool", lambda *a, **k: calls.append(1) or orig(*a, **k))
    _check.reset_warnings()
    feat, mask = _inputs(3, 1, 8, 5, 5)
    with dcm.use_backend("triton"), pytest.warns(dcm.EmptyForegroundWarning):
        DF.foreground_pool(feat, mask, (5, 25))
    assert calls, "the Triton path was not used"


def test_torch_compile():
    feat, mask = _inputs(4, 2, 48, 20, 20, seed=4)
    bins = (5, 25)

    def fn(f, m):
        out = DF.foreground_pool(f, m, bins)
        return out[0].square().sum() + out[1].sum()

    f64 = feat.double().requires_grad_()
    with dcm.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = fn(f64, mask)
    ge = torch.autograd.grad(e, f64)[0]
    dcm.set_data_checks(False)
    try:
        comp = torch.compile(fn, fullgraph=True)
        f = feat.clone().requires_grad_()
        with dcm.use_backend("triton"):
            got = comp(f, mask)
        gg = torch.autograd.grad(got, f)[0]
    finally:
        dcm.set_data_checks(True)
    assert abs(got.item() - e.item()) < 1e-4 * max(1.0, abs(e.item()))
    assert maxabs(gg, ge) < 1e-5


def test_cuda_graph_capture():
    feat, mask = _inputs(8, 1, 64, 24, 24, seed=5)
    sf, sm = feat.clone(), mask.clone()
    dcm.set_data_checks(False)
    try:
        with dcm.use_backend("triton"):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                DF.foreground_pool(sf, sm, (5, 25))
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = DF.foreground_pool(sf, sm, (5, 25))
        feat2, mask2 = _inputs(8, 1, 64, 24, 24, seed=6)
        mask2[4] = 0
        sf.copy_(feat2)
        sm.copy_(mask2)
        graph.replay()
        torch.cuda.synchronize()
    finally:
        dcm.set_data_checks(True)
    exp = _ref(feat2, mask2, (5, 25))
    for a, b in zip(outs, exp):
        assert maxabs(a, b) < 1e-5
