"""DPCN (models/dpcn.py) and its decoder (models/heads.py): shapes, losses, gradients, ablations.

CPU only, random backbone weights, 65×65 inputs (9×9 features at stride 8), small widths where the
model allows it (``reduce_dim``/``decoder_dim``); the parameter-count tests use the paper's widths.
Most tests use EfficientNet-Lite0 (the cheapest backbone); ``test_every_backbone`` runs each real
backbone once and the parameter-count tests build ResNet-50 / VGG-16-BN / Lite0 models.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import dcm.functional as DF
from models.backbones import build_backbone
from models.dcm_spec import DCMSpec
from models.dpcn import ABLATIONS, DPCN, PAPER_SAM_WINDOWS, dpcn_flags
from models.heads import ASPP, DPCNDecoder
from models.registry import build_model

SIZE = 65
FEAT = 9  # 65 -> 9 at output stride 8
SMALL = {"reduce_dim": 16, "decoder_dim": 16}
NO_DROPOUT = {"reduce_dropout": 0.0, "decoder_dropout": 0.0, "cls_dropout": 0.0}


def episode(B=2, K=1, size=SIZE, seed=0):
    """Random images, rectangular foregrounds with a 255 border, labels {0, 1, 255}."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 3, size, size, generator=g)
    s = torch.randn(B, K, 3, size, size, generator=g)

    def mask(*lead):
        m = torch.zeros(*lead, size, size, dtype=torch.long)
        flat = m.reshape(-1, size, size)
        for i in range(flat.shape[0]):
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
            flat[i, y0 : y0 + h, x0 : x0 + w] = 1
            flat[i, y0 + h : y0 + h + 2, x0 : x0 + w] = 255  # a boundary strip
        return m

    return q, s, mask(B, K), mask(B)


def model(name="dpcn", backbone="efficientnet_lite0", **flags):
    torch.manual_seed(0)
    return build_model(name, backbone=backbone, backbone_weights="random", **{**SMALL, **flags})


def copy_shared(dst, src):
    """Load every parameter/buffer of ``src`` whose name and shape exist in ``dst``."""
    dst_sd = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items() if k in dst_sd and dst_sd[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return set(dst_sd) - set(shared)


# ---------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("name", ["dpcn", "baseline"])
def test_forward_shapes_and_losses(name, K, training):
    m = model(name).train(training)
    q, s, sm, qm = episode(B=2, K=K)
    out = m(q, s, sm, qm)
    assert out["logits"].shape == (2, 2, SIZE, SIZE)
    assert torch.isfinite(out["logits"]).all()
    for key in ("loss", "main_loss"):
        assert out[key].dim() == 0 and torch.isfinite(out[key])
    if name == "dpcn":
        assert out["activation_maps"].shape == (2, 3, FEAT, FEAT)
        assert out["initial_pseudo_mask"].shape == (2, 1, FEAT, FEAT)
        assert out["refined_pseudo_mask"].shape == (2, 1, FEAT, FEAT)
        assert 0 <= out["activation_maps"].min() and out["activation_maps"].max() <= 1
        assert 0 < out["refined_pseudo_mask"].min() and out["refined_pseudo_mask"].max() < 1
    else:
        assert out["activation_maps"] is None and out["initial_pseudo_mask"] is None and out["refined_pseudo_mask"] is None
    if training:
        assert torch.isfinite(out["support_loss"])
        assert out["support_logits"].shape == (2, K, 2, SIZE, SIZE)
        torch.testing.assert_close(out["loss"], out["main_loss"] + 1.0 * out["support_loss"])
    else:
        assert "support_loss" not in out and "support_logits" not in out
        assert out["loss"] is out["main_loss"]
    # without a query mask: no loss at all
    out2 = m(q, s, sm)
    assert "loss" not in out2 and out2["logits"].shape == (2, 2, SIZE, SIZE)


def test_support_branch_weight_and_3d_support_mask():
    m = model("dpcn", support_branch_weight=0.25).train()
    q, s, sm, qm = episode(B=1, K=1)
    out = m(q, s, sm[:, 0], qm)  # [B, H, W] support mask for K = 1
    torch.testing.assert_close(out["loss"], out["main_loss"] + 0.25 * out["support_loss"])
    m0 = model("dpcn", support_branch_weight=0.0).train()
    out0 = m0(q, s, sm, qm)
    assert "support_loss" not in out0 and out0["loss"] is out0["main_loss"]


def test_eval_forward_is_deterministic():
    m = model("dpcn").eval()
    q, s, sm, qm = episode(B=2, K=2)
    a, b = m(q, s, sm, qm), m(q, s, sm, qm)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["loss"], b["loss"])
    assert torch.equal(a["activation_maps"], b["activation_maps"])


@pytest.mark.filterwarnings("ignore::dcm.EmptyForegroundWarning")  # early predicted query masks are empty
@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("name", ["dpcn", "baseline"])
def test_overfits_one_episode(name, K):
    """The training loss (main + support branch) goes down on one fixed episode (dropout off so the
    run is deterministic)."""
    m = model(name, **NO_DROPOUT).train()
    q, s, sm, qm = episode(B=1, K=K, seed=3)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = m(q, s, sm, qm)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    with torch.no_grad():
        losses.append(m(q, s, sm, qm)["loss"].item())
    assert losses[-1] < 0.98 * losses[0], losses


# ---------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("layer4", [False, True], ids=["frozen", "layer4"])
@pytest.mark.parametrize("flags", [{}, {"sam_mask_before_layer4": True}, ABLATIONS["baseline"]], ids=["dpcn", "pfenet_mask", "baseline"])
def test_gradients_reach_exactly_the_trainable_parameters(flags, layer4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # baseline + layer4: "layer4 is never run"
        m = model("dpcn", layer4_trainable=layer4, **flags).train()
    q, s, sm, qm = episode(B=1, K=2)
    m(q, s, sm, qm)["loss"].backward()
    bb_names = {n for n, _ in m.named_parameters() if n.startswith("backbone.")}
    l4_ids = {id(p) for p in m.backbone.high_level_parameters()}
    uses_layer4 = layer4 and m.use_prior
    for n, p in m.named_parameters():
        if not n.startswith("backbone."):
            assert p.requires_grad and p.grad is not None, n
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        elif id(p) in l4_ids and uses_layer4:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    if uses_layer4:
        assert sum(float(p.grad.abs().sum()) for p in m.backbone.high_level_parameters()) > 0
    assert bb_names and all(not p.requires_grad for p in m.backbone.mid_level_parameters())
    # the optimiser groups: head = every non-backbone parameter; trainable adds layer4 when unfrozen
    head = {id(p) for n, p in m.named_parameters() if not n.startswith("backbone.")}
    assert {id(p) for p in m.head_parameters()} == head
    assert {id(p) for p in m.trainable_parameters()} == head | (l4_ids if layer4 else set())


def test_baseline_with_trainable_layer4_warns():
    with pytest.warns(UserWarning, match="layer4 is never run"):
        model("baseline", layer4_trainable=True)


def test_param_groups():
    m = model("dpcn", layer4_trainable=True)
    groups = m.param_groups(lr=0.005)
    assert [g["name"] for g in groups] == ["head"] and groups[0]["lr"] == 0.005
    if not hasattr(m.backbone, "layer4_parameters"):
        pytest.skip("backbone has no layer4_parameters() (FewShotSegmenter.param_groups(include_layer4=True) needs it)")
    groups = m.param_groups(lr=0.005, layer4_lr_scale=0.1, include_layer4=True)
    assert [g["name"] for g in groups] == ["head", "layer4"] and groups[1]["lr"] == pytest.approx(0.0005)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.backbone.high_level_parameters()}


def test_layer4_unfrozen_later_receives_gradients():
    """The trainer unfreezes layer4 on schedule (docs/CONVENTIONS.md#layer4-fine-tuning): no rebuild needed."""
    m = model("dpcn").train()
    q, s, sm, qm = episode(B=1, K=1)
    m(q, s, sm, qm)["loss"].backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    m.zero_grad(set_to_none=True)
    m.backbone.set_layer4_trainable(True)
    m(q, s, sm, qm)["loss"].backward()
    assert all(p.grad is not None for p in m.backbone.high_level_parameters())
    assert all(p.grad is None for p in m.backbone.mid_level_parameters())


def test_train_mode_keeps_backbone_bn_frozen():
    m = model("dpcn", layer4_trainable=True).train()
    bns = [x for x in m.backbone.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(b.training for b in bns)
    before = [b.running_mean.clone() for b in bns]
    q, s, sm, qm = episode(B=1, K=1)
    m(q, s, sm, qm)["loss"].backward()
    assert all(torch.equal(a, b.running_mean) for a, b in zip(before, bns))


# ---------------------------------------------------------------------------------------- parameter counts


def expected_head_params(mid_in, C=256, D=256, *, sam=True, ffm=True, dcm=True, n_windows=3, variants=("v", "h", "s"),
                         square="serial", ffm_k=3, kgen_k=3, shared=False, prior=None, n_rates=3):
    """Head parameter count from the layer shapes of docs/CONVENTIONS.md#decoder (independent of the model code)."""
    prior = (sam or ffm) if prior is None else prior
    n_windows = n_windows if sam else 1
    reducers = (1 if shared else 2) * mid_in * C  # 1×1, no bias
    ffm_p = (C * ffm_k * ffm_k + 1) if ffm else 0  # conv C->1 + bias
    if dcm:
        gens = set(variants) | ({"v", "h"} if ("s" in variants and square == "serial") else set())
        dcm_p = len(gens) * 2 * (C * C * kgen_k + C)  # two Conv1d(C, C, k) with bias per generator
        q_ch = len(variants) * C
    else:
        dcm_p, q_ch = 0, C
    x_out = q_ch + C + ((n_windows + 1) if prior else 0)
    f_conv = x_out * D
    aspp = D * D + D * D + n_rates * 9 * D * D + (2 + n_rates) * D * D  # pool 1×1, 1×1, 3×3 ×3, projection
    res = 2 * 9 * D * D
    f_cls = 9 * D * D + 2 * D + 2
    return reducers + ffm_p + dcm_p + f_conv + aspp + res + f_cls


def n_head(m):
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith("backbone."))


@pytest.mark.parametrize(
    "flags, kw",
    [
        ({}, {}),
        (ABLATIONS["baseline"], dict(sam=False, ffm=False, dcm=False)),
        (ABLATIONS["table3_sam_ffm"], dict(dcm=False)),
        (ABLATIONS["table3_ffm_dcm"], dict(sam=False)),
        (ABLATIONS["table3_sam_dcm"], dict(ffm=False)),
        (ABLATIONS["table5_5x5"], dict(variants=("s",))),
        (ABLATIONS["table5_1x5"], dict(variants=("h",))),
        (ABLATIONS["table5_1x5_5x1"], dict(variants=("v", "h"))),
        ({"dcm": DCMSpec(variants=("s",), square_source="parallel")}, dict(variants=("s",), square="parallel")),
        (ABLATIONS["tableA1_parallel"], dict(square="parallel")),
        (ABLATIONS["table4_k9"], {}),
        (ABLATIONS["coco_prior"], dict(n_windows=1)),
        ({"ffm_kernel_size": 1, "dcm": {"kgen_kernel_size": 1}, "shared_reducer": True}, dict(ffm_k=1, kgen_k=1, shared=True)),
        ({"use_sam": False, "use_ffm": False, "use_prior": True}, dict(sam=False, ffm=False, prior=True)),
    ],
)
def test_head_parameter_count_matches_the_layer_shapes(flags, kw):
    torch.manual_seed(0)
    m = DPCN("resnet50", backbone_weights="random", **flags)  # paper widths C = D = 256
    assert n_head(m) == expected_head_params(1024 + 512, **kw)
    assert m.x_out_channels == m.decoder.conv[0].in_channels


def test_full_model_has_4C_plus_4_decoder_input():
    m = DPCN("resnet50", backbone_weights="random")
    assert m.x_out_channels == 4 * 256 + 4 == 1028
    assert m.decoder.conv[0].weight.shape == (256, 1028, 1, 1)
    assert [c[0].dilation for c in m.decoder.aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18)]
    assert m.decoder.cls[-1].weight.shape == (2, 256, 1, 1) and m.decoder.cls[2].p == 0.1
    assert m.down_query[0].weight.shape == (256, 1536, 1, 1) and m.down_query[2].p == 0.5
    assert m.down_supp is not m.down_query


@pytest.mark.parametrize("bb, mid_in", [("vgg16_bn", 512 + 256), ("efficientnet_lite0", 112 + 40)])
def test_head_parameter_count_other_backbones(bb, mid_in):
    m = DPCN(bb, backbone_weights="random")
    assert n_head(m) == expected_head_params(mid_in)


@pytest.mark.parametrize(
    "ablation, removed_prefixes, conv_in_delta",
    [
        ("table3_sam_ffm", ("dcm.",), 2 * 16),  # three C-maps -> x̃_q: 3C -> C
        ("table3_sam_dcm", ("ffm.",), 0),
        ("table3_ffm_dcm", (), 2),  # 3 activation maps -> 1 prior map
        ("baseline", ("ffm.", "dcm."), 2 * 16 + 4),
        ("table5_1x5", ("dcm.generators.v.", "dcm.generators.s."), 2 * 16),
        ("table5_5x5", (), 2 * 16),  # serial: v/h generators still feed the square one
        ("tableA1_parallel", (), 0),
        ("table4_k3", (), 0),
    ],
)
def test_each_ablation_changes_only_its_module(ablation, removed_prefixes, conv_in_delta):
    full, abl = model("dpcn"), model("dpcn", **ABLATIONS[ablation])
    fs, as_ = full.state_dict(), abl.state_dict()
    removed = set(fs) - set(as_)
    assert set(as_) <= set(fs)
    assert removed == {k for k in fs if k.startswith(removed_prefixes)} if removed_prefixes else not removed
    changed = {k for k in as_ if as_[k].shape != fs[k].shape}
    assert changed == ({"decoder.conv.0.weight"} if conv_in_delta else set())
    assert full.x_out_channels - abl.x_out_channels == conv_in_delta
    D = 16
    n_removed = sum(fs[k].numel() for k in removed)
    assert n_head(full) - n_head(abl) == n_removed + conv_in_delta * D


# ---------------------------------------------------------------------------------------- module behaviour


def _high(m, q, s, sm, before=False):
    """Reference layer4 features of the query and the (optionally pre-masked) support."""
    B, K = s.shape[:2]
    with torch.no_grad():
        q4 = m.backbone(q).layer4
        l2, l3 = m.backbone.forward_mid(s.flatten(0, 1))
        if before:
            fg = DF.prepare_mask((sm == 1).float(), l3.shape[-2:]).flatten(0, 1)[:, None]
            l3 = l3 * fg
        s4 = m.backbone.forward_high(l3)
    return q4, s4.reshape(B, K, *s4.shape[1:])


@pytest.mark.parametrize(
    "flags, windows, before",
    [
        ({}, PAPER_SAM_WINDOWS, False),
        ({"use_sam": False}, ((1, 1),), False),
        ({"sam_windows": ((1, 1),)}, ((1, 1),), False),
        ({"sam_mask_before_layer4": True}, PAPER_SAM_WINDOWS, True),
    ],
    ids=["sam", "sam_off_prior", "coco", "mask_before_layer4"],
)
def test_activation_maps_equal_the_functional_reference(flags, windows, before):
    m = model("dpcn", **flags).eval()
    q, s, sm, _ = episode(B=2, K=2)
    out = m(q, s, sm)
    q4, s4 = _high(m, q, s, sm, before)
    ref = DF.support_activation(q4, s4, (sm == 1).float(), windows)
    assert out["activation_maps"].shape == (2, len(windows), FEAT, FEAT)
    torch.testing.assert_close(out["activation_maps"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["initial_pseudo_mask"], ref.mean(1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_mask_before_layer4_changes_the_maps():
    q, s, sm, _ = episode(B=1, K=1)
    a = model("dpcn").eval()(q, s, sm)["activation_maps"]
    b = model("dpcn", sam_mask_before_layer4=True).eval()(q, s, sm)["activation_maps"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("ablation", ["table3_sam_dcm", "table3_sam_ffm", "table5_5x5", "table4_k7", "tableA1_parallel"])
def test_ablation_leaves_upstream_outputs_unchanged(ablation):
    """Same weights where names match: everything upstream of the ablated module is identical."""
    full = model("dpcn").eval()
    abl = model("dpcn", **ABLATIONS[ablation]).eval()
    copy_shared(abl, full)
    x_out = {}
    full.decoder.register_forward_pre_hook(lambda mod, args: x_out.__setitem__("full", args[0]))
    abl.decoder.register_forward_pre_hook(lambda mod, args: x_out.__setitem__("abl", args[0]))
    q, s, sm, _ = episode(B=1, K=2)
    a, b = full(q, s, sm), abl(q, s, sm)
    torch.testing.assert_close(b["activation_maps"], a["activation_maps"])
    torch.testing.assert_close(b["initial_pseudo_mask"], a["initial_pseudo_mask"])
    if ablation == "table3_sam_dcm":  # FFM off: Mʳ = M⁰
        assert torch.equal(b["refined_pseudo_mask"], b["initial_pseudo_mask"])
        assert not torch.allclose(a["refined_pseudo_mask"], a["initial_pseudo_mask"])
    else:
        torch.testing.assert_close(b["refined_pseudo_mask"], a["refined_pseudo_mask"])
    # the tail of x_out (x_p, maps, Mʳ) is upstream of DCM; the head (DCM maps / x̃_q) changes
    C = 16
    xf, xa = x_out["full"], x_out["abl"]
    torch.testing.assert_close(xa[:, -(C + 4) : -1], xf[:, -(C + 4) : -1])  # x_p and the SAM maps
    if ablation == "table3_sam_dcm":  # FFM off changes x̃_q, hence the DCM maps
        assert not torch.allclose(xa[:, : 3 * C], xf[:, : 3 * C])
    elif ablation == "table3_sam_ffm":  # DCM off: x̃_q in place of the three maps
        assert xa.shape[1] == 2 * C + 4 and not torch.allclose(xa[:, :C], xf[:, :C])
    elif ablation == "table5_5x5":  # only the square map, identical to the full model's third map
        torch.testing.assert_close(xa[:, :C], xf[:, 2 * C : 3 * C])
    else:  # kernel size / square-kernel source: other DCM maps
        assert xa.shape == xf.shape and not torch.allclose(xa[:, : 3 * C], xf[:, : 3 * C])


@pytest.mark.parametrize("S", [3, 5, 7, 9])
def test_dcm_kernel_size(S):
    m = model("dpcn", dcm=DCMSpec(kernel_size=S)).eval()
    assert m.dcm.kernel_size == S and m.dcm.variants == ("v", "h", "s")
    x_s = torch.randn(1, 1, 16, FEAT, FEAT)
    k = m.dcm.generate_kernels(x_s, torch.ones(1, 1, FEAT, FEAT))
    assert k["v"].shape == (1, 16, S, 1) and k["h"].shape == (1, 16, 1, S) and k["s"].shape == (1, 16, S, S)
    q, s, sm, _ = episode(B=1, K=1)
    assert torch.isfinite(m(q, s, sm)["logits"]).all()


def test_off_feature_none_and_use_prior():
    m = model("dpcn", dcm=None, off_feature="none")
    assert m.x_out_channels == 16 + 3 + 1
    q, s, sm, qm = episode(B=1, K=1)
    assert torch.isfinite(m.eval()(q, s, sm, qm)["loss"])
    p = model("baseline", use_prior=True)
    assert p.x_out_channels == 16 + 16 + 2
    out = p.eval()(q, s, sm)
    assert out["activation_maps"].shape == (1, 1, FEAT, FEAT)
    assert torch.equal(out["refined_pseudo_mask"], out["initial_pseudo_mask"])


def test_baseline_has_no_sam_ffm_dcm_and_never_runs_layer4(monkeypatch):
    m = model("baseline").eval()
    assert m.sam is None and m.ffm is None and m.dcm is None
    assert not any(n.startswith(("sam.", "ffm.", "dcm.")) for n, _ in m.named_parameters())
    assert m.x_out_channels == 2 * 16  # [x_q, x_p]

    def boom(*a, **k):
        raise AssertionError("layer4 must not run in the Baseline")

    monkeypatch.setattr(m.backbone, "forward_high", boom)
    q, s, sm, qm = episode(B=1, K=2)
    m.train()
    assert torch.isfinite(m(q, s, sm, qm)["loss"])


def test_duplicated_shot_gives_the_same_maps_and_prototype_masks():
    """SAM maps and FFM prototypes are averaged over shots: a duplicated shot changes neither."""
    m = model("dpcn").eval()
    q, s, sm, _ = episode(B=1, K=1)
    a = m(q, s, sm)
    b = m(q, s.repeat(1, 2, 1, 1, 1), sm.repeat(1, 2, 1, 1))
    torch.testing.assert_close(b["activation_maps"], a["activation_maps"])
    torch.testing.assert_close(b["refined_pseudo_mask"], a["refined_pseudo_mask"])


def test_empty_support_mask_gives_finite_outputs():
    import dcm

    m = model("dpcn").train()
    q, s, sm, qm = episode(B=2, K=2)
    sm = torch.zeros_like(sm)
    with pytest.warns(dcm.EmptyForegroundWarning):
        out = m(q, s, sm, qm)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["logits"]).all()


# ---------------------------------------------------------------------------------------- support branch


@pytest.mark.parametrize(
    "K, flags",
    [
        (1, {}),
        (3, {}),
        (2, {"sam_mask_before_layer4": True}),
        (2, {"support_branch_mask": "soft"}),
        (3, {"support_branch_shots": "first"}),
        (2, ABLATIONS["baseline"]),
    ],
    ids=["k1", "k3", "mask_before_layer4", "soft", "first_shot", "baseline"],
)
def test_support_branch_is_the_swapped_episode(K, flags):
    """support_loss == the main loss of the same network run on (support as query, query + predicted mask as support)."""
    m = model("dpcn", **{**NO_DROPOUT, **flags}).train()
    q, s, sm, qm = episode(B=2 if K == 3 else 1, K=K, seed=5)
    out = m(q, s, sm, qm)
    logits = out["logits"].detach()
    pred = logits.argmax(1) if m.support_branch_mask == "argmax" else logits.softmax(1)[:, 1]
    n = K if m.support_branch_shots == "all" else 1
    m.support_branch_weight = 0.0
    ref = m(s[:, :n].flatten(0, 1), q.repeat_interleave(n, 0)[:, None], pred.repeat_interleave(n, 0)[:, None], sm[:, :n].flatten(0, 1))
    torch.testing.assert_close(out["support_loss"], ref["main_loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["support_logits"].flatten(0, 1), ref["logits"], atol=1e-4, rtol=1e-4)


def test_support_branch_mask_is_detached():
    """With the soft mask, the total gradient equals main + swapped loss with a constant mask."""
    m = model("dpcn", support_branch_mask="soft", **NO_DROPOUT).train()
    q, s, sm, qm = episode(B=1, K=1, seed=7)
    out = m(q, s, sm, qm)
    params = [p for p in m.head_parameters()]
    g1 = torch.autograd.grad(out["loss"], params)
    out2 = m(q, s, sm, qm)
    m.support_branch_weight = 0.0
    soft = out2["logits"].detach().softmax(1)[:, 1]
    ref = m(s[:, 0], q[:, None], soft[:, None], sm[:, 0])
    g2 = torch.autograd.grad(out2["main_loss"] + ref["main_loss"], params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- backbones, ablations


@pytest.mark.parametrize("bb", ["resnet50", "resnet101", "resnet50_v2", "resnet101_v2", "vgg16_bn", "efficientnet_lite0"])
def test_every_backbone(bb):
    m = model("dpcn", backbone=bb, layer4_trainable=True).train()
    q, s, sm, qm = episode(B=1, K=1)
    out = m(q, s, sm, qm)
    out["loss"].backward()
    feat = 5 if bb == "vgg16_bn" else FEAT  # VGG: layer3/4 at 1/16, layer2 resized to it
    assert out["logits"].shape == (1, 2, SIZE, SIZE)
    assert out["activation_maps"].shape == (1, 3, feat, feat)
    assert all(p.grad is None for p in m.backbone.mid_level_parameters())
    assert any(p.grad is not None for p in m.backbone.high_level_parameters())


_UNIQUE_ROWS = sorted({repr(sorted(v.items())): k for k, v in sorted(ABLATIONS.items(), reverse=True)}.values())


@pytest.mark.parametrize("name", _UNIQUE_ROWS)
def test_every_ablation_builds_and_runs(name):
    """Every distinct row of ABLATIONS (rows with identical flags, e.g. the full model, run once)."""
    m = model("dpcn", **ABLATIONS[name]).eval()
    q, s, sm, qm = episode(B=1, K=1)
    out = m(q, s, sm, qm)
    assert out["logits"].shape == (1, 2, SIZE, SIZE) and torch.isfinite(out["loss"])
    for k, v in ABLATIONS[name].items():
        if k.startswith("use_"):
            assert getattr(m, k) == v
        elif k == "dcm":
            assert m.dcm_spec == v
            if v is not None:
                assert (m.dcm.kernel_size, m.dcm.variants, m.dcm.square_source) == (v.kernel_size, v.variants,
                                                                                     v.square_source)
        elif k == "sam_windows":
            assert m.sam.windows == tuple(v)


def test_ablation_table_rows():
    assert ABLATIONS["baseline"] == {"use_sam": False, "use_ffm": False, "dcm": None}
    assert ABLATIONS["table3_sam_ffm"] == {"dcm": None} == ABLATIONS["table5_none"]
    assert ABLATIONS["table3_ffm_dcm"] == {"use_sam": False}
    assert ABLATIONS["table3_sam_dcm"] == {"use_ffm": False}
    assert {ABLATIONS[f"table4_k{k}"]["dcm"].kernel_size for k in (3, 5, 7, 9)} == {3, 5, 7, 9}
    assert ABLATIONS["tableA1_parallel"] == {"dcm": DCMSpec(square_source="parallel")}
    flags = dpcn_flags()
    assert all(k in flags for row in ABLATIONS.values() for k in row)
    assert flags["dcm"] == "default" and flags["support_branch_weight"] == 1.0 and flags["ffm_kernel_size"] == 3
    assert flags["support_branch_mask"] == "argmax" and flags["off_feature"] == "query"


# ---------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    m = model("dpcn").eval()
    q, s, sm, qm = episode(B=2, K=2)
    with pytest.raises(ValueError, match="query_img"):
        m(q[:, :2], s, sm)
    with pytest.raises(ValueError, match="support_imgs"):
        m(q, s[:1], sm[:1])
    with pytest.raises(ValueError, match="support_imgs"):
        m(q, s[:, 0], sm)
    with pytest.raises(ValueError, match="support_masks"):
        m(q, s, sm[:, :1])
    with pytest.raises(ValueError, match="support_masks"):
        m(q, s, sm[..., :-1])
    with pytest.raises(ValueError, match="query_mask"):
        m(q, s, sm, qm[:, :-1])
    with pytest.raises(ValueError, match="support_masks"):
        m(q, s, sm * 3)  # class ids instead of a binary mask
    with pytest.raises(ValueError, match="query_mask"):
        m(q, s, sm, qm * 2)


@pytest.mark.parametrize(
    "flags, exc, match",
    [
        ({"dcm": {"kernel_size": 4}}, ValueError, "kernel_size"),
        ({"dcm": {"variants": ("x",)}}, ValueError, "variants"),
        ({"dcm": {"square_source": "both"}}, ValueError, "square_source"),
        ({"dcm": {"input": "raw"}}, ValueError, "DPCN: dcm.input='raw' needs dcm.fusion='residual'"),
        ({"dcm": {"gate": "fit", "fusion": "residual"}}, ValueError, "DPCN: dcm.gate='fit' means nothing for DPCN"),
        ({"dcm": "paper", "off_feature": "none"}, ValueError, "DPCN: off_feature='none'"),
        ({"support_branch_mask": "hard"}, ValueError, "support_branch_mask"),
        ({"support_branch_shots": "some"}, ValueError, "support_branch_shots"),
        ({"support_branch_weight": -1.0}, ValueError, "support_branch_weight"),
        ({"use_sam": False, "sam_windows": PAPER_SAM_WINDOWS}, ValueError, "use_sam=False"),
        ({"use_prior": False}, ValueError, "use_prior"),
        ({"sam_windows": ((2, 2),)}, ValueError, "windows"),
        ({"reduce_dim": 0}, ValueError, "reduce_dim"),
        ({"dcm": None, "off_feature": "x"}, ValueError, "off_feature"),
        ({"shot": 0}, ValueError, "shot"),
    ],
)
def test_bad_flags_raise(flags, exc, match):
    flags = {**SMALL, **flags}
    with pytest.raises(exc, match=match):
        DPCN("efficientnet_lite0", backbone_weights="random", **flags)


def test_decoder_pieces():
    d = DPCNDecoder(20, channels=8)
    assert d(torch.randn(2, 20, 9, 9)).shape == (2, 2, 9, 9)
    assert d(torch.randn(2, 20, 9, 9), size=(65, 65)).shape == (2, 2, 65, 65)
    with pytest.raises(ValueError, match="x_out"):
        d(torch.randn(2, 19, 9, 9))
    a = ASPP(8)
    assert all(m.bias is None for m in a.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
    assert a(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)


def test_backbone_instance_is_accepted():
    bb = build_backbone("efficientnet_lite0", weights="random")
    m = DPCN(bb, **SMALL)
    assert m.backbone is bb
    with pytest.raises(ValueError, match="weights"):
        DPCN(bb, backbone_weights="random", **SMALL)
