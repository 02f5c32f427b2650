"""Float64 parity of every dcm op and module against the literal references of dcm.reference."""
import warnings

import pytest
import torch

import dcm
import dcm.functional as DF
from dcm import reference as R

torch.set_default_dtype(torch.float32)
D = torch.float64


def rand_mask(B, K, h, w, p=0.4, seed=0, with_255=False):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(B, K, h, w, generator=g) < p).long()
    if with_255:
        m[torch.rand(B, K, h, w, generator=g) < 0.1] = 255
    return m


def feats(*shape, seed=0, relu=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=D)
    return x.relu() if relu else x


# ----------------------------------------------------------------------------- foreground pooling
def edge_masks():
    """(name, mask[B=4, K, 7, 9]) covering the edge cases of the issue."""
    out = {}
    for K in (1, 5):
        m = rand_mask(4, K, 7, 9, seed=K)
        m[0] = 0  # empty foreground in every shot of sample 0
        m[1] = 0
        m[1, 0, 3, 4] = 1  # a single foreground pixel
        m[2] = 0
        m[2, -1, 0, :3] = 1  # 3 pixels < S^2 = 25 (and < S = 5)
        out[f"K{K}"] = m
    m = rand_mask(4, 5, 7, 9, seed=7, with_255=True)
    m[3, 2] = 0  # one empty shot among non-empty ones
    out["K5_255"] = m
    return out


@pytest.mark.parametrize("name", ["K1", "K5", "K5_255"])
@pytest.mark.parametrize("bins", [(5, 25), (3, 9), (7,)])
def test_foreground_pool_matches_loop(name, bins):
    m = edge_masks()[name]
    K = m.shape[1]
    f = feats(4, K, 6, 7, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        got = DF.foreground_pool(f, m, bins)
        exp = R.foreground_pool_loop(f, m, bins)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_foreground_pool_mask_at_other_resolution_and_layouts():
    m = rand_mask(3, 2, 29, 31, seed=3).double()  # resized bilinearly to 7x9 (soft values, threshold 0.5)
    f = feats(3, 2, 6, 7, 9)
    exp = R.foreground_pool_loop(f, m, (5, 25))
    nc = f.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous
    cl = f.reshape(6, 6, 7, 9).contiguous(memory_format=torch.channels_last).reshape(3, 2, 6, 7, 9)
    for x in (f, nc, cl):
        for g, e in zip(DF.foreground_pool(x, m, (5, 25)), exp):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_foreground_pool_soft_mask_below_threshold_uses_peak():
    f = feats(1, 1, 4, 5, 5)
    m = torch.zeros(1, 1, 5, 5, dtype=D)
    m[0, 0, 2, 3] = 0.3
    m[0, 0, 4, 0] = 0.2
    (p,) = DF.foreground_pool(f, m, (1,))
    torch.testing.assert_close(p[0, :, 0], f[0, 0, :, 2, 3])


def test_empty_foreground_warns_once_and_is_finite():
    f = feats(2, 1, 4, 5, 5)
    m = torch.zeros(2, 1, 5, 5)
    with pytest.warns(dcm.EmptyForegroundWarning, match="no foreground"):
        p5, p25 = DF.foreground_pool(f, m, (5, 25))
    torch.testing.assert_close(p5, f.mean((1, 3, 4))[..., None].expand(2, 4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        DF.foreground_pool(f, m, (5,))
    assert torch.isfinite(p25).all()


# ------------------------------------------------------------------------------- dynamic conv
@pytest.mark.parametrize("ksize", [(5, 1), (1, 5), (5, 5), (3, 7), (1, 1)])
def test_dynamic_depthwise_conv_matches_loop(ksize):
    x, w = feats(3, 4, 7, 9, relu=False), feats(3, 4, *ksize, seed=1, relu=False)
    exp = R.dynamic_conv_loop(x, w)
    torch.testing.assert_close(DF.dynamic_depthwise_conv2d(x, w), exp)
    torch.testing.assert_close(DF.dynamic_depthwise_conv2d(x.contiguous(memory_format=torch.channels_last), w), exp)
    torch.testing.assert_close(DF.dynamic_depthwise_conv2d(x.transpose(2, 3).contiguous().transpose(2, 3), w), exp)
    (o,) = DF.dynamic_depthwise_conv2d_multi(x, [w])
    torch.testing.assert_close(o, exp)


def test_dynamic_depthwise_conv_batch_zero():
    x, w = torch.zeros(0, 3, 5, 5), torch.zeros(0, 3, 3, 3)
    assert DF.dynamic_depthwise_conv2d(x, w).shape == (0, 3, 5, 5)


@pytest.mark.parametrize("square_source", ["serial", "parallel"])
@pytest.mark.parametrize("variants", [("v", "h", "s"), ("s",), ("h",), ("h", "v"), ("s", "v")])
@pytest.mark.parametrize("S", [3, 5])
def test_dynamic_conv_module_matches_loop(square_source, variants, S):
    torch.manual_seed(0)
    mod = dcm.DynamicConvModule(6, kernel_size=S, variants=variants, square_source=square_source, dtype=D)
    q, s = feats(4, 6, 8, 7, relu=False), feats(4, 5, 6, 7, 9, seed=2)
    m = edge_masks()["K5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        got = mod(q, s, m)
        exp = R.dynamic_convolution_loop(q, s, m, dict(mod.generators), S, variants, square_source)
    assert len(got) == len(variants)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel_norm", ["l1", "l2"])
@pytest.mark.parametrize("variants", [("v", "h", "s"), ("s",)])
def test_dynamic_conv_module_kernel_norm_matches_loop(kernel_norm, variants):
    torch.manual_seed(0)
    mod = dcm.DynamicConvModule(6, kernel_size=3, variants=variants, kernel_norm=kernel_norm, dtype=D)
    q, s = feats(4, 6, 8, 7, relu=False), feats(4, 5, 6, 7, 9, seed=2)
    m = edge_masks()["K5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        got = mod(q, s, m)
        exp = R.dynamic_convolution_loop(q, s, m, dict(mod.generators), 3, variants, kernel_norm=kernel_norm)
        raw = R.dynamic_convolution_loop(q, s, m, dict(mod.generators), 3, variants)
        kernels = mod.generate_kernels(s, m)
    for g, e, r in zip(got, exp, raw):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(g, r)  # the normalisation changes the output
    p = 1 if kernel_norm == "l1" else 2
    for k in kernels.values():
        norms = k.abs().pow(p).sum((-2, -1)).pow(1 / p)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_dynamic_conv_l1_kernel_output_bounded_and_degree_one():
    """With L1-normalised kernels every output is bounded by the largest |query| value and scaling the
    query and support features by a scales the output by a (raw kernels: by more)."""
    torch.manual_seed(0)
    mod = dcm.DynamicConvModule(5, kernel_norm="l1", dtype=D)
    q, s = feats(2, 5, 9, 9, relu=False), feats(2, 1, 5, 9, 9, seed=4)
    m = torch.zeros(2, 1, 9, 9, dtype=D)
    m[:, :, 2:7, 3:8] = 1
    outs = mod(q, s, m)
    for o in outs:
        assert o.abs().max() <= q.abs().max() + 1e-12
    gen = mod.generators
    for g in gen.values():  # a positively homogeneous generator (no bias) makes the scale visible exactly
        for c in g:
            if isinstance(c, torch.nn.Conv1d):
                torch.nn.init.zeros_(c.bias)
    a = 3.0
    for o1, o2 in zip(mod(q, s, m), mod(a * q, a * s, m)):
        torch.testing.assert_close(o2, a * o1)


def test_dynamic_conv_kernel_norm_rejects_unknown():
    with pytest.raises(ValueError, match="kernel_norm"):
        dcm.DynamicConvModule(4, kernel_norm="max")
    with pytest.raises(ValueError, match="kernel_norm"):
        DF.normalize_kernel(torch.ones(1, 1, 3, 3), "l3")


def test_dynamic_conv_module_4d_support_and_3d_mask():
    torch.manual_seed(0)
    mod = dcm.DynamicConvModule(4, dtype=D)
    q, s = feats(2, 4, 6, 6, relu=False), feats(2, 4, 6, 6, seed=1)
    m = rand_mask(2, 1, 6, 6)
    a = mod(q, s, m[:, 0])
    b = mod(q, s[:, None], m)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


# ------------------------------------------------------------------------ support activation
SAM_CASES = {
    "k1_same_size": dict(B=2, K=1, q=(6, 7), s=(6, 7)),
    "k1_other_size": dict(B=2, K=1, q=(5, 9), s=(7, 6)),
    "k5": dict(B=2, K=5, q=(5, 6), s=(6, 5)),
}


@pytest.mark.parametrize("case", list(SAM_CASES))
@pytest.mark.parametrize("windows", [((5, 1), (3, 3), (1, 5)), ((1, 1),), ((3, 5),)])
def test_support_activation_matches_literal(case, windows):
    c = SAM_CASES[case]
    q = feats(c["B"], 8, *c["q"])
    s = feats(c["B"], c["K"], 8, *c["s"], seed=1)
    m = rand_mask(c["B"], c["K"], 13, 11, seed=2, with_255=True)
    m[0, 0] = 0  # an empty shot (or, with K = 1, an all-empty sample -> whole-image fallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        exp = R.support_activation_literal(q, s, m, windows)
        for chunk in (None, 1, 2):
            got = DF.support_activation(q, s, m, windows, chunk_size=chunk)
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_support_activation_module_pseudo_mask_is_mean():
    q, s, m = feats(2, 8, 6, 6), feats(2, 8, 6, 6, seed=1), rand_mask(2, 1, 6, 6)
    out = dcm.SupportActivation()(q, s, m[:, 0])
    torch.testing.assert_close(out.pseudo_mask, out.maps.mean(1, keepdim=True))
    torch.testing.assert_close(out.maps, R.support_activation_literal(q, s[:, None], m))


def test_support_activation_layouts():
    q, s, m = feats(2, 8, 6, 7), feats(2, 2, 8, 6, 7, seed=1), rand_mask(2, 2, 6, 7)
    exp = R.support_activation_literal(q, s, m)
    got = DF.support_activation(q.contiguous(memory_format=torch.channels_last), s.transpose(-1, -2).contiguous().transpose(-1, -2), m)
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


# -------------------------------------------------------------------------- feature filtering
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("k", [1, 3])
def test_feature_filtering_matches_literal(K, k):
    torch.manual_seed(0)
    ffm = dcm.FeatureFiltering(6, kernel_size=k, dtype=D)
    q, s = feats(3, 6, 7, 9, relu=False), feats(3, K, 6, 5, 6, seed=1)
    m = rand_mask(3, K, 10, 12, seed=4, with_255=True)
    m[0] = 0  # all-empty sample
    if K > 1:
        m[1, 1] = 0  # one empty shot
    pm = torch.rand(3, 1, 4, 5, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        got = ffm(q, s, m, pm)
        exp = R.feature_filtering_literal(q, s, m, pm, ffm.conv.weight, ffm.conv.bias)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_masked_average_pool_pfenet_eps():
    f = feats(2, 3, 4, 4)
    m = rand_mask(2, 1, 4, 4)[:, 0]
    exp = (f * m[:, None]).sum((2, 3)) / (m.sum((1, 2))[:, None] + 0.0005)
    torch.testing.assert_close(DF.masked_average_pool(f, m), exp)
    z = DF.masked_average_pool(f, torch.zeros(2, 4, 4))
    assert torch.equal(z, torch.zeros_like(z))  # PFENet: empty mask -> zero prototype


# --------------------------------------------------------- non-finite values outside the mask
# Contract (docs/CONVENTIONS.md#non-finite): a support position the resized mask excludes never reaches
# an output, forward or backward, exactly as in dcm.reference (which never reads it); NaN / Inf at an
# included position propagates.
def _poison(x, where, seed=0):
    """``x [B, K, C, H, W]`` with NaN, +Inf and -Inf (every channel) at the positions ``where [B, K, H, W]``."""
    x = x.clone()
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    pick = vals[torch.randint(0, 3, where.shape, generator=g)]
    return torch.where(where[:, :, None], pick[:, :, None], x)


def _excluded(m, size, rule):
    """Excluded positions of samples that have foreground (an all-empty sample uses its whole image)."""
    r = DF.prepare_mask(m, size, dtype=D)
    inc = DF.foreground_selection(r) if rule == "dcm" else r > 0
    has = inc.flatten(1).any(1)[:, None, None, None]
    return ~inc & has, inc | ~has


def test_dynamic_conv_module_ignores_non_finite_outside_the_foreground():
    torch.manual_seed(0)
    mod = dcm.DynamicConvModule(6, kernel_size=3, dtype=D)
    q, s = feats(4, 6, 8, 7, relu=False), feats(4, 5, 6, 7, 9, seed=2)
    m = edge_masks()["K5"]
    ex, inc = _excluded(m, (7, 9), "dcm")
    assert ex.any() and (~ex[1:]).any()
    bad = _poison(s, ex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        got, clean = mod(q, bad, m), mod(q, s, m)
        exp = R.dynamic_convolution_loop(q, bad, m, dict(mod.generators), 3)
    for g, c, e in zip(got, clean, exp):
        assert torch.isfinite(e).all()  # the reference never reads them
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
        assert torch.equal(g, c)
    # backward: finite, and zero at the excluded positions
    leaf = bad.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        sum(o.sum() for o in mod(q, leaf, m)).backward()
    assert torch.isfinite(leaf.grad).all() and not leaf.grad.permute(0, 1, 3, 4, 2)[ex].any()
    # an included position propagates (not hidden): sample 3 has foreground, NaN at one selected position
    b = 3
    k, i, j = [int(t) for t in inc[b].nonzero()[0]]
    s2 = s.clone()
    s2[b, k, :, i, j] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        outs = mod(q, s2, m)
    assert all(torch.isnan(o[b]).all() and torch.isfinite(o[:b]).all() for o in outs)


def test_gradcheck_dynamic_conv_with_non_finite_outside_the_foreground():
    torch.manual_seed(0)
    mod = dcm.DynamicConvModule(2, kernel_size=3, variants=("s",), dtype=D)  # "s" (serial) runs all three generators
    q, s = feats(1, 2, 4, 4, relu=False), feats(1, 1, 2, 4, 4, seed=1)
    m = torch.zeros(1, 1, 4, 4, dtype=D)
    m[:, :, 1:3, 1:3] = 1
    bad = _poison(s, _excluded(m, (4, 4), "dcm")[0]).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: mod(q, b, m), (bad,), fast_mode=True)


@pytest.mark.parametrize("case", ["k1_other_size", "k5"])
def test_support_activation_ignores_non_finite_outside_the_mask(case):
    c = SAM_CASES[case]
    q = feats(c["B"], 8, *c["q"])
    s = feats(c["B"], c["K"], 8, *c["s"], seed=1)
    m = rand_mask(c["B"], c["K"], 13, 11, seed=2, with_255=True)
    m[0, 0] = 0  # an empty shot (K = 1: an all-empty sample, whose whole image is used)
    ex, inc = _excluded(m, c["s"], "sam")
    assert ex.any()
    bad = _poison(s, ex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        exp = R.support_activation_literal(q, bad, m)
        assert torch.isfinite(exp).all()
        clean = DF.support_activation(q, s, m)
        for chunk in (None, 2):
            got = DF.support_activation(q, bad, m, chunk_size=chunk)
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
            assert torch.equal(got, clean) or chunk is not None
        leaf = bad.clone().requires_grad_()
        out = dcm.SupportActivation()(q, leaf, m)
        out.maps.sum().backward()
    assert torch.isfinite(out.pseudo_mask).all()
    assert torch.isfinite(leaf.grad).all() and not leaf.grad.permute(0, 1, 3, 4, 2)[ex].any()
    s2 = s.clone()
    k, i, j = [int(t) for t in inc[-1].nonzero()[0]]
    s2[-1, k, :, i, j] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        assert torch.isnan(DF.support_activation(q, s2, m)[-1]).any()  # included: propagates


def test_gradcheck_support_activation_with_non_finite_outside_the_mask():
    q, s = feats(1, 3, 3, 4) + 0.1, feats(1, 2, 3, 4, 3, seed=1) + 0.1
    m = torch.ones(1, 2, 4, 3)
    m[0, 0, :2] = 0
    bad = _poison(s, _excluded(m, (4, 3), "sam")[0])
    assert torch.autograd.gradcheck(lambda b: DF.support_activation(q, b, m, ((3, 3),)), (bad.requires_grad_(),))


@pytest.mark.parametrize("K", [1, 3])
def test_feature_filtering_ignores_non_finite_outside_the_mask(K):
    torch.manual_seed(0)
    ffm = dcm.FeatureFiltering(6, dtype=D)
    q, s = feats(3, 6, 7, 9, relu=False), feats(3, K, 6, 5, 6, seed=1)
    m = rand_mask(3, K, 10, 12, seed=4, with_255=True)
    m[0] = 0  # all-empty sample: its whole image is used
    if K > 1:
        m[1, 1] = 0  # an empty shot: left out entirely
    pm = torch.rand(3, 1, 4, 5, dtype=D)
    ex, inc = _excluded(m, (5, 6), "ffm")
    bad = _poison(s, ex)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dcm.EmptyForegroundWarning)
        got, clean = ffm(q, bad, m, pm), ffm(q, s, m, pm)
        exp = R.feature_filtering_literal(q, bad, m, pm, ffm.conv.weight, ffm.conv.bias)
        for g, c, e in zip(got, clean, exp):
            assert torch.isfinite(e).all()
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
            assert torch.equal(g, c)
        leaf = bad.clone().requires_grad_()
        sum(t.sum() for t in ffm(q, leaf, m, pm)).backward()
        assert torch.isfinite(leaf.grad).all() and not leaf.grad.permute(0, 1, 3, 4, 2)[ex].any()
        assert torch.autograd.gradcheck(lambda b: DF.support_prototype(b, m), (bad[:, :, :2].clone().requires_grad_(),))
        s2 = s.clone()
        k, i, j = [int(t) for t in inc[2].nonzero()[0]]
        s2[2, k, :, i, j] = float("inf")
        p = DF.support_prototype(s2, m)
    assert not torch.isfinite(p[2]).all() and torch.isfinite(p[:2]).all()  # included: propagates


def test_masked_average_pool_non_finite_outside_the_mask_and_eps_zero():
    f = feats(2, 3, 4, 5, relu=False)
    m = rand_mask(2, 1, 4, 5, seed=3)[:, 0]
    m[1] = 0  # empty mask
    bad = _poison(f[:, None], (m == 0)[:, None])[:, 0]
    for eps in (5e-4, 0.0):
        exp = (f * m[:, None]).sum((2, 3)) / (m.sum((1, 2))[:, None] + eps)
        exp[1] = 0.0  # the documented zero prototype, eps = 0 included
        got = DF.masked_average_pool(bad, m, eps=eps)
        torch.testing.assert_close(got, exp)
        assert torch.equal(got[1], torch.zeros(3, dtype=D))
    assert torch.equal(DF.masked_average_pool(f, torch.zeros(2, 4, 5), eps=0.0), torch.zeros(2, 3, dtype=D))
    mean = DF.masked_average_pool(bad, m, eps=0.0, empty="mean")
    assert torch.isnan(mean[1]).any() or not torch.isfinite(mean[1]).all()  # "mean": the whole image is used
    leaf = bad.clone().requires_grad_()
    DF.masked_average_pool(leaf, m, eps=0.0).sum().backward()
    assert torch.isfinite(leaf.grad).all() and not leaf.grad.permute(0, 2, 3, 1)[m == 0].any()
    g = torch.autograd.gradcheck(lambda x: DF.masked_average_pool(x, m, eps=0.0), (bad.clone().requires_grad_(),))
    assert g
    f2 = f.clone()
    i, j = [int(t) for t in (m[0] > 0).nonzero()[0]]
    f2[0, :, i, j] = float("nan")
    assert torch.isnan(DF.masked_average_pool(f2, m)[0]).all()  # included: propagates


# ----------------------------------------------------------------------------------- batch 0
def test_modules_batch_zero_give_empty_outputs():
    q, s, m = torch.zeros(0, 4, 5, 6), torch.zeros(0, 2, 4, 3, 3), torch.zeros(0, 2, 7, 7)
    out = dcm.SupportActivation()(q, s, m)
    assert out.maps.shape == (0, 3, 5, 6) and out.pseudo_mask.shape == (0, 1, 5, 6)
    assert DF.support_activation(q, s, m, ((1, 1),)).shape == (0, 1, 5, 6)
    leaf = q.clone().requires_grad_()
    DF.support_activation(leaf, s, m).sum().backward()  # connected to the graph
    assert leaf.grad.shape == q.shape
    assert [o.shape for o in dcm.DynamicConvModule(4)(q, s, m)] == [(0, 4, 5, 6)] * 3
    ff = dcm.FeatureFiltering(4)(q, s, m, torch.zeros(0, 1, 5, 6))
    assert ff.prototype.shape == (0, 4) and ff.refined_mask.shape == (0, 1, 5, 6) and ff.filtered.shape == (0, 4, 5, 6)


_INTERPRETED_NON_FINITE = r"""
import warnings
import torch, dcm, dcm.functional as DF
from dcm import kernels
assert kernels.interpreted()
warnings.simplefilter("ignore")
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
B, K, C, H, W = 2, 2, 4, 5, 6
f = torch.randn(B, K, C, H, W, generator=g)
q = torch.randn(B, C, 4, 5, generator=g)
m = torch.zeros(B, K, 7, 8)
m[:, :, 2:5, 3:6] = 1
m[1, 1] = 0  # an empty shot
r = DF.prepare_mask(m, (H, W))
for name, inc in (("fg", DF.foreground_selection(r)), ("sam", r > 0)):
    ex = ~inc
    bad = f.clone()
    bad.permute(0, 1, 3, 4, 2)[ex] = float("nan")
    bad.permute(0, 1, 3, 4, 2)[ex & (torch.rand(ex.shape, generator=g) < 0.5)] = float("inf")
    fn = (lambda x: DF.foreground_pool(x, m, (3, 9))) if name == "fg" else (lambda x: (DF.support_activation(q, x, m),))
    with dcm.use_backend("torch"):
        ref = fn(f)
    leaf = bad.clone().requires_grad_()
    with dcm.use_backend("triton"):
        want = fn(f)
        got = fn(leaf)
        sum(o.sum() for o in got).backward()
    for a, b, c in zip(got, want, ref):
        assert torch.equal(a.detach(), b), name  # the kernels see exactly what they see without the NaN / Inf
        torch.testing.assert_close(b, c, rtol=0, atol=1e-4)
    assert torch.isfinite(leaf.grad).all() and not leaf.grad.permute(0, 1, 3, 4, 2)[ex].any(), name
print("NONFINITE-OK")
"""


def test_non_finite_outside_the_mask_under_the_triton_interpreter():
    """The kernel paths (foreground pooling, SAM) keep excluded support positions out too (CPU interpreter)."""
    pytest.importorskip("triton", reason="Triton is not installed")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", _INTERPRETED_NON_FINITE], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and "NONFINITE-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
