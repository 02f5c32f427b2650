"""gradcheck, hypothesis properties and torch.compile for the dcm ops and modules."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dcm
import dcm.functional as DF

D = torch.float64
PROPS = settings(max_examples=15, deadline=None, derandomize=True)


def _t(*shape, seed=0, relu=False, grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=D)
    x = x.relu() + 0.1 if relu else x
    return x.requires_grad_(grad)


# --------------------------------------------------------------------------------- gradcheck
def test_gradcheck_dynamic_depthwise_conv():
    x, w = _t(2, 3, 5, 6), _t(2, 3, 3, 1, seed=1)
    assert torch.autograd.gradcheck(DF.dynamic_depthwise_conv2d, (x, w))
    assert torch.autograd.gradcheck(lambda a, b, c: DF.dynamic_depthwise_conv2d_multi(a, [b, c]), (x, w, _t(2, 3, 1, 5, seed=2)))


def test_gradcheck_foreground_pool():
    m = torch.zeros(2, 2, 4, 5)
    m[0, 0, 1:3, 1:4] = 1
    m[1, 1, 0, 0] = 1
    f = _t(2, 2, 3, 4, 5)
    assert torch.autograd.gradcheck(lambda x: DF.foreground_pool(x, m, (3, 9)), (f,))


def test_gradcheck_support_activation():
    # generic inputs: no ties in the max over support positions (a tie makes the max non-differentiable)
    q, s = _t(1, 4, 4, 5, relu=True), _t(1, 2, 4, 5, 4, seed=1, relu=True)
    m = torch.ones(1, 2, 5, 4)
    m[0, 0, :2] = 0
    fn = lambda a, b: DF.support_activation(a, b, m, ((3, 1), (1, 3), (3, 3)))
    assert torch.autograd.gradcheck(fn, (q, s))
    assert torch.autograd.gradcheck(lambda a, b: DF.support_activation(a, b, m, ((3, 3),), chunk_size=2), (q, s))


def test_gradcheck_feature_filtering_and_prototype():
    q, p, pm, w, b = _t(2, 3, 4, 4), _t(2, 3, seed=1), _t(2, 1, 3, 3, seed=2), _t(1, 3, 3, 3, seed=3), _t(1, seed=4)
    assert torch.autograd.gradcheck(lambda *a: tuple(DF.feature_filtering(*a)), (q, p, pm, w, b))
    m = torch.rand(2, 2, 6, 6).round()
    m[1] = 0  # the all-empty fallback is differentiable too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        assert torch.autograd.gradcheck(lambda s: DF.support_prototype(s, m), (_t(2, 2, 3, 4, 4, seed=5),))


def test_gradcheck_modules():
    torch.manual_seed(0)
    q, s = _t(2, 4, 5, 5), _t(2, 2, 4, 5, 5, seed=1)
    m = torch.zeros(2, 2, 5, 5)
    m[:, :, 1:4, 1:3] = 1
    dcm_layer = dcm.DynamicConvModule(4, kernel_size=3, dtype=D)
    assert torch.autograd.gradcheck(lambda a, b: dcm_layer(a, b, m), (q, s))
    for norm in ("l1", "l2"):
        normed = dcm.DynamicConvModule(4, kernel_size=3, kernel_norm=norm, dtype=D)
        assert torch.autograd.gradcheck(lambda a, b: normed(a, b, m), (q, s))
    ffm = dcm.FeatureFiltering(4, dtype=D)
    pm = _t(2, 1, 5, 5, seed=2)
    assert torch.autograd.gradcheck(lambda a, b, c: tuple(ffm(a, b, m, c)), (q, s, pm))
    sam = dcm.SupportActivation(windows=((3, 1), (1, 3)))
    qr, sr = _t(1, 4, 4, 4, relu=True, seed=3), _t(1, 4, 4, 4, relu=True, seed=4)
    assert torch.autograd.gradcheck(lambda a, b: tuple(sam(a, b, m[:1, :1].squeeze(1)[:, :4, :4])), (qr, sr))


# ---------------------------------------------------------------------------------- properties
@PROPS
@given(kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3, 5]), H=st.integers(1, 7), W=st.integers(1, 7), seed=st.integers(0, 99))
def test_delta_kernel_is_identity(kh, kw, H, W, seed):
    x = _t(2, 3, H, W, seed=seed, grad=False)
    w = torch.zeros(2, 3, kh, kw, dtype=D)
    w[:, :, kh // 2, kw // 2] = 1
    torch.testing.assert_close(DF.dynamic_depthwise_conv2d(x, w), x)


@PROPS
@given(a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 99))
def test_dynamic_conv_is_linear_in_kernels(a, b, seed):
    x = _t(2, 3, 6, 5, seed=seed, grad=False)
    w1, w2 = _t(2, 3, 5, 3, seed=seed + 1, grad=False), _t(2, 3, 5, 3, seed=seed + 2, grad=False)
    lhs = DF.dynamic_depthwise_conv2d(x, a * w1 + b * w2)
    rhs = a * DF.dynamic_depthwise_conv2d(x, w1) + b * DF.dynamic_depthwise_conv2d(x, w2)
    torch.testing.assert_close(lhs, rhs)


@PROPS
@given(seed=st.integers(0, 999), K=st.integers(1, 3), win=st.sampled_from([(1, 1), (3, 3), (5, 1), (1, 3)]))
def test_support_activation_scale_invariant_and_in_unit_interval(seed, K, win):
    g = torch.Generator().manual_seed(seed)
    q, s = torch.rand(2, 5, 5, 4, generator=g, dtype=D), torch.rand(2, K, 5, 4, 6, generator=g, dtype=D)
    m = (torch.rand(2, K, 4, 6, generator=g) < 0.5).to(D)
    m[:, 0, 0, 0] = 1
    a = DF.support_activation(q, s, m, (win,))
    assert a.min() >= 0 and a.max() <= 1
    sq = torch.rand(2, 1, 5, 4, generator=g, dtype=D) + 0.1  # positive per-position scales
    ss = torch.rand(2, K, 1, 4, 6, generator=g, dtype=D) + 0.1
    torch.testing.assert_close(DF.support_activation(q * sq, s * ss, m, (win,)), a, rtol=1e-6, atol=1e-6)


@PROPS
@given(L=st.integers(1, 40), S=st.integers(1, 30), p=st.floats(0, 1), seed=st.integers(0, 99))
def test_pool_weights_each_prototype_sums_to_one(L, S, p, seed):
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(3, L, generator=g) < p
    w = DF.foreground_pool_weights(sel, S, D)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, S, dtype=D))
    assert ((w > 0) <= (sel[:, None, :] | ~sel.any(1)[:, None, None])).all()  # only foreground positions


@PROPS
@given(seed=st.integers(0, 99))
def test_permuting_the_batch_permutes_outputs(seed):
    torch.manual_seed(seed)
    perm = torch.randperm(4)
    q, s = _t(4, 6, 5, 5, seed=seed, grad=False), _t(4, 2, 6, 5, 5, seed=seed + 1, grad=False).relu()
    m = (torch.rand(4, 2, 5, 5) < 0.5).long()
    m[:, :, 2, 2] = 1
    mods = [
        (dcm.DynamicConvModule(6, kernel_size=3, dtype=D), lambda mod, a, b, c: mod(a, b, c)),
        (dcm.SupportActivation(), lambda mod, a, b, c: tuple(mod(a, b, c))),
        (dcm.FeatureFiltering(6, dtype=D), lambda mod, a, b, c: tuple(mod(a, b, c, a[:, :1].sigmoid()))),
    ]
    for mod, call in mods:
        full = call(mod, q, s, m)
        permuted = call(mod, q[perm], s[perm], m[perm])
        for x, y in zip(full, permuted):
            torch.testing.assert_close(x[perm], y)


# ------------------------------------------------------------------------------------ compile
@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    q, s = torch.randn(2, 8, 9, 7), torch.randn(2, 3, 8, 9, 7).relu()
    m = (torch.rand(2, 3, 18, 14) < 0.5).float()
    pm = torch.rand(2, 1, 9, 7)
    cases = [
        (dcm.DynamicConvModule(8), (q, s, m)),
        (dcm.SupportActivation(), (q.relu(), s, m)),
        (dcm.FeatureFiltering(8), (q, s, m, pm)),
    ]
    for mod, args in cases:
        eager = mod(*args)
        compiled = torch.compile(mod, fullgraph=True, backend="inductor")(*args)
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
