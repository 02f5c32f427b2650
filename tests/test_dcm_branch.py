"""The DCM-branch fields of the hosts: the support-fit gate of the residual fusion (``dcm.gate='fit'``) and
channel dropout on the DCM maps (``dcm.map_dropout``), against literal references; the gate value logged
per epoch."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from _hostnets import SIZE, episode
from models.canet import CANet
from models.common import gated_fusion, kernel_fit
from models.pfenet import PFENet


def _fit_loop(q, s, m):
    """kernel_fit by loops: the masked mean of each shot (mask resized bilinearly like the library), the mean
    over shots, and the clamped cosine at every query position."""
    B, K, C, h, w = s.shape
    out = torch.zeros(B, 1, *q.shape[-2:], dtype=q.dtype)
    for b in range(B):
        protos = []
        for k in range(K):
            mk = (m[b, k] == 1).to(q.dtype)[None, None]
            mk = F.interpolate(mk, size=(h, w), mode="bilinear", align_corners=True)[0, 0]
            protos.append((s[b, k] * mk).sum((1, 2)) / (mk.sum() + 5e-4))
        p = torch.stack(protos).mean(0)
        for y in range(q.shape[-2]):
            for x in range(q.shape[-1]):
                v = q[b, :, y, x]
                c = float(v @ p) / max(float(v.norm() * p.norm()), 1e-8)
                out[b, 0, y, x] = max(c, 0.0)
    return out


def test_kernel_fit_matches_a_literal_loop_and_is_zero_without_foreground():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    s = torch.randn(2, 3, 4, 5, 6, generator=g, dtype=torch.float64)
    m = (torch.rand(2, 3, 10, 12, generator=g) > 0.5).long()
    m[0, 1, 0] = 255
    torch.testing.assert_close(kernel_fit(q, s, m), _fit_loop(q, s, m))
    assert kernel_fit(q, s, torch.zeros_like(m)).abs().max() == 0


def test_gated_fusion_scales_the_residual_and_has_exact_gradients():
    from dcm import DCMFusion
    torch.manual_seed(0)
    fuse = DCMFusion(3, 2, "residual", gamma_init=0.7).double()
    q = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    maps = [torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fit = torch.rand(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    full = fuse(q, maps)
    torch.testing.assert_close(gated_fusion(fuse, q, maps, fit), q + fit * (full - q))
    assert torch.equal(gated_fusion(fuse, q, maps, None), full)
    assert torch.autograd.gradcheck(lambda q_, a, b, f: gated_fusion(fuse, q_, [a, b], f), (q, *maps, fit))


@pytest.mark.parametrize("host", ["canet", "pfenet"])
def test_fit_gate_and_map_dropout_start_as_the_host_and_train(resnet, host):
    cls = CANet if host == "canet" else PFENet
    q, s, sm, qm = episode(B=2, K=1, seed=3)
    torch.manual_seed(0)
    base = cls(resnet, reduce_dim=8).eval()
    torch.manual_seed(0)
    plus = cls(resnet, reduce_dim=8, dcm={"gate": "fit", "map_dropout": 0.3})
    # same init of the host's layers, γ = 0: the gated DCM network starts as the host
    plus.load_state_dict(base.state_dict(), strict=False)
    plus.eval()
    with torch.no_grad():
        torch.testing.assert_close(plus(q, s, sm)["logits"], base(q, s, sm)["logits"])
    plus.train()
    out = plus(q, s, sm, qm)
    out["loss"].backward()
    assert plus.dcm_fuse.gamma.grad.abs().sum() > 0


def test_map_dropout_drops_whole_channels_in_training_only(resnet):
    m = CANet(resnet, reduce_dim=8, dcm={"map_dropout": 0.5})
    seen = {}
    real = m.dcm_fuse.forward

    def spy(q, maps):
        seen["maps"] = [t.detach().clone() for t in maps]
        return real(q, maps)

    m.dcm_fuse.forward = spy
    q, s, sm, _ = episode(B=1, K=1, seed=1)
    m.train()
    torch.manual_seed(0)
    m(q, s, sm)
    zero = [(t.flatten(2).abs().sum(-1) == 0) for t in seen["maps"]]
    assert any(z.any() for z in zero) and not all(z.all() for z in zero)  # some channels dropped, not all
    m.eval()
    m(q, s, sm)
    ref = list(m.dcm(m.mid_feature(q), m.mid_feature(s.flatten(0, 1))[None], sm))
    for a, b in zip(seen["maps"], ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kw, word", [({"gate": "fit", "fusion": "paper"}, "CANet: dcm.gate='fit'.*fusion='residual'"),
                                      ({"gate": "yes"}, "dcm.gate"),
                                      ({"map_dropout": 1.0}, "dcm.map_dropout"),
                                      ({"map_dropout": -0.1}, "dcm.map_dropout")])
def test_bad_branch_fields_are_one_line_errors(resnet, kw, word):
    with pytest.raises(ValueError, match=word):
        CANet(resnet, reduce_dim=8, dcm=kw)


def test_pfenet_fit_gate_needs_the_fem_input_placement(resnet):
    with pytest.raises(ValueError, match="PFENet: .*fem_input"):
        PFENet(resnet, reduce_dim=8, dcm={"gate": "fit", "placement": "decoder"})


def test_arm_items_of_the_branch_fields():
    from models.arms import parse_arm
    assert parse_arm("canet+dcm[gate=fit]", "canet").overrides == ["model.dcm.gate=fit"]
    assert parse_arm("pfenet+dcm[map_dropout=0.5]", "pfenet").overrides == ["model.dcm.map_dropout=0.5"]
    with pytest.warns(DeprecationWarning, match=r"write 'canet\+dcm\[gate=fit\]'"):
        assert parse_arm("canet+dcm[fit]", "canet").overrides == ["model.dcm.gate=fit"]
    with pytest.raises(ValueError, match="'gate' is a DCM field but 'canet' has no DCM"):
        parse_arm("canet[gate=fit]", "canet")


def test_gate_value_is_logged_each_epoch(tmp_path):
    from benchmarks.engine.config import load_config
    from benchmarks.engine import train
    cfg = load_config("plug_in_canet_synthetic", [
        "data.args={image_size: 32, num_images: 120}", "data.train_episodes=8", "data.num_workers=0",
        "train.epochs=2", "train.batch_size=4", "train.val_episodes=4", "model.backbone_weights=random",
        "model.name=canet+dcm", "model.flags.reduce_dim=8", "eval.enabled=false", "run.progress=false"])
    train(cfg, tmp_path / "run")
    epochs = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if json.loads(l).get("event") == "epoch"]
    assert epochs and all(set(e["dcm_gamma"]) == {"dcm_fuse"} for e in epochs)
    assert all(e["dcm_gamma"]["dcm_fuse"] > 0 for e in epochs)  # the gate opened from 0


@pytest.mark.parametrize("spec, host, word", [("pfenet+dcm[residual+replace]", "pfenet", "contradict"),
                                              ("pfenet+dcm[l1+l2]", "pfenet", "contradict"),
                                              ("canet+dcm[paper+residual]", "canet", "contradict"),
                                              ("canet+dcm[rawin+redin]", "canet", "contradict"),
                                              ("canet+dcm[input=raw,input=reduced]", "canet", "given twice"),
                                              ("canet+dcm[paper,default]", "canet", "two presets"),
                                              ("pfenet+dcm[]", "pfenet", "empty brackets")])
def test_contradictory_or_empty_arm_tokens_are_errors(spec, host, word):
    from models.arms import parse_arm
    with pytest.raises(ValueError, match=word), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        parse_arm(spec, host)
    with pytest.warns(DeprecationWarning):
        assert parse_arm("pfenet+dcm[l1+l1]", "pfenet").overrides == ["model.dcm.kernel_norm=l1"]
