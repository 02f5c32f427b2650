"""CANet and CANet + DCM (docs/MODELS_HOSTS.md#canet, #canet-dcm): shapes, losses, gradients, parameter counts, the IOM.

CPU only, random backbones, 65x65 inputs, small ``reduce_dim`` except where the paper's numbers are
checked (``reduce_dim=256``).
"""
import pytest
import torch

from dcm import DynamicConvModule, EmptyForegroundWarning
from _hostnets import SIZE, episode, head_names
from models.canet import CANet
from models.dcm_spec import DCMSpec

R = 16


def make(backbone, **kw):
    torch.manual_seed(0)
    return CANet(backbone=backbone, reduce_dim=kw.pop("reduce_dim", R), **kw)


def per_module(model):
    out = {}
    for n, p in model.named_parameters():
        if not n.startswith("backbone."):
            out[n.split(".")[0]] = out.get(n.split(".")[0], 0) + p.numel()
    return out


# ---------------------------------------------------------------- parameter counts (docs/MODELS_HOSTS.md#canet)
def conv(cin, cout, k):
    """Parameters of a k x k convolution with bias (every CANet conv has one)."""
    return k * k * cin * cout + cout


def canet_head_count(r, f, fuse_in=None):
    return {
        "layer5": conv(f, r, 3),  # 3x3 dil-2, concat(layer2, layer3) -> r
        "layer55": conv(2 * r if fuse_in is None else fuse_in, r, 3),  # 3x3 dil-2 [e_q, z] -> r
        "residule1": conv(r + 2, r, 3) + conv(r, r, 3),
        "residule2": 2 * conv(r, r, 3),
        "residule3": 2 * conv(r, r, 3),
        "layer6_0": conv(r, r, 1),  # image pooling branch
        "layer6_1": conv(r, r, 1),
        "layer6_2": conv(r, r, 3),  # rates 6, 12, 18
        "layer6_3": conv(r, r, 3),
        "layer6_4": conv(r, r, 3),
        "layer7": conv(5 * r, r, 1),
        "layer9": conv(r, 2, 1),
    }


def test_parameter_count_matches_spec(resnet):
    m = CANet(resnet, reduce_dim=256)
    expected = canet_head_count(256, 1536)
    assert per_module(m) == expected
    total = sum(p.numel() for p in m.head_parameters())
    assert total == sum(expected.values()) == 10_494_466  # documented in docs/MODELS_HOSTS.md
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.head_parameters()}
    assert not any(p.requires_grad for p in m.backbone.parameters())
    # official init: conv weights ~ N(0, 0.01)
    w = m.layer5[0].weight
    assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4


def test_parameter_count_small_reduce_dim_vgg():
    m = CANet("vgg16_bn", backbone_weights="random", reduce_dim=R)
    assert per_module(m) == canet_head_count(R, 768)


@pytest.mark.parametrize("fields,n_gen,n_var", [({}, 3, 3), ({"variants": ("s",), "square_source": "parallel"}, 1, 1)])
def test_dcm_adds_exactly_dcm_and_wider_layer55(resnet, fields, n_gen, n_var):
    """The paper's (concatenating) form widens layer55."""
    r = 256
    base = CANet(resnet, reduce_dim=r)
    plus = CANet(resnet, reduce_dim=r, dcm=DCMSpec(**fields))
    pb, pp = per_module(base), per_module(plus)
    assert set(pp) - set(pb) == {"dcm"}
    assert pp["dcm"] == n_gen * 2 * (3 * r * r + r) == sum(p.numel() for p in DynamicConvModule(r, **fields).parameters())
    assert pp["layer55"] == conv((2 + n_var) * r, r, 3)  # input widened from 2r to (2 + n_variants)·r
    assert pp["layer55"] - pb["layer55"] == 9 * n_var * r * r
    assert {k: v for k, v in pp.items() if k not in ("dcm", "layer55")} == {k: v for k, v in pb.items() if k != "layer55"}
    if not fields:
        assert plus.layer55[0].in_channels == 1280
        assert sum(pp.values()) - sum(pb.values()) == 1_181_184 + 1_769_472


@pytest.mark.parametrize("dcm_input", ["raw", "reduced"])
def test_dcm_residual_default_adds_dcm_and_a_gated_projection(resnet, dcm_input):
    r = 256
    c = 1536 if dcm_input == "raw" else r  # the DCM's channels: ResNet-50's [layer2, layer3], or r
    base = CANet(resnet, reduce_dim=r)
    plus = CANet(resnet, reduce_dim=r, dcm={} if dcm_input == "raw" else {"input": dcm_input})
    assert plus.dcm_spec.fusion == "residual" and plus.dcm_spec.input == dcm_input  # the default: residual, raw
    pb, pp = per_module(base), per_module(plus)
    assert set(pp) - set(pb) == {"dcm", "dcm_fuse"}
    assert {k: pp[k] for k in pb} == pb  # layer55 keeps its 2r input
    assert pp["dcm"] == 3 * 2 * (3 * c * c + c)
    assert pp["dcm_fuse"] == (r + 3 * c) * r + r  # 1x1 r + 3c -> r without bias, and the per-channel γ


# ---------------------------------------------------------------- train / eval matrix
def seeded(m, *args, seed=0, **kw):
    torch.manual_seed(seed)
    return m(*args, **kw)


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("use_dcm", [False, True])
def test_train_step(resnet, use_dcm, shot):
    m = make(resnet, dcm="default" if use_dcm else None).train()
    q, s, sm, qm = episode(B=1, K=shot, seed=shot)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=3e-4)
    out = seeded(m, q, s, sm, qm)
    assert out["logits"].shape == (1, 2, SIZE, SIZE)
    assert out["history_mask"].shape == (1, 2, 9, 9) and not out["history_mask"].requires_grad
    assert torch.isfinite(out["loss"]) and torch.equal(out["loss"], out["main_loss"])
    out["loss"].backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == head_names(m)
    assert all(torch.isfinite(p.grad).all() for p in m.head_parameters())
    if use_dcm:  # the zero-initialised gate of the default residual fusion learns first ...
        assert m.dcm_fuse.gamma.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in m.backbone.parameters())

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
    assert torch.equal(a["logits"], c["logits"])
    assert torch.isfinite(a["loss"]) and "loss" not in c
    torch.testing.assert_close(a["history_mask"].sum(1), torch.ones(B, 9, 9))


# ---------------------------------------------------------------- IOM and K-shot rules
def test_iom_unrolled_equals_feeding_history_back(resnet):
    """eval_iom_iterations=3 == three calls, each fed the previous call's softmax (official eval)."""
    q, s, sm, _ = episode(B=1, K=1, seed=5)
    m1 = make(resnet, init_std=0.05).eval()  # larger weights: the history's effect is visible
    m3 = make(resnet, init_std=0.05, eval_iom_iterations=3).eval()
    m3.load_state_dict(m1.state_dict())
    with torch.no_grad():
        h = None
        for _ in range(3):
            o = m1(q, s, sm, history_mask=h)
            h = o["history_mask"]
        unrolled = m3(q, s, sm)
        zero = m1(q, s, sm, history_mask=torch.zeros(1, 2, 30, 30))
        first = m1(q, s, sm)
    torch.testing.assert_close(unrolled["logits"], o["logits"], rtol=1e-5, atol=1e-6)
    assert torch.equal(zero["logits"], first["logits"])  # no history == zero history
    assert (unrolled["logits"] - first["logits"]).abs().max() > 1e-4  # the history is used
    m3.train()  # in training, iom_iterations (1) applies
    assert m3.iom_iterations == 1


def test_training_unroll_backprops_through_iterations(resnet):
    m = make(resnet, iom_iterations=3).train()
    q, s, sm, qm = episode()
    out = m(q, s, sm, qm)
    out["loss"].backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == head_names(m)


def test_prototype_fusion_duplicated_shots_equal_one_shot(resnet):
    m = make(resnet).eval()
    q, s, sm, _ = episode(B=1, K=1, seed=7)
    with torch.no_grad():
        one = m(q, s, sm)["logits"]
        five = m(q, s.expand(-1, 5, -1, -1, -1), sm.expand(-1, 5, -1, -1))["logits"]
    torch.testing.assert_close(five, one, rtol=1e-4, atol=1e-5)


def test_logit_fusion_is_mean_of_per_shot_runs(resnet):
    m = make(resnet, shot_fusion="logits").eval()
    q, s, sm, _ = episode(B=2, K=3, seed=8)
    with torch.no_grad():
        fused = m(q, s, sm)["logits"]
        per_shot = torch.stack([m(q, s[:, k : k + 1], sm[:, k : k + 1])["logits"] for k in range(3)]).mean(0)
    torch.testing.assert_close(fused, per_shot, rtol=1e-4, atol=1e-5)


def test_other_backbone_and_dcm_kernel_size():
    m = CANet("efficientnet_lite0", backbone_weights="random", reduce_dim=R, dcm={"kernel_size": 3}).train()
    q, s, sm, qm = episode(B=1, K=2)
    out = m(q, s, sm, qm)
    assert out["logits"].shape == (1, 2, SIZE, SIZE)
    out["loss"].backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == head_names(m)


def test_empty_support_mask_no_nan(resnet):
    m = make(resnet, dcm="default").eval()
    q, s, sm, qm = episode(B=2, K=2)
    sm[0] = 0
    sm[1, 1] = 255
    with pytest.warns(EmptyForegroundWarning):
        with torch.no_grad():
            out = m(q, s, sm, qm)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["loss"])


def test_bad_inputs(resnet):
    m = make(resnet).eval()
    q, s, sm, qm = episode(B=1, K=2)
    with pytest.raises(ValueError, match="query_img"):
        m(q[0], s, sm)
    with pytest.raises(ValueError, match="support_masks"):
        m(q, s, sm[..., :10])
    with pytest.raises(ValueError, match="support_masks"):
        m(q, s, sm * 7)
    with pytest.raises(ValueError, match="query_mask"):
        m(q, s, sm, qm + 2)
    with pytest.raises(ValueError, match="history_mask"):
        m(q, s, sm, history_mask=torch.zeros(1, 1, 9, 9))
    with pytest.raises(ValueError, match="layer4_trainable"):
        CANet(resnet, backbone_kwargs={"layer4_trainable": True})
    with pytest.raises(ValueError, match="shot_fusion"):
        make(resnet, shot_fusion="attention")
    with pytest.raises(ValueError, match="iom_iterations"):
        make(resnet, iom_iterations=0)
    with pytest.raises(ValueError, match="eval_iom_iterations"):
        make(resnet, eval_iom_iterations=1.5)
    with pytest.raises(ValueError, match="variants"):
        make(resnet, dcm={"variants": ("x",)})
