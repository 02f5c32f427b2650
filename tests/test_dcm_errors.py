"""Every validation path of dcm raises a clear error naming the argument (and shapes where relevant)."""
import re

import pytest
import torch

import dcm
import dcm.functional as DF


def q(*s):
    return torch.randn(*s)


NONFINITE = r"^support_mask: expected values in \[0, 1\] or the ignore label 255, got non-finite values \(NaN/Inf\); a NaN mask is not an empty mask"
FG = r"^fg_threshold: expected a float in the open interval \(0, 1\), got "
DT = r"^{0}: expected dtype torch.float32 \(the dtype of the {2}'s parameters\), got torch.{1}; cast the input"
_GENS = {k: (lambda t: t) for k in "vhs"}


def _nan_mask():
    m = torch.ones(2, 5, 5)
    m[1, 2, 3] = float("nan")  # one NaN pixel
    return m


def _dcm_after_construction(**attrs):
    mod = dcm.DynamicConvModule(8)
    for k, v in attrs.items():
        setattr(mod, k, v)  # an option is checked when it is set, not only in __init__
    return mod(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.ones(2, 5, 5))


CASES = [
    # (callable, exception, message regex)
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5), q(2, 8, 5, 5), torch.ones(2, 5, 5)), ValueError, r"query: expected shape \(B, C, H, W\), got \(2, 8, 5\)"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 4, 5, 5), q(2, 4, 5, 5), torch.ones(2, 5, 5)), ValueError, r"query: expected C=8 channels"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(3, 8, 5, 5), torch.ones(3, 5, 5)), ValueError, r"support: expected batch size B=2"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 1, 6, 5, 5), torch.ones(2, 5, 5)), ValueError, r"support: expected C=8 channels .* got \(2, 1, 6, 5, 5\)"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 3, 8, 5, 5), torch.ones(2, 2, 5, 5)), ValueError, r"support_mask: expected shape \(B=2, K=3, h, w\), got \(2, 2, 5, 5\)"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 3, 8, 5, 5), torch.ones(2, 5, 5)), ValueError, r"support_mask: expected shape \(B=2, K=3, h, w\) for 3 shots"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.ones(5, 5)), ValueError, r"support_mask: expected shape .* got \(5, 5\) \(rank 2\)"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5).long(), q(2, 8, 5, 5), torch.ones(2, 5, 5)), TypeError, r"query: expected a floating-point tensor, got dtype torch.int64"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), [[1]]), TypeError, r"mask.*expected a torch.Tensor"),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.full((2, 5, 5), 7)), ValueError, r"mask: expected values in \[0, 1\] or the ignore label 255, got e.g. \[7\]"),
    (lambda: dcm.DynamicConvModule(8, kernel_size=4), ValueError, r"kernel_size: expected positive odd sizes"),
    (lambda: dcm.DynamicConvModule(8, kernel_size=0), ValueError, r"kernel_size: expected positive odd sizes"),
    (lambda: dcm.DynamicConvModule(8, kernel_size=-3), ValueError, r"kernel_size: expected positive odd sizes"),
    (lambda: dcm.DynamicConvModule(8, kernel_size=2.5), TypeError, r"kernel_size"),
    (lambda: dcm.DynamicConvModule(8, variants=("v", "x")), ValueError, r"variants: expected a non-empty subset"),
    (lambda: dcm.DynamicConvModule(8, variants=()), ValueError, r"variants: expected a non-empty subset"),
    (lambda: dcm.DynamicConvModule(8, square_source="both"), ValueError, r"square_source: expected 'serial' or 'parallel'"),
    (lambda: dcm.DynamicConvModule(0), ValueError, r"channels: expected a positive int"),
    (lambda: dcm.SupportActivation(windows=((2, 1),)), ValueError, r"windows\[0\]: expected positive odd sizes"),
    (lambda: dcm.SupportActivation(windows=()), ValueError, r"windows: expected at least one"),
    (lambda: dcm.SupportActivation(windows=((3, 3, 3),)), TypeError, r"windows\[0\]"),
    (lambda: dcm.SupportActivation(windows=5), TypeError, r"windows: expected a sequence"),
    (lambda: dcm.SupportActivation(chunk_size=0), ValueError, r"chunk_size: expected None or a positive int"),
    (lambda: dcm.SupportActivation()(q(2, 8, 5, 5), q(2, 7, 5, 5), torch.ones(2, 5, 5)), ValueError, r"support: expected C=8 channels"),
    (lambda: dcm.SupportActivation()(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.ones(2, 5, 0)), ValueError, r"support_mask: expected non-empty h, w"),
    (lambda: dcm.FeatureFiltering(8, kernel_size=2), ValueError, r"kernel_size: expected positive odd sizes"),
    (lambda: dcm.FeatureFiltering(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.ones(2, 5, 5), q(2, 2, 5, 5)), ValueError, r"pseudo_mask: expected shape \(B=2, 1, h, w\), got \(2, 2, 5, 5\)"),
    (lambda: dcm.FeatureFiltering(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.ones(2, 5, 5), q(5, 5)), ValueError, r"pseudo_mask: expected shape"),
    (lambda: DF.dynamic_depthwise_conv2d(q(2, 3, 5, 5), q(2, 3, 4, 1)), ValueError, r"weight kernel size: expected positive odd sizes .* got \(4, 1\)"),
    (lambda: DF.dynamic_depthwise_conv2d(q(2, 3, 5, 5), q(2, 4, 3, 3)), ValueError, r"weight: expected shape \(B=2, C=3, kh, kw\), got \(2, 4, 3, 3\)"),
    (lambda: DF.dynamic_depthwise_conv2d(q(2, 3, 5, 5), q(3, 3, 3)), ValueError, r"weight: expected shape \(B, C, kh, kw\)"),
    (lambda: DF.foreground_pool(q(2, 3, 5, 5), torch.ones(2, 5, 5), bins=(0,)), ValueError, r"bins: expected positive ints"),
    (lambda: DF.masked_average_pool(q(2, 3, 5, 5), torch.ones(2, 5, 5), empty="nan"), ValueError, r"empty: expected 'zero' or 'mean'"),
    (lambda: dcm.set_backend("cuda"), ValueError, r"backend: expected one of"),
    # values that used to pass the checks and change the answer (issue "Nothing overwritten, nothing silent", item 3)
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.full((2, 5, 5), float("nan"))), ValueError, NONFINITE),
    (lambda: dcm.SupportActivation()(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.full((2, 5, 5), float("nan"))), ValueError, NONFINITE),
    (lambda: dcm.FeatureFiltering(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), _nan_mask(), q(2, 1, 5, 5)), ValueError, NONFINITE),
    (lambda: DF.masked_average_pool(q(2, 3, 5, 5), _nan_mask()), ValueError, r"^mask: .* got non-finite values"),
    (lambda: DF.foreground_pool(q(2, 3, 5, 5), torch.full((2, 5, 5), float("inf"))), ValueError, r"^mask: .* got non-finite values"),
    (lambda: dcm.DynamicConvModule(8, fg_threshold=-1), ValueError, FG),
    (lambda: dcm.DynamicConvModule(8, fg_threshold=0.0), ValueError, FG),
    (lambda: dcm.DynamicConvModule(8, fg_threshold=1.0), ValueError, FG),
    (lambda: dcm.DynamicConvModule(8, fg_threshold=float("nan")), ValueError, FG),
    (lambda: dcm.DynamicConvModule(8, fg_threshold="0.5"), TypeError, r"^fg_threshold: expected a float"),
    (lambda: DF.foreground_pool(q(2, 3, 5, 5), torch.ones(2, 5, 5), fg_threshold=-1), ValueError, FG),
    (lambda: DF.foreground_selection(torch.ones(2, 1, 5, 5), fg_threshold=1.5), ValueError, FG),
    (lambda: DF.dynamic_convolution(q(2, 3, 5, 5), q(2, 3, 5, 5), torch.ones(2, 5, 5), _GENS, 3, fg_threshold=0), ValueError, FG),
    (lambda: DF.generate_dynamic_kernels(q(2, 3, 5, 5), torch.ones(2, 5, 5), _GENS, 3, fg_threshold=-1), ValueError, FG),
    (lambda: _dcm_after_construction(fg_threshold=-1.0), ValueError, FG),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.full((2, 5, 5), -1, dtype=torch.int8)), ValueError,
     r"^support_mask: expected values in \[0, 1\] or the ignore label 255, got e.g. \[-1\]"),
    (lambda: DF.masked_average_pool(q(2, 3, 5, 5), torch.ones(2, 5, 5), eps=-1e-3), ValueError, r"^eps: expected a finite float >= 0"),
    (lambda: DF.support_prototype(q(2, 3, 5, 5), torch.ones(2, 5, 5), eps=-1.0), ValueError, r"^eps: expected a finite float >= 0"),
    (lambda: dcm.FeatureFiltering(8, eps=-5e-4), ValueError, r"^eps: expected a finite float >= 0"),
    # item 6: dtypes a float32 module cannot take without autocast, batch mismatches in the fusion
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5).half(), q(2, 8, 5, 5), torch.ones(2, 5, 5)), TypeError, DT.format("query", "float16", "DynamicConvModule")),
    (lambda: dcm.DynamicConvModule(8)(q(2, 8, 5, 5), q(2, 8, 5, 5).bfloat16(), torch.ones(2, 5, 5)), TypeError, DT.format("support", "bfloat16", "DynamicConvModule")),
    (lambda: dcm.DynamicConvModule(8).generate_kernels(q(2, 8, 5, 5).half(), torch.ones(2, 5, 5)), TypeError, DT.format("support", "float16", "DynamicConvModule")),
    (lambda: dcm.FeatureFiltering(8)(q(2, 8, 5, 5).bfloat16(), q(2, 8, 5, 5), torch.ones(2, 5, 5), q(2, 1, 5, 5)), TypeError, DT.format("query", "bfloat16", "FeatureFiltering")),
    (lambda: dcm.FeatureFiltering(8)(q(2, 8, 5, 5), q(2, 8, 5, 5).half(), torch.ones(2, 5, 5), q(2, 1, 5, 5)), TypeError, DT.format("support", "float16", "FeatureFiltering")),
    (lambda: dcm.DCMFusion(4, 2)(q(2, 4, 5, 5), [q(3, 4, 5, 5), q(3, 4, 5, 5)]), ValueError, r"^maps\[0\]: expected shape \(2, 4, 5, 5\) \(the batch and size of q\), got \(3, 4, 5, 5\)"),
    (lambda: dcm.DCMFusion(4, 1)(q(2, 4, 5, 5), [q(1, 4, 5, 5)]), ValueError, r"^maps\[0\]: expected shape \(2, 4, 5, 5\)"),
    (lambda: dcm.DCMFusion(4, 1)(q(2, 6, 5, 5), [q(2, 4, 5, 5)]), ValueError, r"^q: expected shape \(B, 4, h, w\), got \(2, 6, 5, 5\)"),
]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_error_messages(i):
    fn, exc, pattern = CASES[i]
    with pytest.raises(exc) as info:
        fn()
    assert re.search(pattern, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)  # one line


def test_fp16_inputs_are_fine_under_autocast_and_matching_modules():
    """The dtype check only rejects what would fail (or silently run at another precision): under autocast
    a float32 module takes bf16 inputs, and a module converted to the inputs' dtype takes them too."""
    m = torch.ones(2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = dcm.DynamicConvModule(8)(q(2, 8, 5, 5).bfloat16(), q(2, 8, 5, 5).bfloat16(), m)
        out = dcm.FeatureFiltering(8)(q(2, 8, 5, 5).bfloat16(), q(2, 8, 5, 5).bfloat16(), m, q(2, 1, 5, 5))
    assert all(o.shape == (2, 8, 5, 5) for o in outs) and out.filtered.shape == (2, 8, 5, 5)
    d = dcm.DynamicConvModule(8, dtype=torch.float64)
    assert d(q(2, 8, 5, 5).double(), q(2, 8, 5, 5).double(), m)[0].dtype == torch.float64
    with pytest.raises(TypeError, match=r"^query: expected dtype torch.float64 .* got torch.float32"):
        d(q(2, 8, 5, 5), q(2, 8, 5, 5), m)


def test_valid_masks_still_pass_the_value_check():
    """uint8 / int16 label maps with 255, bool and soft float masks stay valid."""
    f = q(2, 3, 5, 5)
    lab = torch.zeros(2, 5, 5, dtype=torch.uint8)
    lab[:, 1:3, 1:3] = 1
    lab[:, 0, 0] = 255
    for mk in (lab, lab.to(torch.int16), lab.bool(), torch.rand(2, 5, 5), lab.to(torch.int8).clamp(0, 1)):
        DF.masked_average_pool(f, mk)
        DF.foreground_pool(f, mk, (3,), fg_threshold=0.999)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mismatch")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"support_mask: expected a tensor on cuda"):
        dcm.DynamicConvModule(4).cuda()(q(1, 4, 5, 5).cuda(), q(1, 4, 5, 5).cuda(), torch.ones(1, 5, 5))


def test_device_mismatch_meta():
    # a second device type is available everywhere: the meta device
    with pytest.raises(ValueError, match=r"^mask: expected a tensor on cpu \(the device of feat\), got meta"):
        DF.foreground_pool(q(1, 1, 4, 5, 5), torch.ones(1, 1, 5, 5, device="meta"))
    with pytest.raises(ValueError, match=r"support_mask: expected a tensor on cpu \(the device of support\), got meta"):
        dcm.DynamicConvModule(4)(q(1, 4, 5, 5), q(1, 4, 5, 5), torch.ones(1, 5, 5, device="meta"))
    with pytest.raises(ValueError, match=r"support: expected a tensor on cpu \(the device of query\), got meta"):
        dcm.SupportActivation()(q(1, 4, 5, 5), torch.ones(1, 4, 5, 5, device="meta"), torch.ones(1, 5, 5, device="meta"))
    with pytest.raises(ValueError, match=r"support: expected a tensor on cpu \(the device of query\), got meta"):
        dcm.DynamicConvModule(4)(q(1, 4, 5, 5), torch.ones(1, 4, 5, 5, device="meta"), torch.ones(1, 5, 5, device="meta"))
    with pytest.raises(ValueError, match=r"support: expected a tensor on cpu \(the device of query\), got meta"):
        dcm.FeatureFiltering(4)(q(1, 4, 5, 5), torch.ones(1, 4, 5, 5, device="meta"), torch.ones(1, 5, 5, device="meta"), q(1, 1, 5, 5))


def test_backend_triton_on_cpu_tensors_uses_torch():
    with dcm.use_backend("triton"):
        out = DF.dynamic_depthwise_conv2d_multi(q(1, 2, 4, 4), [q(1, 2, 3, 3)])
    assert out[0].shape == (1, 2, 4, 4)
    assert dcm.get_backend() == "auto"


def test_data_checks_can_be_disabled():
    dcm.set_data_checks(False)
    try:
        DF.foreground_pool(q(1, 1, 2, 3, 3), torch.full((1, 1, 3, 3), 7.0))  # no value check
    finally:
        dcm.set_data_checks(True)


# ------------------------------------------------------------------------------------- checked once
_CHECKS = ("tensor", "fg_threshold", "nonneg_eps", "windows", "odd_size", "one_of", "positive_int", "positive_ints",
           "check_mask_values", "param_dtype")


def _ops():
    """(label, callable) for every module forward and every functional op that takes tensors and options."""
    Q, S, M, PM = q(2, 8, 5, 5), q(2, 3, 8, 5, 5), torch.ones(2, 3, 5, 5), torch.rand(2, 1, 5, 5)
    dcm_mod, sam, ffm = dcm.DynamicConvModule(8, kernel_norm="l1"), dcm.SupportActivation(chunk_size=2), dcm.FeatureFiltering(8)
    return [
        ("DynamicConvModule", lambda: dcm_mod(Q, S, M)),
        ("DynamicConvModule.generate_kernels", lambda: dcm_mod.generate_kernels(S, M)),
        ("SupportActivation", lambda: sam(Q, S, M)),
        ("FeatureFiltering", lambda: ffm(Q, S, M, PM)),
        ("dynamic_convolution", lambda: DF.dynamic_convolution(Q, S, M, _GENS, 3, kernel_norm="l2")),
        ("generate_dynamic_kernels", lambda: DF.generate_dynamic_kernels(S, M, _GENS, 3)),
        ("dynamic_depthwise_conv2d_multi", lambda: DF.dynamic_depthwise_conv2d_multi(Q, [q(2, 8, 3, 1), q(2, 8, 1, 3)])),
        ("dynamic_depthwise_conv2d", lambda: DF.dynamic_depthwise_conv2d(Q, q(2, 8, 3, 3))),
        ("support_activation", lambda: DF.support_activation(Q, S, M, chunk_size=3)),
        ("support_activation_raw", lambda: DF.support_activation_raw(Q, S, chunk_size=3)),
        ("support_prototype", lambda: DF.support_prototype(S, M)),
        ("feature_filtering", lambda: DF.feature_filtering(Q, q(2, 8), PM, q(1, 8, 3, 3))),
        ("foreground_pool", lambda: DF.foreground_pool(S, M)),
        ("masked_average_pool", lambda: DF.masked_average_pool(S, M)),
        ("normalize_kernel", lambda: DF.normalize_kernel(q(2, 8, 3, 3), "l1")),
    ]


@pytest.mark.parametrize("label", [label for label, _ in _ops()])
def test_each_argument_is_checked_once(monkeypatch, label):
    """A module forward checks each input once (its options were checked when set) and a functional op
    each argument once, however many internal functions the call passes through."""
    from dcm import _check

    seen = []
    for fn in _CHECKS:
        orig = getattr(_check, fn)
        monkeypatch.setattr(_check, fn, lambda name, *a, _f=fn, _o=orig, **kw: seen.append((_f, name)) or _o(name, *a, **kw))
    call = dict(_ops())[label]
    seen.clear()  # what building the modules checked
    call()
    counts = {k: seen.count(k) for k in seen}
    assert seen and all(n == 1 for n in counts.values()), counts
    if label[0].isupper():  # a module: no option is checked on the way
        assert {f for f, _ in seen} <= {"tensor", "check_mask_values", "param_dtype"}, counts


@pytest.mark.parametrize("make, attr, bad, pattern", [
    (lambda: dcm.DynamicConvModule(8), "kernel_size", 4, r"^kernel_size: expected positive odd sizes"),
    (lambda: dcm.DynamicConvModule(8), "variants", ("v", "v"), r"^variants: expected a non-empty subset"),
    (lambda: dcm.DynamicConvModule(8), "square_source", "both", r"^square_source: expected 'serial' or 'parallel'"),
    (lambda: dcm.DynamicConvModule(8), "kernel_norm", "l3", r"^kernel_norm: expected None, 'l1' or 'l2', got 'l3'"),
    (lambda: dcm.SupportActivation(), "windows", ((2, 1),), r"^windows\[0\]: expected positive odd sizes"),
    (lambda: dcm.SupportActivation(), "chunk_size", 0, r"^chunk_size: expected None or a positive int, got 0"),
    (lambda: dcm.FeatureFiltering(8), "eps", -1.0, r"^eps: expected a finite float >= 0"),
])
def test_module_options_are_checked_when_set(make, attr, bad, pattern):
    mod = make()
    before = getattr(mod, attr)
    with pytest.raises(ValueError, match=pattern):
        setattr(mod, attr, bad)
    assert getattr(mod, attr) == before  # a rejected value is not kept


def test_module_options_set_later_are_used_normalised():
    sam = dcm.SupportActivation()
    sam.windows = [[3, 3], 1]
    assert sam.windows == ((3, 3), (1, 1))
    assert sam(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.ones(2, 5, 5)).maps.shape == (2, 2, 5, 5)
    mod = dcm.DynamicConvModule(8)
    mod.variants = ["s", "v"]
    assert mod.variants == ("s", "v") and len(mod(q(2, 8, 5, 5), q(2, 8, 5, 5), torch.ones(2, 5, 5))) == 2
    assert re.search(r"variants=\('s', 'v'\)", repr(mod))


def test_positive_int_checks_share_one_message():
    for make, name in ((lambda v: dcm.DynamicConvModule(v), "channels"), (lambda v: dcm.FeatureFiltering(v), "channels"),
                       (lambda v: dcm.DCMFusion(v, 1), "channels"), (lambda v: dcm.DCMFusion(4, v), "n_maps")):
        for bad in (0, -1, True, 2.0, "3"):
            with pytest.raises(ValueError, match=rf"^{name}: expected a positive int, got {re.escape(repr(bad))}$"):
                make(bad)
    with pytest.raises(ValueError, match=r"^map_channels: expected None or a positive int, got 0$"):
        dcm.DCMFusion(4, 1, map_channels=0)
    assert dcm.DCMFusion(4, 2).map_channels == 4 and dcm.DCMFusion(4, 2, map_channels=6).map_channels == 6
