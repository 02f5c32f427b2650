"""models/registry.py: build_model / list_models (names, flags, errors)."""
from __future__ import annotations

import importlib

import pytest
import torch

from models.backbones import BackboneWeightsWarning
from models.dpcn import ABLATIONS, DPCN
from models.dcm_spec import DCMSpec, preset
from models.registry import MODELS, build_model, list_models

SMALL = {"reduce_dim": 16}


def test_list_models():
    assert list_models() == sorted(["dpcn", "baseline", "pfenet", "pfenet+dcm", "canet", "canet+dcm"])
    assert set(MODELS) == set(list_models())


def test_dpcn_and_baseline():
    m = build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", **SMALL, decoder_dim=16)
    assert isinstance(m, DPCN) and (m.use_sam, m.use_ffm, m.use_dcm) == (True, True, True)
    assert m.shot == 1 and m.backbone.name == "efficientnet_lite0" and m.training
    b = build_model("Baseline", backbone="efficientnet_lite0", shot=5, backbone_weights="random", **SMALL)
    assert isinstance(b, DPCN) and (b.use_sam, b.use_ffm, b.use_dcm) == (False, False, False) and b.shot == 5
    # the baseline's own flags may be repeated with the same values
    build_model("baseline", backbone="efficientnet_lite0", backbone_weights="random", use_sam=False, dcm=None, **SMALL)
    # an ablation row goes through unchanged
    k3 = build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", **SMALL, **ABLATIONS["table4_k3"])
    assert k3.dcm.kernel_size == 3


def test_backbone_weights_are_passed_through():
    with pytest.warns(BackboneWeightsWarning):
        build_model("baseline", backbone="efficientnet_lite0", **SMALL)  # weights=None: random + warning
    m = build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", layer4_trainable=True, **SMALL)
    assert m.backbone.layer4_trainable


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'dpcn2'.*baseline, canet, canet\+dcm, dpcn, pfenet, pfenet\+dcm"):
        build_model("dpcn2")
    with pytest.raises(ValueError, match="unknown model"):
        build_model(None)


def test_unknown_flag_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"unknown flag 'reduce_dimm'.*valid flags:.*reduce_dim"):
        build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", reduce_dimm=3)
    with pytest.raises(TypeError, match=r"unknown flag 'dcm_kernal_size'"):
        build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", dcm_kernal_size=3)
    with pytest.raises(TypeError, match=r"unknown flags 'a', 'b'"):
        build_model("baseline", backbone="efficientnet_lite0", backbone_weights="random", b=1, a=2)


def test_fixed_flags_cannot_be_overridden():
    with pytest.raises(ValueError, match=r"'baseline' fixes use_sam=False"):
        build_model("baseline", backbone="efficientnet_lite0", backbone_weights="random", use_sam=True)
    with pytest.raises(ValueError, match=r"'baseline' has no DCM .* \(build 'dpcn' instead\)"):
        build_model("baseline", backbone="efficientnet_lite0", backbone_weights="random", dcm="paper")
    with pytest.raises(ValueError, match=r"'pfenet' has no DCM .* \(build 'pfenet\+dcm' instead\)"):
        build_model("pfenet", dcm={"gate": "fit"})
    with pytest.raises(ValueError, match=r"'canet\+dcm' has a DCM; got dcm=None \(build 'canet' instead\)"):
        build_model("canet+dcm", dcm=None)
    # the deprecated spelling: the same rules
    with pytest.raises(ValueError, match=r"'baseline' fixes use_dcm=False"):
        build_model("baseline", backbone="efficientnet_lite0", backbone_weights="random", use_dcm=True)
    with pytest.raises(ValueError, match=r"'pfenet' fixes use_dcm=False"):
        build_model("pfenet", use_dcm=True)


def test_bad_flag_values_reach_the_model():
    with pytest.raises(ValueError, match="kernel_size"):
        build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", dcm={"kernel_size": 4})


def test_the_dcm_of_a_model_and_the_deprecated_flat_flags():
    kw = dict(backbone="efficientnet_lite0", backbone_weights="random", reduce_dim=8)
    assert build_model("pfenet+dcm", **kw).dcm_spec == preset("pfenet", "default")
    assert build_model("canet+dcm", dcm="paper", **kw).dcm_spec == DCMSpec()
    assert build_model("dpcn", dcm=None, decoder_dim=8, **kw).dcm_spec is None
    torch.manual_seed(0)
    new = build_model("canet+dcm", dcm={"input": "reduced", "gate": "fit"}, **kw)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match=r"CANet: the flat DCM flags \(dcm_gate, dcm_input\) are deprecated"):
        old = build_model("canet+dcm", dcm_input="reduced", dcm_gate="fit", **kw)
    assert old.dcm_spec == new.dcm_spec
    sa, sb = new.state_dict(), old.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name, module, cls", [("pfenet", "models.pfenet", "PFENet"), ("canet", "models.canet", "CANet")])
def test_host_networks(name, module, cls):
    mod = pytest.importorskip(module)
    plain = build_model(name, backbone="efficientnet_lite0", backbone_weights="random", reduce_dim=16)
    with_dcm = build_model(name + "+dcm", backbone="efficientnet_lite0", backbone_weights="random", reduce_dim=16)
    assert type(plain) is getattr(mod, cls) and type(with_dcm) is getattr(mod, cls)
    assert plain.use_dcm is False and with_dcm.use_dcm is True
    with pytest.raises(TypeError, match="unknown flag 'use_sam'"):
        build_model(name, backbone="efficientnet_lite0", backbone_weights="random", use_sam=False)
    # the common interface
    q, s = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65)
    sm = torch.zeros(1, 1, 65, 65, dtype=torch.long)
    sm[..., 20:40, 20:40] = 1
    out = with_dcm.eval()(q, s, sm, sm[:, 0])
    assert out["logits"].shape == (1, 2, 65, 65) and torch.isfinite(out["loss"])


def test_missing_host_module_gives_a_clear_import_error(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "models.canet":
            raise ImportError("simulated")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"'canet' needs models.canet.CANet"):
        build_model("canet")
    # the other networks still build
    assert isinstance(build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", **SMALL), DPCN)
