"""The comparison harness: feature cache, image split, flip-only augmentation, seed statistics,
DCM fusion variants of the hosts and plug_in.py's arms."""
import copy
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from benchmarks.engine.config import load_config
from benchmarks.engine.feature_cache import FeatureCache, attach_feature_cache, detach_feature_cache
from benchmarks.scoring.stats import fold_average, paired_difference, t_quantile_975

from conftest import SHARED_DATA

from _scripts import ROOT, tiny
VOC_SAMPLE = SHARED_DATA / "voc-sample" / "VOC2012"

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny(2, "run.progress=false")


# ------------------------------------------------------------------------------ feature cache
def _lite0():
    from models.backbones import build_backbone
    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", weights="random")


class _Holder(torch.nn.Module):
    def __init__(self, bb):
        super().__init__()
        self.backbone = bb


def test_feature_cache_returns_what_the_backbone_computes():
    bb = _lite0().eval()
    x = torch.randn(3, 3, 40, 40)
    ref_mid = bb.forward_mid(x)
    ref_high = bb.forward_high(ref_mid[1])
    cache = attach_feature_cache(_Holder(bb), shared=False)
    for _ in range(2):  # first call fills, second hits
        mid = bb.forward_mid(x)
        high = bb.forward_high(mid[1])
        for a, b in zip(mid + (high,), ref_mid + (ref_high,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert cache.hits == 6 and cache.misses == 6 and len(cache) == 6
    # a batch mixing a seen and an unseen input computes only the unseen one
    y = torch.cat([x[:1], torch.randn(1, 3, 40, 40)])
    bb.forward_mid(y)
    assert (cache.hits, cache.misses) == (7, 7)
    torch.testing.assert_close(bb.forward_mid(y)[0][0], ref_mid[0][0], rtol=1e-5, atol=1e-6)
    # a model copy shares the cache; detaching restores plain calls
    h = _Holder(bb)
    assert copy.deepcopy(h).backbone.feature_cache is cache
    assert detach_feature_cache(h) is cache and bb.feature_cache is None


def test_feature_cache_is_bypassed_when_the_stage_is_not_frozen():
    bb = _lite0().eval()
    cache = attach_feature_cache(_Holder(bb), shared=False)
    x = torch.randn(2, 3, 32, 32)
    bb.set_layer4_trainable(True)
    l3 = bb.forward_mid(x)[1]
    out = bb.forward_high(l3)
    assert out.requires_grad and cache.misses == 2  # only the mid-level stage went through the cache
    xg = x.clone().requires_grad_(True)
    bb.forward_mid(xg)
    assert cache.misses == 2
    with pytest.raises(ValueError, match="cache_backbone"):
        from models.backbones import build_backbone
        attach_feature_cache(_Holder(build_backbone("efficientnet_lite0", weights="random", freeze_bn=False)))


def test_feature_cache_memory_cap():
    bb = _lite0().eval()
    cache = FeatureCache(max_bytes=0)
    bb.feature_cache = cache
    x = torch.randn(2, 3, 32, 32)
    a = bb.forward_mid(x)
    b = bb.forward_mid(x)
    assert len(cache) == 0 and cache.misses == 4 and cache.hits == 0
    torch.testing.assert_close(a[1], b[1])


def test_feature_cache_saves_and_loads(tmp_path):
    from benchmarks.engine.feature_cache import cache_file
    bb = _lite0().eval()
    cache = attach_feature_cache(_Holder(bb), shared=False)
    x = torch.randn(2, 3, 32, 32)
    ref = bb.forward_mid(x)
    bb.forward_high(ref[1])
    path = cache.save(cache_file(tmp_path, cache))
    bb2 = _lite0().eval()  # same seed: same weights, same namespace
    fresh = attach_feature_cache(_Holder(bb2), shared=False, cache_dir=tmp_path)
    assert len(fresh) == len(cache) == 4
    got = bb2.forward_mid(x)
    assert fresh.hits == 2 and fresh.misses == 0
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    other = FeatureCache(namespace="other")
    with pytest.raises(ValueError, match="other backbone weights"):
        other.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        cache.load(path)


def test_cached_training_matches_uncached(tmp_path):
    """The same tiny run with and without train.cache_backbone: same losses, validation and test scores."""
    from benchmarks.engine import train
    outs = []
    for cached in (False, True):
        cfg = load_config("synthetic", TINY + [f"train.cache_backbone={str(cached).lower()}"])
        outs.append(train(cfg, tmp_path / f"c{int(cached)}", echo=lambda *_: None))
    (u, c) = outs
    for hu, hc in zip(u["history"], c["history"]):
        assert math.isclose(hu["train_loss"], hc["train_loss"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(hu["val_miou"], hc["val_miou"], abs_tol=1e-3)
    assert math.isclose(u["results"]["rows"][-1]["miou"], c["results"]["rows"][-1]["miou"], abs_tol=1e-3)


def test_flip_augmentation_gives_two_inputs_per_image():
    from benchmarks.datasets.transforms import flip_transform, test_transform
    rs = np.random.default_rng(0)
    img = rs.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    mask = (rs.random((30, 50)) > 0.5).astype(np.uint8)
    t = flip_transform(24)
    outs = {}
    for seed in range(20):
        x, m = t(img, mask, np.random.default_rng(seed))
        outs[x.numpy().tobytes()] = (x, m)
    assert len(outs) == 2
    plain, pm = test_transform(24)(img, mask)
    got = sorted(outs.values(), key=lambda xm: not torch.equal(xm[0], plain))
    assert torch.equal(got[0][0], plain) and torch.equal(got[0][1], pm)
    assert torch.equal(got[1][0], plain.flip(-1)) and torch.equal(got[1][1], pm.flip(-1))


def test_flip_augmentation_config():
    cfg = load_config("plug_in_pfenet_voc_lite0", ["data.root=/d"])
    assert cfg["data"]["augment"] == "flip" and cfg["train"]["cache_backbone"]
    from benchmarks.engine.config import ConfigError
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(None, ["data.augment=rotate"])
    with pytest.raises(ConfigError, match="eval.split"):
        load_config(None, ["eval.split=train"])


# ------------------------------------------------------------------------------ image split
@pytest.mark.skipif(not VOC_SAMPLE.is_dir(), reason=f"real VOC sample not found at {VOC_SAMPLE}")
def test_image_split_is_disjoint_and_complete_on_real_masks(tmp_path):
    from benchmarks.datasets.pascal import PascalFewShot, image_split_of
    spec = {"seed": 3, "val": 0.2, "test": 0.3}
    parts = {}
    for split in ("train", "val", "test"):
        ds = PascalFewShot(VOC_SAMPLE, fold=1, split=split, image_split=spec, min_pixels=0, on_small_pool="skip",
                           episodes=4, cache_dir=tmp_path)
        parts[split] = set(ds._names)
    stems = {p.stem for p in (VOC_SAMPLE / "SegmentationClassAug").glob("*.png")}
    assert parts["train"].isdisjoint(parts["val"]) and parts["train"].isdisjoint(parts["test"])
    assert parts["val"].isdisjoint(parts["test"])
    assert parts["train"] | parts["val"] | parts["test"] <= stems
    # every image lands where the rule says (train keeps only images with a base class, eval novel ones)
    for split, names in parts.items():
        assert all(image_split_of(n, spec) == split for n in names)
    n = len(stems)
    counts = {s: sum(image_split_of(x, spec) == s for x in stems) for s in ("train", "val", "test")}
    assert abs(counts["test"] / n - 0.3) < 0.12 and abs(counts["val"] / n - 0.2) < 0.12
    # another seed moves images
    assert any(image_split_of(x, spec) != image_split_of(x, {**spec, "seed": 4}) for x in stems)


@pytest.mark.skipif(not VOC_SAMPLE.is_dir(), reason=f"real VOC sample not found at {VOC_SAMPLE}")
def test_image_split_uses_the_folders_val_list(tmp_path):
    from benchmarks.datasets.pascal import PascalFewShot
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").symlink_to(VOC_SAMPLE / "JPEGImages")
    (root / "SegmentationClassAug").symlink_to(VOC_SAMPLE / "SegmentationClassAug")
    stems = sorted(p.stem for p in (VOC_SAMPLE / "SegmentationClassAug").glob("*.png"))
    val_list = stems[::3]
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val_list) + "\n")
    spec = {"seed": 0, "val": 0.2, "test": 0.25}
    test = PascalFewShot(root, fold=1, split="test", image_split=spec, min_pixels=0, on_small_pool="skip",
                         episodes=4, cache_dir=tmp_path)
    val = PascalFewShot(root, fold=1, split="val", image_split=spec, min_pixels=0, on_small_pool="skip",
                        episodes=4, cache_dir=tmp_path)
    assert set(test._names) <= set(val_list) and set(test._names)
    assert set(val._names).isdisjoint(val_list)


def test_image_split_arguments_are_checked():
    from benchmarks.datasets.pascal import check_image_split
    for bad in ({"val": 0.1}, {"seed": 0, "val": 0.6, "test": 0.5}, {"seed": -1}, {"seed": 0, "tset": 0.2}):
        with pytest.raises(ValueError, match="image_split"):
            check_image_split(bad)


# ------------------------------------------------------------------------------ statistics
def test_paired_difference_by_hand():
    a = {1: {0: 10.0, 1: 12.0}, 2: {0: 20.0, 1: 20.0}}
    b = {1: {0: 11.0, 1: 14.0}, 2: {0: 21.0, 1: 23.0}}
    d = paired_difference(a, b)
    # fold 1: diffs 1, 2 -> mean 1.5, sd 0.7071; fold 2: 1, 3 -> mean 2, sd 1.4142
    assert d["folds"][1]["mean"] == 1.5 and d["folds"][2]["mean"] == 2.0
    lo, hi = d["folds"][1]["ci95"]
    assert math.isclose(hi - 1.5, 12.7062 * 0.70710678 / math.sqrt(2), rel_tol=1e-5)
    se = math.sqrt(0.5 / 2 + 2.0 / 2) / 2
    # Welch-Satterthwaite: (0.25 + 1.0)^2 / (0.25^2 / 1 + 1.0^2 / 1) = 1.5625 / 1.0625
    assert math.isclose(d["df"], 1.5625 / 1.0625, rel_tol=1e-12) and math.isclose(d["se"], se, rel_tol=1e-9)
    # t_{0.975} at 1.470588 df (scipy.special.stdtrit, an independent route to the quantile)
    from scipy.special import stdtrit
    assert math.isclose(d["ci95"][0], 1.75 - float(stdtrit(1.5625 / 1.0625, 0.975)) * se, rel_tol=1e-9)
    one = paired_difference({1: {0: 1.0}}, {1: {0: 2.0}})
    assert one["ci95"] is None and one["mean"] == 1.0
    with pytest.raises(ValueError):
        paired_difference({1: {0: 1.0}}, {2: {0: 1.0}})
    avg = fold_average(a)
    assert avg["mean"] == 15.5 and math.isclose(avg["std"], math.sqrt(0.5), rel_tol=1e-9)
    assert math.isclose(t_quantile_975(8), 2.306, abs_tol=1e-3) and abs(t_quantile_975(1000) - 1.96) < 0.01


# ------------------------------------------------------------------------------ DCM fusion in the hosts
def _box_episode(batch):
    """A seeded query/support pair of 65-px images with a box mask on the support."""
    torch.manual_seed(0)
    q, s = torch.randn(batch, 3, 65, 65), torch.randn(batch, 1, 3, 65, 65)
    m = torch.zeros(batch, 1, 65, 65)
    m[:, :, 10:50, 15:45] = 1
    return q, s, m


def _assert_loads_and_equals(plain, with_dcm, batch=2):
    """``with_dcm`` takes ``plain``'s weights (missing only its DCM and fusion) and then computes the same
    logits, bit for bit; returns the episode and those logits."""
    missing, unexpected = with_dcm.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("dcm.", "dcm_fuse.")) for k in missing)
    q, s, m = _box_episode(batch)
    a = plain(q, s, m)["logits"]
    assert torch.equal(a, with_dcm(q, s, m)["logits"])
    return (q, s, m), a


_PFENET_SMALL = {"reduce_dim": 16, "ppm_scales": [1.0, 0.5]}


@pytest.mark.parametrize("host, flags, dcm", [
    ("pfenet", _PFENET_SMALL, {}),
    ("pfenet", _PFENET_SMALL, {"placement": "decoder"}),
    ("pfenet", _PFENET_SMALL, {"input": "raw"}),
    ("pfenet", _PFENET_SMALL, {"placement": "pyramid"}),
    ("canet", {"reduce_dim": 16}, {}),
    ("canet", {"reduce_dim": 16}, {"input": "reduced"}),
    ("canet", {"reduce_dim": 16}, {"input": "reduced", "support": "clean"}),
])
def test_residual_dcm_host_equals_host_at_initialisation(resnet, host, flags, dcm):
    from models import build_model
    plain = build_model(host, backbone=resnet, **flags).eval()
    with_dcm = build_model(host + "+dcm", backbone=resnet, dcm=dcm, **flags).eval()  # the default fusion
    default_input = {"pfenet": "reduced", "canet": "raw"}[host]  # each host's default, chosen on real images
    assert with_dcm.dcm_spec.fusion == "residual" and with_dcm.dcm_spec.input == dcm.get("input", default_input)
    (q, s, m), a = _assert_loads_and_equals(plain, with_dcm)
    # ... and the DCM branch receives a gradient through its gate
    with_dcm.train()
    out = with_dcm(q, s, m, query_mask=(torch.rand(2, 65, 65) > 0.5).long())
    out["loss"].backward()
    from dcm import DCMFusion
    fusions = [f for f in with_dcm.modules() if isinstance(f, DCMFusion)]
    assert len(fusions) == (2 if dcm.get("placement") == "pyramid" else 1)
    assert all(f.gamma.grad.abs().sum() > 0 for f in fusions)
    # the paper's fusion (PFENet: replace, CANet: concat) is not the host at initialisation
    paper = build_model(host + "+dcm", backbone=resnet, dcm={**dcm, "fusion": "paper"}, **flags).eval()
    own = paper.state_dict()
    paper.load_state_dict({k: v for k, v in plain.state_dict().items() if own[k].shape == v.shape}, strict=False)
    assert not torch.allclose(paper(q, s, m)["logits"], a)


def test_dpcn_residual_dcm_equals_dpcn_without_dcm_at_initialisation(resnet):
    from models import build_model
    from models.arms import parse_arm
    flags = {"reduce_dim": 16, "decoder_dim": 16}
    plain = build_model("dpcn", backbone=resnet, dcm=None, **flags).eval()  # x̃_q in place of the DCM maps
    res = build_model("dpcn", backbone=resnet, dcm={"fusion": "residual"}, **flags).eval()
    assert res.x_out_channels == plain.x_out_channels and "dcm=DCMSpec(fusion='residual')" in repr(res)
    (q, s, m), _ = _assert_loads_and_equals(plain, res)
    res.train()
    res(q, s, m, query_mask=(torch.rand(2, 65, 65) > 0.5).long())["loss"].backward()
    assert res.dcm_fuse.gamma.grad.abs().sum() > 0
    paper = build_model("dpcn", backbone=resnet, **flags)  # the paper's replacing form is the default
    assert paper.dcm_spec.fusion == "paper" and not hasattr(paper, "dcm_fuse")
    assert parse_arm("dpcn[fusion=residual]", "dpcn").overrides == ["model.dcm.fusion=residual"]
    assert parse_arm("dpcn[paper]", "dpcn").overrides == ["model.dcm.preset=paper"]
    with pytest.raises(ValueError, match=r"dcm.fusion: expected 'paper' or 'residual', got 'concat' \('concat' is the "
                                         r"paper's fusion of CANet"):
        build_model("dpcn", backbone=resnet, dcm={"fusion": "concat"}, **flags)


def test_dpcn_raw_dcm_input_convolves_the_mid_level_feature(resnet):
    from models import build_model
    flags = {"reduce_dim": 16, "decoder_dim": 16}
    plain = build_model("dpcn", backbone=resnet, dcm=None, **flags).eval()
    raw = build_model("dpcn", backbone=resnet, dcm={"fusion": "residual", "input": "raw"}, **flags).eval()
    mid = resnet.channels["layer2"] + resnet.channels["layer3"]
    assert raw.dcm.channels == mid and raw.dcm_fuse.map_channels == mid and "input='raw'" in repr(raw)
    assert raw.dcm_fuse.proj[0].in_channels == 16 + 3 * mid
    (q, s, m), _ = _assert_loads_and_equals(plain, raw, batch=1)  # zero gate: DPCN w/o DCM at init
    seen = []
    raw.dcm.register_forward_hook(lambda mod, args, out: seen.append(args))
    raw.train()
    raw(q, s, m, query_mask=(torch.rand(1, 65, 65) > 0.5).long())["loss"].backward()
    torch.testing.assert_close(seen[0][0], raw._mid(q)[0])
    torch.testing.assert_close(seen[0][1][:, 0], raw._mid(s[:, 0])[0])
    assert raw.dcm_fuse.gamma.grad.abs().sum() > 0
    assert all(p.grad is not None for p in raw.dcm.parameters())
    with pytest.raises(ValueError, match="DPCN: dcm.input='raw' needs dcm.fusion='residual'"):
        build_model("dpcn", backbone=resnet, dcm={"input": "raw"}, **flags)
    with pytest.raises(ValueError, match="dcm.input"):
        build_model("dpcn", backbone=resnet, dcm={"input": "mid"}, **flags)
    with pytest.warns(DeprecationWarning):  # the flat flags of DPCN without DCM: nothing to check
        assert build_model("dpcn", backbone=resnet, use_dcm=False, dcm_input="raw", **flags).dcm_spec is None


def test_dcm_training_flags_make_an_optimiser_group(resnet):
    from models import build_model
    m = build_model("pfenet+dcm", backbone=resnet, reduce_dim=8, ppm_scales=[1.0], dcm={"lr_scale": 0.1, "weight_decay": 0.0})
    groups = {g["name"]: g for g in m.param_groups(0.01)}
    assert groups["dcm"]["lr"] == pytest.approx(0.001) and groups["dcm"]["weight_decay"] == 0.0
    ids = {id(p) for p in m.dcm.parameters()}
    assert {id(p) for p in groups["dcm"]["params"]} == ids
    assert not ids & {id(p) for p in groups["head"]["params"]}
    with pytest.raises(ValueError, match="dcm.lr_scale"):
        build_model("pfenet+dcm", backbone=resnet, reduce_dim=8, dcm={"lr_scale": -1})
    with pytest.raises(ValueError, match="dcm.fusion"):
        build_model("canet+dcm", backbone=resnet, reduce_dim=8, dcm={"fusion": "replace"})
    with pytest.raises(ValueError, match="dcm_fusion: expected 'concat' or 'residual'"):  # the flat spelling
        build_model("canet+dcm", backbone=resnet, reduce_dim=8, dcm_fusion="replace")


def test_pfenet_clean_support_skips_dropout_for_the_kernels(resnet):
    from models import build_model
    torch.manual_seed(0)
    m = build_model("pfenet+dcm", backbone=resnet, reduce_dim=8, ppm_scales=[1.0], dcm={"support": "clean"}).train()
    seen = []
    m.dcm.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    q, s = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65)
    m(q, s, torch.ones(1, 1, 65, 65))
    pre = m.down_supp[:-1](torch.cat(m._mid_features(s.flatten(0, 1))[::-1], 1))
    torch.testing.assert_close(seen[0][:, 0], pre)


def test_pfenet_pyramid_placement_fuses_pooled_maps_per_level(resnet):
    from models import build_model
    torch.manual_seed(0)
    m = build_model("pfenet+dcm", backbone=resnet, reduce_dim=8, ppm_scales=[1.0, 0.5], dcm={"placement": "pyramid"}).eval()
    for f in m.dcm_fuse:
        torch.nn.init.ones_(f.gamma)
    seen, maps = [], []
    m.dcm.register_forward_hook(lambda mod, args, out: maps.append(out))
    for i, f in enumerate(m.dcm_fuse):
        f.register_forward_hook(lambda mod, args, out: seen.append((args, out)))
    q, s = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65)
    m(q, s, torch.ones(1, 1, 65, 65))
    assert len(seen) == 2
    for (args, out), f in zip(seen, m.dcm_fuse):
        b = args[0].shape[-2:]
        for got, full in zip(args[1], maps[0]):
            torch.testing.assert_close(got, torch.nn.functional.adaptive_avg_pool2d(full, b))
        assert not torch.allclose(out, args[0])  # gamma = 1: the level's feature changes


def test_canet_clean_support_skips_dropout_for_the_kernels(resnet):
    from models import build_model
    torch.manual_seed(0)
    m = build_model("canet+dcm", backbone=resnet, reduce_dim=8, dcm={"input": "reduced", "support": "clean"}).train()
    seen = []
    m.dcm.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    q, s = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65)
    m(q, s, torch.ones(1, 1, 65, 65))
    pre = m.layer5[:-1](m.mid_feature(s.flatten(0, 1)))  # dropout in train mode would zero channels
    torch.testing.assert_close(seen[0][:, 0], pre)
    with pytest.raises(ValueError, match="dcm.support"):
        build_model("canet+dcm", backbone=resnet, reduce_dim=8, dcm={"support": "noisy"})
    for host, cls in (("pfenet", "PFENet"), ("canet", "CANet")):  # the raw input has no dropout: 'clean' would be ignored
        with pytest.raises(ValueError, match=f"{cls}: dcm.support='clean' applies to dcm.input='reduced'"):
            build_model(host + "+dcm", backbone=resnet, reduce_dim=8, dcm={"input": "raw", "support": "clean"})


@pytest.mark.parametrize("host", ["pfenet", "canet"])
def test_raw_dcm_input_convolves_the_backbone_feature(resnet, host):
    from models import build_model
    extra = {"ppm_scales": [1.0]} if host == "pfenet" else {}
    m = build_model(host + "+dcm", backbone=resnet, reduce_dim=8, dcm={"input": "raw"}, **extra).train()
    assert m.dcm.channels == m.fea_dim and m.dcm_fuse.map_channels == m.fea_dim
    assert m.dcm_fuse.proj[0].in_channels == 8 + 3 * m.fea_dim and "input='raw'" in repr(m)
    seen = []
    m.dcm.register_forward_hook(lambda mod, args, out: seen.append(args))
    torch.manual_seed(0)
    q, s = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65)
    m(q, s, torch.ones(1, 1, 65, 65), query_mask=torch.ones(1, 65, 65, dtype=torch.long))["loss"].backward()
    if host == "pfenet":
        want_q, want_s = (torch.cat(m._mid_features(x)[::-1], 1) for x in (q, s[:, 0]))
    else:
        want_q, want_s = m.mid_feature(q), m.mid_feature(s[:, 0])
    torch.testing.assert_close(seen[0][0], want_q)
    torch.testing.assert_close(seen[0][1][:, 0], want_s)
    assert all(p.grad is not None for p in m.dcm.parameters() if p.requires_grad)
    build_model(host + "+dcm", backbone=resnet, reduce_dim=8, dcm={"input": "raw", "fusion": "paper"}, **extra)
    with pytest.raises(ValueError, match="dcm.input"):
        build_model(host + "+dcm", backbone=resnet, reduce_dim=8, dcm={"input": "mid"}, **extra)


@pytest.mark.parametrize("host, dcm_input", [("pfenet", "reduced"), ("pfenet", "raw"), ("canet", "raw")])
def test_identity_kernels_control_feeds_the_dcm_input_to_the_fusion(resnet, host, dcm_input):
    from models import build_model
    extra = {"ppm_scales": [1.0]} if host == "pfenet" else {}
    kw = dict(backbone=resnet, reduce_dim=8, **extra)
    dyn = build_model(host + "+dcm", dcm={"input": dcm_input}, **kw).train()
    ctl = build_model(host + "+dcm", dcm={"input": dcm_input, "kernels": "identity"}, **kw).train()
    assert "kernels='identity'" in repr(ctl)
    # same fusion, no trainable kernel generators
    assert ctl.dcm_fuse.proj[0].in_channels == dyn.dcm_fuse.proj[0].in_channels
    n_gen = sum(p.numel() for p in dyn.dcm.parameters())
    assert n_gen > 0 and all(not p.requires_grad for p in ctl.dcm.parameters())
    n = lambda mdl: sum(p.numel() for p in mdl.trainable_parameters())
    assert n(dyn) - n(ctl) == n_gen
    seen, fused = [], []
    dyn.dcm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    ctl.dcm.register_forward_hook(lambda mod, args, out: seen.append("called"))
    ctl.dcm_fuse.register_forward_hook(lambda mod, args, out: fused.append(args[1]))
    torch.manual_seed(0)
    q, s = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65)
    lab = torch.ones(1, 65, 65, dtype=torch.long)
    ctl.load_state_dict(dyn.state_dict())
    dyn.eval(), ctl.eval()
    dyn(q, s, torch.ones(1, 1, 65, 65))
    ctl(q, s, torch.ones(1, 1, 65, 65))
    assert "called" not in seen and len(fused[0]) == len(ctl.dcm.variants)
    for t in fused[0]:
        torch.testing.assert_close(t, seen[0])  # the DCM's query input, unchanged
    ctl.train()
    with torch.no_grad():
        ctl.dcm_fuse.gamma.fill_(1.0)
    ctl(q, s, torch.ones(1, 1, 65, 65), query_mask=lab)["loss"].backward()
    assert ctl.dcm_fuse.proj[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dcm.kernels"):
        build_model(host + "+dcm", dcm={"input": dcm_input, "kernels": "delta"}, **kw)


def test_dcm_fusion_map_channels():
    from dcm import DCMFusion
    f = DCMFusion(4, 2, "residual", map_channels=6)
    q = torch.randn(2, 4, 5, 5)
    maps = [torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)]
    assert torch.equal(f(q, maps), q) and f.proj[0].in_channels == 4 + 12 and "map_channels=6" in repr(f)
    with torch.no_grad():
        f.gamma.fill_(1.0)
    want = q + torch.relu(torch.nn.functional.conv2d(torch.cat([q, *maps], 1), f.proj[0].weight))
    torch.testing.assert_close(f(q, maps), want)
    with pytest.raises(ValueError, match=r"maps\[1\]"):
        f(q, [maps[0], torch.randn(2, 4, 5, 5)])
    with pytest.raises(ValueError, match="2 DCM maps"):
        f(q, maps[:1])
    with pytest.raises(ValueError, match="map_channels"):
        DCMFusion(4, 2, map_channels=0)


# ------------------------------------------------------------------------------ plug_in arms
def test_arm_variants_parse():
    from models.arms import parse_arm
    a = parse_arm("pfenet+dcm[fusion=residual,kernel_norm=l1,lr_scale=0.1]", "pfenet")
    assert a.model == "pfenet+dcm" and a.tag == "pfenet_dcm_residual-l1-lr0.1"
    assert a.overrides == ["model.dcm.fusion=residual", "model.dcm.kernel_norm=l1", "model.dcm.lr_scale=0.1"]
    paper = parse_arm("canet+dcm[paper]", "canet")
    assert paper.overrides == ["model.dcm.preset=paper"] and paper.tag == "canet_dcm_paper"
    assert parse_arm("dpcn[nodcm]", "dpcn").overrides == ["model.dcm=none"]
    assert parse_arm("pfenet+dcm[placement=decoder]", "pfenet").tag == "pfenet_dcm_decoder"
    assert parse_arm("canet+dcm[input=reduced,support=clean]", "canet").tag == "canet_dcm_redin-clean"
    assert parse_arm("pfenet+dcm[fusion=paper]", "pfenet").tag == "pfenet_dcm_replace"  # the paper's form, by name
    b = parse_arm("baseline[support_branch_weight=1]", "dpcn")
    assert b.overrides == ["model.flags.support_branch_weight=1"] and b.tag == "baseline_sb1"
    c = parse_arm("pfenet+dcm[variants=vh,kernel_size=3,weight_decay=1e-5]", "pfenet")
    assert c.overrides == ["model.dcm.variants=vh", "model.dcm.kernel_size=3", "model.dcm.weight_decay=1.0e-05"]
    assert c.tag == "pfenet_dcm_variants=vh-kernel_size=3-wd1e-5"
    cfg = load_config("plug_in_pfenet_synthetic", ["model.name=pfenet+dcm", *c.overrides])
    from models.registry import resolve_dcm
    spec, _ = resolve_dcm("pfenet+dcm", cfg["model"]["dcm"])
    assert (spec.variants, spec.kernel_size, spec.weight_decay, spec.fusion) == (("v", "h"), 3, 1e-5, "residual")
    for bad, host, word in (("canet+dcm[placement=decoder]", "canet", "CANet: dcm.placement='decoder' means nothing"),
                            ("dpcn[kernels=identity]", "dpcn", "DPCN: dcm.kernels='identity' means nothing for DPCN"),
                            ("baseline[input=raw]", "dpcn", "'input' is a DCM field but 'baseline' has no DCM"),
                            ("pfenet[paper]", "pfenet", "'paper' is a DCM preset but 'pfenet' has no DCM"),
                            ("pfenet+dcm[support_branch_weight=1]", "pfenet", r"nor a flag of pfenet\+dcm"),
                            ("pfenet+dcm[lr_scale=-1]", "pfenet", "dcm.lr_scale: expected a number >= 0"),
                            ("pfenet+dcm[newest]", "pfenet", "unknown variant token 'newest'"),
                            ("pfenet+dcm[nodcm]", "pfenet", "unknown preset 'nodcm'"),
                            ("canet", "pfenet", "not a pfenet arm"), ("pfenet+dcm[", "pfenet", "cannot read")):
        with pytest.raises(ValueError, match=word):
            parse_arm(bad, host)


@pytest.mark.parametrize("old, host, overrides, tag", [
    ("pfenet+dcm[residual+l1+lr0.1]", "pfenet",
     ["model.dcm.fusion=residual", "model.dcm.kernel_norm=l1", "model.dcm.lr_scale=0.1"], "pfenet_dcm_residual-l1-lr0.1"),
    ("canet+dcm[paper]", "canet", ["model.dcm.preset=paper"], "canet_dcm_paper"),
    ("canet+dcm[residual+clean+redin]", "canet",
     ["model.dcm.fusion=residual", "model.dcm.support=clean", "model.dcm.input=reduced"], "canet_dcm_residual-clean-redin"),
    ("pfenet+dcm[rawin]", "pfenet", ["model.dcm.input=raw"], "pfenet_dcm_rawin"),
    ("pfenet+dcm[pyramid]", "pfenet", ["model.dcm.placement=pyramid"], "pfenet_dcm_pyramid"),
    ("canet+dcm[residual+rawin+ident]", "canet",
     ["model.dcm.fusion=residual", "model.dcm.input=raw", "model.dcm.kernels=identity"], "canet_dcm_residual-rawin-ident"),
    ("canet+dcm[redin]", "canet", ["model.dcm.input=reduced"], "canet_dcm_redin"),
    ("dpcn[l1]", "dpcn", ["model.dcm.kernel_norm=l1"], "dpcn_l1"),
    ("baseline[sb1]", "dpcn", ["model.flags.support_branch_weight=1"], "baseline_sb1"),
    ("dpcn[residual+rawin+sb0.5]", "dpcn",
     ["model.dcm.fusion=residual", "model.dcm.input=raw", "model.flags.support_branch_weight=0.5"],
     "dpcn_residual-rawin-sb0.5"),
])
def test_deprecated_arm_tokens_warn_and_keep_their_run_folder(old, host, overrides, tag):
    from models.arms import parse_arm
    if not old.endswith("[paper]"):
        with pytest.warns(DeprecationWarning, match="'\\+'-joined variant tokens are deprecated"):
            arm = parse_arm(old, host)
    else:
        arm = parse_arm(old, host)  # [paper] is a preset of the grammar too
    assert arm.overrides == overrides and arm.tag == tag


def test_deprecated_arm_tokens_keep_their_errors():
    from models.arms import parse_arm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for bad, host, word in (("dpcn[sb1.2.3]", "dpcn", "needs a number after"),
                                ("pfenet+dcm[lr1e]", "pfenet", "needs a number after"),
                                ("pfenet[l1]", "pfenet", "no DCM"), ("pfenet+dcm[foo]", "pfenet", "unknown"),
                                ("canet+dcm[replace]", "canet", "concat"),
                                ("canet+dcm[decoder]", "canet", "CANet: dcm.placement='decoder' means nothing"),
                                ("dpcn[ident]", "dpcn", "DPCN: dcm.kernels='identity' means nothing"),
                                ("baseline[rawin]", "dpcn", "no DCM"),
                                ("pfenet+dcm[sb1]", "pfenet", r"nor a flag of pfenet\+dcm")):  # the q->s branch is DPCN's
            with pytest.raises(ValueError, match=word):
                parse_arm(bad, host)


def test_plug_in_seeds_and_intervals_tiny(tmp_path):
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "benchmarks/plug_in.py"), "--host", "pfenet", "--out", str(tmp_path),
           "--no-progress", "--seeds", "2", "--arms", "pfenet", "pfenet+dcm[fusion=residual,kernel_norm=l1]",
           "--backbone-weights", "random"]
    for o in ("data.args={image_size: 32, num_images: 120}", "data.train_episodes=8", "data.num_workers=0",
              "train.epochs=1", "train.batch_size=4", "train.val_episodes=4", "eval.episodes=8",
              "model.flags.reduce_dim=8", "train.cache_backbone=true"):
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for w in ("seeds 321,322", "paired difference", "pfenet+dcm[fusion=residual,kernel_norm=l1] - pfenet", "per-seed mIoU",
              "95 % Student-t interval"):
        assert w in p.stdout, p.stdout
    table_file = next((tmp_path / "plug_in_pfenet").glob("table6_pfenet_val_" + "[0-9a-f]" * 8 + ".json"))  # keyed by the arm list
    res = json.loads(table_file.read_text())
    assert res["seeds"] == [321, 322] and res["folds"] == [0]
    arm = res["results"]["pfenet+dcm[fusion=residual,kernel_norm=l1]"]
    assert set(arm["miou"]["0"]) == {"321", "322"}
    d = res["summary"]["differences"]["pfenet+dcm[fusion=residual,kernel_norm=l1] - pfenet"]["miou"]
    assert d["ci95"] is not None and d["df"] == 1
    ms = [res["results"][a]["miou"]["0"][s] for a in ("pfenet", "pfenet+dcm[fusion=residual,kernel_norm=l1]") for s in ("321", "322")]
    assert math.isclose(d["mean"], ((ms[2] - ms[0]) + (ms[3] - ms[1])) / 2, abs_tol=1e-9)
    # the seed x test-image interval from the stored per-episode results, the decision by the wider one
    diff = res["summary"]["differences"]["pfenet+dcm[fusion=residual,kernel_norm=l1] - pfenet"]
    boot = diff["bootstrap"]
    assert math.isclose(boot["mean"], d["mean"], abs_tol=1e-6) and boot["ci95"][0] <= boot["ci95"][1]
    widths = [ci[1] - ci[0] for ci in (d["ci95"], boot["ci95"])]
    assert diff["decide"][1] - diff["decide"][0] == max(widths)
    ep = json.loads((tmp_path / "plug_in_pfenet" / res["episodes_file"]).read_text())
    n = len(ep["episodes"]["0"]["class"])
    assert n == 8 and len(ep["episode_iu"]["pfenet"]["0"]["321"]["inter"]) == n
    classes = res["summary"]["classes"]["0"]
    assert classes and all({"images", "episodes", "iou", "difference", "few_images"} <= set(c) for c in classes.values())
    assert sum(c["episodes"] for c in classes.values()) == n
    assert res["label"] == "exploratory" and "Per-class IoU" in table_file.with_suffix(".md").read_text()
    cfg = (tmp_path / "plug_in_pfenet" / "pfenet_dcm_residual-l1_f0_seed322" / "config.yaml").read_text()
    assert "dcm: {fusion: residual, kernel_norm: l1}" in cfg and "seed: 322" in cfg
    # resume reuses every run and writes the same table
    p2 = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert p2.returncode == 0 and p2.stdout.count("reusing") == 4, p2.stdout[-2000:]
    res2 = json.loads(table_file.read_text())
    assert res2["results"] == res["results"]
    # --report-only trains nothing: a run without results is listed as missing and left out
    (tmp_path / "plug_in_pfenet" / "pfenet_f0_seed322" / "results_val.json").unlink()
    p3 = subprocess.run(cmd + ["--report-only", "--set", "run.threads=3"], cwd=ROOT, capture_output=True, text=True,
                        timeout=400, env=env)
    assert p3.returncode == 0 and "missing (no results_val.json): pfenet_f0_seed322" in p3.stdout, p3.stdout[-2000:]
    assert "=== " not in p3.stdout and not (tmp_path / "plug_in_pfenet" / "pfenet_f0_seed322" / "results_val.json").exists()
    res3 = json.loads(table_file.read_text())
    assert set(res3["results"]["pfenet"]["miou"]["0"]) == {"321"} and res3["missing_runs"] == ["pfenet_f0_seed322"]
    assert res3["device"] == "cpu (3 threads)"  # the runs' run.threads, not the reporting process's


def test_checkpoint_of_an_older_config_loads_with_todays_defaults(tmp_path):
    """A checkpoint whose saved config lacks keys added since (here the harness's) still loads, overrides too."""
    import copy as _copy
    from benchmarks.engine import build_model_from_config, load_checkpoint_model
    cfg = load_config("synthetic", ["model.backbone_weights=random", "model.flags={reduce_dim: 8, decoder_dim: 8}"])
    model = build_model_from_config(cfg)
    old = _copy.deepcopy(cfg)
    for sec, key in (("train", "cache_backbone"), ("train", "cache_backbone_dir"), ("eval", "split"), ("data", "augment")):
        del old[sec][key]
    torch.save({"model": model.state_dict(), "config": old}, tmp_path / "old.pth")
    m, c = load_checkpoint_model(tmp_path / "old.pth", overrides=["eval.episodes=3"])
    assert c["eval"]["split"] == "val" and c["train"]["cache_backbone"] is False and c["eval"]["episodes"] == 3
    bad = _copy.deepcopy(cfg)
    bad["train"]["from_the_future"] = 1
    torch.save({"model": model.state_dict(), "config": bad}, tmp_path / "new.pth")
    with pytest.raises(ValueError, match="new.pth"):
        load_checkpoint_model(tmp_path / "new.pth")


@pytest.mark.parametrize("name, old", [("pfenet+dcm", {"fusion": "paper"}),
                                       ("canet+dcm", {"fusion": "paper", "input": "reduced"})])
def test_config_saved_before_the_fusion_default_changed_loads_in_its_old_form(tmp_path, name, old):
    """A config saved before the model spec (no model.config_version) that does not name the flags whose
    default changed is read with the old values (PFENet+DCM: the fusion; CANet+DCM: the fusion and the
    DCM's input)."""
    from benchmarks.engine import build_model_from_config, load_checkpoint_model
    from models.dcm_spec import preset
    host = name.split("+")[0]
    cfg = load_config(f"plug_in_{host}_synthetic", ["model.backbone_weights=random", f"model.name={name}",
                                                    "model.flags.reduce_dim=8"])
    assert cfg["model"]["dcm"] is None and cfg["model"]["config_version"] == 2  # the model's default, today's
    torch.manual_seed(0)
    model = build_model_from_config({**cfg, "model": {**cfg["model"], "dcm": old}}).eval()
    saved = copy.deepcopy(cfg)  # as saved by the version before each default changed
    del saved["model"]["dcm"], saved["model"]["config_version"]
    torch.save({"model": model.state_dict(), "config": saved}, tmp_path / "old.pth")
    loaded, c = load_checkpoint_model(tmp_path / "old.pth")
    assert loaded.dcm_spec == preset(host, **old) and c["model"]["dcm"] == old
    torch.manual_seed(1)
    q, s, m = torch.randn(1, 3, 40, 40), torch.randn(1, 1, 3, 40, 40), (torch.rand(1, 1, 40, 40) > 0.5).float()
    torch.testing.assert_close(loaded(q, s, m)["logits"], model(q, s, m)["logits"], rtol=0, atol=0)
    # with today's config (the residual default) the old weights do not fit: an error, not a silent load
    with pytest.raises(ValueError, match="old.pth"):
        load_checkpoint_model(tmp_path / "old.pth", cfg=cfg)


def test_plug_in_refuses_to_reuse_a_run_of_another_network(tmp_path):
    """A run folder whose config.yaml predates the residual default is not reused for the default arm."""
    import yaml
    from benchmarks.engine.config import save_config
    from benchmarks.plug_in import check_run_dir
    from models.arms import parse_arm
    cfg = load_config("plug_in_pfenet_synthetic", ["model.name=pfenet+dcm"])
    run_dir = tmp_path / "pfenet_dcm_f0_seed0"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    check_run_dir(cfg, run_dir)  # the same network: reused
    old = yaml.safe_load((run_dir / "config.yaml").read_text())
    del old["model"]["dcm"], old["model"]["config_version"]  # a config of the release before the model spec
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ValueError, match=r"pfenet_dcm_f0_seed0.*dcm.fusion: run 'paper', asked 'residual'"):
        check_run_dir(cfg, run_dir)
    check_run_dir(load_config("plug_in_pfenet_synthetic", ["model.name=pfenet+dcm", "model.dcm.fusion=paper"]), run_dir)
    # a CANet+DCM run of the reduced-input era (no dcm_input in its config) is not the raw-input default
    canet = load_config("plug_in_canet_synthetic", ["model.name=canet+dcm"])
    era = tmp_path / "canet_dcm_f0_seed0"
    era.mkdir()
    save_config(canet, era / "config.yaml")
    check_run_dir(canet, era)
    saved = yaml.safe_load((era / "config.yaml").read_text())
    del saved["model"]["dcm"], saved["model"]["config_version"]
    saved["model"]["flags"]["dcm_fusion"] = "residual"
    (era / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=r"canet_dcm_f0_seed0.*dcm.input: run 'reduced', asked 'raw'"):
        check_run_dir(canet, era)
    check_run_dir(load_config("plug_in_canet_synthetic", ["model.name=canet+dcm"] + parse_arm(
        "canet+dcm[input=reduced]", "canet").overrides), era)
    # the deprecated dcm_kwargs spelling and fields left at their defaults describe the same network
    old["model"]["flags"]["dcm_kwargs"] = {"kernel_norm": None}
    old["model"]["flags"]["dcm_fusion"] = "residual"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    check_run_dir(load_config("plug_in_pfenet_synthetic", ["model.name=pfenet+dcm", "model.dcm.kernel_norm=null"]),
                  run_dir)
    (run_dir / "config.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="config.yaml"):
        check_run_dir(cfg, run_dir)
