"""The dcm modules on CUDA in float32 and bfloat16 (autocast), both backends, against the float64
literal references computed on the CPU. Skipped without a GPU.

Documented tolerances (max abs error of outputs with values of order 1):

| output | float32 | bfloat16 autocast |
|---|---|---|
| DynamicConvModule maps | 1e-4 (rel. to max) | 3e-2 (rel. to max) |
| SupportActivation maps (in [0, 1]) | 1e-4 | 5e-2 |
| FeatureFiltering refined mask / filtered | 1e-4 | 3e-2 (rel. to max) |
"""
import warnings

import pytest
import torch

import dcm
from dcm import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
SAM_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def rel_err(a, b):
    return float((a.double().cpu() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def inputs(B=3, K=2, C=16, H=13, W=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).relu()
    s = torch.randn(B, K, C, H + 2, W - 1, generator=g, dtype=torch.float64).relu()
    m = (torch.rand(B, K, 2 * H, 2 * W, generator=g) < 0.4).long()
    m[0] = 0  # all-empty sample
    m[1, -1, :, :3] = 255
    return q, s, m


def run(fn, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        if dtype == torch.bfloat16:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn()
        return fn()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_conv_module_cuda(backend, dtype):
    torch.manual_seed(0)
    q, s, m = inputs()
    mod64 = dcm.DynamicConvModule(16, dtype=torch.float64)
    exp = R.dynamic_convolution_loop(q, s, m, dict(mod64.generators))
    mod = dcm.DynamicConvModule(16).cuda()
    mod.load_state_dict({k: v.float() for k, v in mod64.state_dict().items()})
    with dcm.use_backend(backend):
        got = run(lambda: mod(q.float().cuda(), s.float().cuda(), m.cuda()), dtype)
    for g_, e in zip(got, exp):
        assert rel_err(g_, e) < TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_support_activation_cuda(backend, dtype):
    q, s, m = inputs(C=64)
    exp = R.support_activation_literal(q, s, m)
    with dcm.use_backend(backend):
        got = run(lambda: dcm.SupportActivation()(q.float().cuda(), s.float().cuda(), m.cuda()), dtype)
    assert float((got.maps.double().cpu() - exp).abs().max()) < SAM_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_filtering_cuda(dtype):
    torch.manual_seed(0)
    q, s, m = inputs()
    pm = torch.rand(3, 1, 7, 6, dtype=torch.float64)
    ffm64 = dcm.FeatureFiltering(16, dtype=torch.float64)
    exp = R.feature_filtering_literal(q, s, m, pm, ffm64.conv.weight, ffm64.conv.bias)
    ffm = dcm.FeatureFiltering(16).cuda()
    ffm.load_state_dict({k: v.float() for k, v in ffm64.state_dict().items()})
    got = run(lambda: ffm(q.float().cuda(), s.float().cuda(), m.cuda(), pm.float().cuda()), dtype)
    for g_, e in zip(got, exp):
        assert rel_err(g_, e.detach()) < TOL[dtype]
