"""models/dcm_spec.py: one DCM specification for every host -- the hosts' one ``dcm`` argument, the
presets, the per-host validation, and the deprecated flat flags read by one shim."""
import dataclasses
import inspect
import warnings

import pytest
import torch

from _hostnets import episode, register_tiny_backbone, unregister_tiny_backbone
from models.canet import CANet
from models.dcm_spec import HOSTS, PRESETS, DCMSpec, as_spec, preset, spec_fields
from models.dpcn import DPCN
from models.pfenet import PFENet
from models.registry import MODELS, _model_class, build_model, host_of

CLASSES = {"dpcn": DPCN, "pfenet": PFENet, "canet": CANet}
SMALL = {"dpcn": {"reduce_dim": 8, "decoder_dim": 8}, "pfenet": {"reduce_dim": 8, "ppm_scales": [1.0, 0.5]},
         "canet": {"reduce_dim": 8}}
#: a value other than the default of each field that applies to some hosts only
OTHER = {"placement": "pyramid", "support": "clean", "kernels": "identity", "gate": "fit", "map_dropout": 0.5}
ONLY = {"placement": {"pfenet"}, "support": {"pfenet", "canet"}, "kernels": {"pfenet", "canet"},
        "gate": {"pfenet", "canet"}, "map_dropout": {"pfenet", "canet"}}


@pytest.fixture(scope="module", autouse=True)
def _tiny():
    yield register_tiny_backbone()
    unregister_tiny_backbone()


def host(name, **kw):
    torch.manual_seed(0)
    return CLASSES[name]("tiny", backbone_weights="random", **SMALL[name], **kw)


def test_no_host_constructor_has_a_flat_dcm_parameter():
    classes = {_model_class(name) for name in MODELS} | set(CLASSES.values())
    assert classes == set(CLASSES.values())
    for cls in classes:
        params = inspect.signature(cls.__init__).parameters
        flat = [n for n in params if n.startswith("dcm_") or n in ("use_dcm", "dcm_kwargs")]
        assert not flat, (cls.__name__, flat)
        assert "dcm" in params, cls.__name__


@pytest.mark.parametrize("name", sorted(HOSTS))
@pytest.mark.parametrize("which", sorted(PRESETS))
def test_every_host_builds_from_every_preset(name, which):
    q, s, sm, qm = episode(B=1, K=2, size=32)
    for given in (which, preset(name, which), {"preset": which}):
        m = host(name, dcm=given)
        assert m.dcm_spec == PRESETS[which][name] and m.use_dcm
        out = m(q, s, sm, qm)
        assert out["logits"].shape == (1, 2, 32, 32) and torch.isfinite(out["loss"])
    model = name if name == "dpcn" else name + "+dcm"
    assert build_model(model, backbone="tiny", backbone_weights="random", dcm=which, **SMALL[name]).dcm_spec \
        == PRESETS[which][name]


def test_the_presets():
    assert all(PRESETS["paper"][h] == DCMSpec() for h in HOSTS)  # the paper's DCM, whatever its form per host
    assert preset("dpcn") == DCMSpec()
    assert preset("pfenet") == DCMSpec(fusion="residual")
    assert preset("canet") == DCMSpec(input="raw", fusion="residual")
    assert preset("canet", "default", gate="fit").gate == "fit"
    with pytest.raises(ValueError, match="dcm: unknown preset 'best'"):
        preset("canet", "best")
    with pytest.raises(ValueError, match="host: expected one of dpcn, pfenet, canet"):
        preset("bam")


@pytest.mark.parametrize("name", sorted(HOSTS))
@pytest.mark.parametrize("field", sorted(OTHER))
def test_a_field_that_means_nothing_for_a_host_is_an_error_naming_host_and_field(name, field):
    extra = {"fusion": "residual"} if field == "gate" else {}
    spec = DCMSpec(**extra, **{field: OTHER[field]})
    if name in ONLY[field]:
        assert spec.validate_for(name) is spec
        return
    cls = CLASSES[name].__name__
    word = f"{cls}: dcm.{field}={OTHER[field]!r} means nothing for {cls}"
    with pytest.raises(ValueError, match=word):
        spec.validate_for(name)
    with pytest.raises(ValueError, match=word):
        host(name, dcm=spec)
    with pytest.raises(ValueError, match=word):
        host(name, dcm={field: OTHER[field], **extra})


@pytest.mark.parametrize("name, dcm, word", [
    ("pfenet", {"input": "raw", "support": "clean"}, "PFENet: dcm.support='clean' applies to dcm.input='reduced'"),
    ("canet", {"input": "raw", "support": "clean"}, "CANet: dcm.support='clean' applies to dcm.input='reduced'"),
    ("canet", {"fusion": "paper", "gate": "fit"}, "CANet: dcm.gate='fit' gates the residual fusion"),
    ("pfenet", {"placement": "decoder", "gate": "fit"}, "PFENet: dcm.gate='fit' gates the fusion at the FEM input"),
    ("dpcn", {"input": "raw"}, "DPCN: dcm.input='raw' needs dcm.fusion='residual'"),
    ("dpcn", {"unknown": 1}, "dcm: unknown field 'unknown'"),
])
def test_fields_that_contradict_each_other_on_a_host_are_errors_naming_it(name, dcm, word):
    with pytest.raises(ValueError, match=word):
        as_spec(dcm, name)
    with pytest.raises(ValueError, match=word):
        host(name, dcm=dcm)


def test_dpcn_off_feature_is_the_host_without_dcm():
    m = host("dpcn", dcm=None, off_feature="none")
    assert m.dcm is None and m.off_feature == "none" and m.x_out_channels == 8 + 3 + 1
    with pytest.raises(ValueError, match="DPCN: off_feature='none' says what x_out holds without the DCM"):
        host("dpcn", off_feature="none")


def test_the_spec_is_a_small_frozen_value():
    spec = DCMSpec(variants=["v", "h"], kernel_norm="none", weight_decay="null")
    assert spec.variants == ("v", "h") and spec.kernel_norm is None and spec.weight_decay is None
    assert DCMSpec(variants="vh") == spec and hash(spec) == hash(DCMSpec(variants=("v", "h")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.kernel_size = 3
    assert repr(DCMSpec()) == "DCMSpec()" and repr(spec) == "DCMSpec(variants=('v', 'h'))"
    assert spec.replace(kernel_size=3).kernel_size == 3 and spec.kernel_size == 5
    assert tuple(DCMSpec().to_dict()) == spec_fields()
    assert DCMSpec(**{**DCMSpec().to_dict(), "variants": ["s"]}) == DCMSpec(variants=("s",))
    assert preset("canet").changes(DCMSpec()) == {"input": "raw", "fusion": "residual"}
    for bad, word in (({"fusion": "replace"}, r"dcm.fusion: expected 'paper' or 'residual', got 'replace' "
                                               r"\('replace' is the paper's fusion of DPCN and PFENet: fusion='paper'\)"),
                      ({"input": "mid"}, "dcm.input: expected 'reduced' or 'raw'"),
                      ({"map_dropout": 1.0}, r"dcm.map_dropout: expected a number in \[0, 1\)"),
                      ({"lr_scale": True}, "dcm.lr_scale: expected a number >= 0"),
                      ({"weight_decay": -1}, "dcm.weight_decay: expected None or a number >= 0")):
        with pytest.raises(ValueError, match=word):
            DCMSpec(**bad)
    with pytest.raises(TypeError, match="dcm: expected a DCMSpec, a preset name, a mapping or None, got int"):
        as_spec(3, "dpcn")
    assert as_spec("none", "pfenet") is None and as_spec(None, "canet") is None


def test_the_fusion_has_one_name_for_the_papers_form_on_every_host():
    assert {h: DCMSpec().host_fusion(h) for h in HOSTS} == {"dpcn": "replace", "pfenet": "replace", "canet": "concat"}
    assert {h: preset(h, fusion="residual").host_fusion(h) for h in HOSTS} == dict.fromkeys(HOSTS, "residual")
    canet = host("canet", dcm="paper")  # the maps concatenated to layer55's input
    assert not hasattr(canet, "dcm_fuse") and canet.layer55[0].in_channels == 2 * 8 + canet.dcm.out_channels
    pfenet = host("pfenet", dcm="paper")  # the fused feature replaces the query feature
    assert pfenet.dcm_fuse.mode == "replace"
    dpcn = host("dpcn", dcm="paper")  # the maps take the place of the query feature in x_out
    assert not hasattr(dpcn, "dcm_fuse") and dpcn.x_out_channels == dpcn.dcm.out_channels + 8 + 4


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    q, s, sm, _ = episode(B=1, K=1, size=32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(q, s, sm)["logits"], b.eval()(q, s, sm)["logits"], rtol=0, atol=0)
    assert a.dcm_spec == b.dcm_spec and [g["lr"] for g in a.param_groups(1.0)] == [g["lr"] for g in b.param_groups(1.0)]


@pytest.mark.parametrize("name, flat, new", [
    ("dpcn", {"use_dcm": False, "dcm_off_feature": "none"}, {"dcm": None, "off_feature": "none"}),
    ("dpcn", {"dcm_fusion": "residual", "dcm_input": "raw", "dcm_lr_scale": 0.1},
     {"dcm": DCMSpec(fusion="residual", input="raw", lr_scale=0.1)}),
    ("pfenet", {"use_dcm": True, "dcm_fusion": "replace", "dcm_placement": "decoder", "dcm_kernel_size": 3},
     {"dcm": DCMSpec(placement="decoder", kernel_size=3)}),
    ("pfenet", {"use_dcm": True}, {"dcm": "default"}),
    ("pfenet", {"use_dcm": False, "dcm_input": "raw"}, {}),
    ("canet", {"use_dcm": True, "dcm_input": "reduced", "dcm_gate": "fit", "dcm_weight_decay": 0.0},
     {"dcm": {"input": "reduced", "gate": "fit", "weight_decay": 0.0}}),
    ("canet", {"use_dcm": True, "dcm_fusion": "concat", "dcm_kwargs": {"variants": ("s",)}},
     {"dcm": DCMSpec(input="raw", variants=("s",))}),
])
def test_old_flat_flags_warn_and_build_the_same_network(name, flat, new):
    cls = CLASSES[name].__name__
    with pytest.warns(DeprecationWarning, match=f"{cls}: the flat DCM flags .* are deprecated .* pass dcm="):
        old = host(name, **flat)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _same(old, host(name, **new))


def test_the_flat_flags_and_dcm_together_or_a_flag_of_another_host_are_errors():
    with pytest.raises(TypeError, match="PFENet: pass the DCM either as dcm= or as the deprecated flat flags"):
        host("pfenet", dcm="default", dcm_gate="fit")
    with pytest.raises(TypeError, match="DPCN: unexpected keyword argument 'dcm_placement'"):
        host("dpcn", dcm_placement="decoder")
    with pytest.raises(TypeError, match="CANet: unexpected keyword argument 'reduce_dimension'"):
        host("canet", reduce_dimension=3)
    with pytest.raises(ValueError, match="dcm_fusion: expected 'replace' or 'residual', got 'concat'"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        host("pfenet", use_dcm=True, dcm_fusion="concat")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_registry_model_takes_dcm_through_one_validation(model):
    name = host_of(model)
    kw = dict(backbone="tiny", backbone_weights="random", **SMALL[name])
    m = build_model(model, **kw)
    assert (m.dcm_spec is not None) == (model in ("dpcn", "pfenet+dcm", "canet+dcm"))
    if m.dcm_spec is not None:
        assert m.dcm_spec == preset(name)
        with pytest.raises(ValueError, match=f"{HOSTS[name]}: dcm.placement='decoder' means nothing"
                                             if name != "pfenet" else "PFENet: dcm.gate='fit' gates the fusion"):
            build_model(model, dcm={"placement": "decoder", "gate": "fit", "fusion": "residual"}, **kw)


def test_commands_show_the_deprecation_of_a_configs_flat_flags(tmp_path):
    """A recipe with flat ``dcm_*`` flags builds the same network with a DeprecationWarning that a command
    prints (Python's default filter would hide it: it is raised inside benchmarks/models, not __main__)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    recipe = tmp_path / "flat.yaml"
    recipe.write_text("model:\n  name: pfenet+dcm\n  flags:\n    dcm_input: raw\n")
    p = subprocess.run([sys.executable, "examples/train_dpcn.py", "--config", str(recipe), "--print-config"], cwd=root,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "DeprecationWarning" in p.stderr and "dcm_input" in p.stderr, p.stderr[-2000:]
    assert "input: raw" in p.stdout
