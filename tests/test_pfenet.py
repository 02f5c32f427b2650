"""PFENet and PFENet + DCM (docs/MODELS_HOSTS.md#pfenet, #pfenet-dcm): shapes, losses, gradients,
parameter counts, the prior.

CPU only, random backbones, 65x65 inputs, small ``reduce_dim`` except where the paper's numbers are
checked (``reduce_dim=256``).
"""
import pytest
import torch
import torch.nn.functional as F

from dcm import DynamicConvModule, EmptyForegroundWarning
from _hostnets import SIZE, episode, head_names
from models.pfenet import PFENet, resolve_bins

R = 16  # reduce_dim for the fast tests


def make(backbone, **kw):
    torch.manual_seed(0)
    return PFENet(backbone=backbone, reduce_dim=kw.pop("reduce_dim", R), **kw)


# ---------------------------------------------------------------- parameter counts (docs/MODELS_HOSTS.md#pfenet)
def pfenet_head_count(r, f, n_bins):
    """The head of PFENet from the layer shapes in docs/MODELS_HOSTS.md#pfenet (convs without bias except the
    final 1x1 classifiers r -> 2)."""
    down = 2 * f * r  # down_query + down_supp: 1x1 f -> r
    init_merge = n_bins * (2 * r + 1) * r  # 1x1 (2r+1) -> r
    alpha = (n_bins - 1) * (2 * r) * r  # 1x1 2r -> r
    beta = n_bins * 2 * 9 * r * r  # two 3x3 r -> r
    classifier = 9 * r * r + (2 * r + 2)  # 3x3 r -> r, 1x1 r -> 2 with bias
    inner = n_bins * classifier
    res1 = n_bins * r * r
    res2 = 2 * 9 * r * r
    return {
        "down_query": down // 2, "down_supp": down // 2, "init_merge": init_merge, "alpha_conv": alpha,
        "beta_conv": beta, "inner_cls": inner, "res1": res1, "res2": res2, "cls": classifier,
    }


def dcm_count(r, n_generators, kgen=3):
    """Each kernel generator: two Conv1d(r, r, kgen) with bias (docs/CONVENTIONS.md#kernel-generator)."""
    return n_generators * 2 * (r * r * kgen + r)


def per_module(model):
    out = {}
    for n, p in model.named_parameters():
        if not n.startswith("backbone."):
            out[n.split(".")[0]] = out.get(n.split(".")[0], 0) + p.numel()
    return out


@pytest.mark.parametrize("backbone,f", [("resnet50", 1536), ("vgg16_bn", 768)])
def test_parameter_count_matches_spec(resnet, backbone, f):
    m = PFENet(resnet if backbone == "resnet50" else backbone, backbone_weights=None if backbone == "resnet50" else "random", reduce_dim=256)
    expected = pfenet_head_count(256, f, 4)
    assert per_module(m) == expected
    total = sum(p.numel() for p in m.head_parameters())
    assert total == sum(expected.values())
    if backbone == "resnet50":
        assert total == 10_817_034  # documented in docs/MODELS_HOSTS.md
    # every head parameter trains, no backbone parameter does
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.head_parameters()}
    assert not any(p.requires_grad for p in m.backbone.parameters())
    # head convs: bias only on the final 1x1 classifiers (docs/MODELS_HOSTS.md#pfenet)
    biased = {n for n, p in m.named_parameters() if n.endswith(".bias") and not n.startswith("backbone.")}
    assert biased == {"cls.3.bias"} | {f"inner_cls.{i}.3.bias" for i in range(4)}


def test_parameter_count_small_reduce_dim_and_fractional_bins(resnet):
    m = make(resnet, reduce_dim=R, ppm_scales=[1.0, 0.5, 0.25])
    assert per_module(m) == pfenet_head_count(R, 1536, 3)


@pytest.mark.parametrize("dcm_input", ["raw", "reduced"])
@pytest.mark.parametrize("fusion", ["residual", "paper"])
@pytest.mark.parametrize("fields,n_gen,n_var", [({}, 3, 3), ({"variants": ("v", "h")}, 2, 2), ({"kernel_size": 3}, 3, 3)])
def test_dcm_adds_exactly_dcm_and_fusion_conv(resnet, fields, n_gen, n_var, fusion, dcm_input):
    r = 256
    c = 1536 if dcm_input == "raw" else r  # the DCM's channels: ResNet-50's [layer3, layer2], or r
    base = PFENet(resnet, reduce_dim=r)
    plus = PFENet(resnet, reduce_dim=r, dcm={**fields, **({} if fusion == "residual" else {"fusion": fusion}),
                                             **({} if dcm_input == "reduced" else {"input": dcm_input})})
    assert plus.dcm_spec.fusion == fusion and plus.dcm_spec.input == dcm_input  # residual, reduced: the default
    pb, pp = per_module(base), per_module(plus)
    assert set(pp) - set(pb) == {"dcm", "dcm_fuse"}
    assert {k: pp[k] for k in pb} == pb  # every host module unchanged
    assert pp["dcm"] == dcm_count(c, n_gen) == sum(p.numel() for p in DynamicConvModule(c, **fields).parameters())
    gate = r if fusion == "residual" else 0  # the per-channel γ
    assert pp["dcm_fuse"] == (r + n_var * c) * r + gate  # 1x1 r + n_variants·c -> r, no bias
    if not fields:  # documented in the model docstrings and docs/MODELS_HOSTS.md
        want = 1_181_184 + 262_144 if dcm_input == "reduced" else 42_476_544 + 1_245_184
        assert sum(pp.values()) - sum(pb.values()) == want + gate


# ---------------------------------------------------------------- train / eval matrix
def seeded(m, *args, seed=0):
    """Train-mode forward with fixed dropout masks: a deterministic function of the parameters."""
    torch.manual_seed(seed)
    return m(*args)


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("use_dcm", [False, True])
def test_train_step(resnet, use_dcm, shot):
    m = make(resnet, dcm="default" if use_dcm else None).train()
    q, s, sm, qm = episode(B=1, K=shot, seed=shot)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=3e-4)
    out = seeded(m, q, s, sm, qm)
    assert out["logits"].shape == (1, 2, SIZE, SIZE)
    assert out["prior_mask"].shape == (1, 1, 9, 9)
    assert [tuple(a.shape) for a in out["aux_logits"]] == [(1, 2, b, b) for b in (60, 30, 15, 8)]
    for k in ("loss", "main_loss", "aux_loss"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    torch.testing.assert_close(out["loss"], out["main_loss"] + out["aux_loss"])  # aux_weight 1
    out["loss"].backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == head_names(m)  # exactly the head, never the frozen backbone
    assert all(torch.isfinite(p.grad).all() for p in m.head_parameters())
    if use_dcm:  # the zero-initialised gate of the default residual fusion learns first ...
        assert m.dcm_fuse.gamma.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in m.backbone.parameters())

    # optimiser steps on this one episode lower its loss (same dropout masks every time)
    losses = [out["loss"].item()]
    opt.step()
    for _ in range(2):
        opt.zero_grad()
        loss = seeded(m, q, s, sm, qm)["loss"]
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses
    if use_dcm:  # ... and once it is open the DCM itself receives gradient (it is in the graph)
        assert any(p.grad.abs().sum() > 0 for p in m.dcm.parameters())
    assert all(p.grad is None for p in m.backbone.parameters())


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("use_dcm", [False, True])
def test_eval_forward(resnet, use_dcm, shot):
    m = make(resnet, dcm="default" if use_dcm else None).eval()
    B = 2 if shot == 1 else 1
    q, s, sm, qm = episode(B=B, K=shot, seed=10 + shot)
    with torch.no_grad():
        a = m(q, s, sm, qm)
        c = m(q, s, sm)
    assert a["logits"].shape == (B, 2, SIZE, SIZE)
    assert torch.equal(a["logits"], c["logits"])  # deterministic in eval mode
    assert torch.equal(a["loss"], a["main_loss"])  # eval: the main loss only
    assert torch.isfinite(a["aux_loss"])
    assert "loss" not in c and "main_loss" not in c
    p = a["prior_mask"]
    assert p.shape == (B, 1, 9, 9) and p.min() >= 0 and p.max() <= 1
    assert torch.isfinite(a["logits"]).all()


def test_duplicated_shots_equal_one_shot(resnet):
    """Prototypes and priors are averaged over shots: K copies of one shot = that shot."""
    m = make(resnet).eval()
    q, s, sm, _ = episode(B=1, K=1, seed=3)
    with torch.no_grad():
        one = m(q, s, sm)
        five = m(q, s.expand(-1, 5, -1, -1, -1), sm.expand(-1, 5, -1, -1))
    torch.testing.assert_close(five["logits"], one["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(five["prior_mask"], one["prior_mask"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the prior, literally (docs/MODELS_HOSTS.md#pfenet-prior)
def literal_prior(backbone, q_img, s_imgs, s_masks):
    """docs/MODELS_HOSTS.md#pfenet-prior written out with loops, float64 (eps 1e-7 as PFENet)."""
    eps = 1e-7
    B, K = s_imgs.shape[:2]
    with torch.no_grad():
        _, q3 = backbone.forward_mid(q_img)
        q4 = backbone.forward_high(q3).double()
    Hq, Wq = q4.shape[-2:]
    priors = torch.zeros(B, K, Hq, Wq, dtype=torch.float64)
    for k in range(K):
        with torch.no_grad():
            _, s3 = backbone.forward_mid(s_imgs[:, k])
            fg = (s_masks[:, k : k + 1] == 1).float()
            m3 = F.interpolate(fg, size=s3.shape[-2:], mode="bilinear", align_corners=True)
            s4 = backbone.forward_high(s3 * m3)
            m4 = F.interpolate(fg, size=s4.shape[-2:], mode="bilinear", align_corners=True)
            s4 = (s4 * m4).double()
        Hs, Ws = s4.shape[-2:]
        for b in range(B):
            sim = torch.empty(Hq, Wq, dtype=torch.float64)
            for i in range(Hq):
                for j in range(Wq):
                    qv = q4[b, :, i, j]
                    best = None
                    for u in range(Hs):
                        for v in range(Ws):
                            sv = s4[b, :, u, v]
                            c = (qv @ sv) / (qv.norm() * sv.norm() + eps)
                            best = c if best is None else torch.maximum(best, c)
                    sim[i, j] = best
            priors[b, k] = (sim - sim.min()) / (sim.max() - sim.min() + eps)
    return priors.mean(1, keepdim=True)


@pytest.mark.parametrize("shot", [1, 3])
def test_prior_equals_literal_loop(resnet, shot):
    m = make(resnet).eval()
    B = 2 if shot == 1 else 1
    q, s, sm, _ = episode(B=B, K=shot, size=33, seed=20 + shot)  # 33 -> 5x5 features
    with torch.no_grad():
        got = m(q, s, sm)["prior_mask"]
    want = literal_prior(resnet, q, s, sm)
    assert got.shape == want.shape == (B, 1, 5, 5)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- bins, other backbones, edges
def test_resolve_bins_rule():
    assert resolve_bins([60, 30, 15, 8], (60, 60)) == [(60, 60), (30, 30), (15, 15), (8, 8)]
    assert resolve_bins([1.0, 0.5, 0.25, 0.125], (81, 81)) == [(81, 81), (40, 40), (20, 20), (10, 10)]
    assert resolve_bins([1, 0.125], (5, 7)) == [(5, 7), (1, 1)]  # integer 1 = whole map (PFENet), floor >= 1


def test_fractional_bins_forward(resnet):
    m = make(resnet, ppm_scales=[1.0, 0.5, 0.25, 0.125]).eval()
    q, s, sm, _ = episode(B=1, K=1)
    with torch.no_grad():
        out = m(q, s, sm)
    assert [tuple(a.shape[-2:]) for a in out["aux_logits"]] == [(9, 9), (4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("name,size", [("vgg16_bn", (1, 1, 5, 5)), ("efficientnet_lite0", (1, 1, 9, 9))])
def test_other_backbones(name, size):
    m = PFENet(name, backbone_weights="random", reduce_dim=R, dcm="default", ppm_scales=[1.0, 0.5]).train()
    q, s, sm, qm = episode(B=1, K=2)
    out = m(q, s, sm, qm)
    assert out["logits"].shape == (1, 2, SIZE, SIZE) and out["prior_mask"].shape == size
    out["loss"].backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == head_names(m)


def test_layer4_trainable_gets_gradient_through_prior():
    m = PFENet("resnet50", backbone_weights="random", reduce_dim=R, ppm_scales=[1.0], layer4_trainable=True).train()
    q, s, sm, qm = episode(B=1, K=1)
    out = m(q, s, sm, qm)
    assert out["prior_mask"].requires_grad
    out["loss"].backward()
    l4 = {id(p) for p in m.backbone.high_level_parameters()}
    assert any(p.grad is not None for p in m.backbone.high_level_parameters())
    assert all(p.grad is None for p in m.backbone.parameters() if id(p) not in l4)


def test_empty_support_mask_no_nan(resnet):
    m = make(resnet, dcm="default").eval()
    q, s, sm, qm = episode(B=2, K=2)
    sm[0] = 0  # sample 0: no foreground in any shot
    sm[1, 1] = 255  # sample 1: one shot all-ignore
    with pytest.warns(EmptyForegroundWarning):
        with torch.no_grad():
            out = m(q, s, sm, qm)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["loss"])


def test_all_ignore_query_mask_gives_zero_loss(resnet):
    m = make(resnet).train()
    q, s, sm, qm = episode()
    out = m(q, s, sm, torch.full_like(qm, 255))
    assert out["loss"].item() == 0.0
    out["loss"].backward()  # still connected to the graph


def test_bad_inputs(resnet):
    m = make(resnet).eval()
    q, s, sm, qm = episode(B=1, K=2)
    with pytest.raises(ValueError, match="query_img"):
        m(q[:, :2], s, sm)
    with pytest.raises(ValueError, match="support_imgs"):
        m(q, s[0], sm)
    with pytest.raises(ValueError, match="support_masks"):
        m(q, s, sm[:, :1])
    with pytest.raises(ValueError, match="support_masks"):
        m(q, s, sm * 2)  # class ids, not a binary mask
    with pytest.raises(ValueError, match="query_mask"):
        m(q, s, sm, qm[:, :10])
    with pytest.raises(ValueError, match="query_mask"):
        m(q, s, sm, qm * 3)
    with pytest.raises(ValueError, match="ppm_scales"):
        make(resnet, ppm_scales=[])
    with pytest.raises(ValueError, match="ppm_scales"):
        make(resnet, ppm_scales=[60, -1])
    with pytest.raises(ValueError, match="ppm_scales"):
        make(resnet, ppm_scales=[7.5])
    with pytest.raises(ValueError, match="kernel_size"):
        make(resnet, dcm={"kernel_size": 4})
    with pytest.raises(ValueError, match="shot"):
        make(resnet, shot=0)
    with pytest.raises(ValueError, match="unknown backbone"):
        PFENet("resnet18", backbone_weights="random")
    with pytest.raises(TypeError, match="backbone"):
        PFENet(42)
