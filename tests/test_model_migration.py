"""Checkpoints, configs and run folders of the pre-spec release keep building the same network
(models/migrate.py, models/arms.py).

``fixtures/models_v1.json`` holds 48 model sections as the code before :class:`models.dcm_spec.DCMSpec`
(commit 74e6a78, ``fixtures/make_models_v1.py``) saved them -- every arm of the committed comparisons,
flat ``--set`` flags, the deprecated ``dcm_kwargs`` and configs from before ``dcm_fusion`` / ``dcm_input``
were pinned -- with what that code built from them: state-dict keys and shapes, frozen parameters,
optimiser groups, the seeded initialisation and logits under fixed weights.
"""
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from _hostnets import episode, register_tiny_backbone, unregister_tiny_backbone, synthetic_state
from benchmarks.engine.config import load_config
from benchmarks.engine import build_model_from_config, check_model_config, load_checkpoint_model
from models.arms import parse_arm
from models.migrate import CONFIG_VERSION, migrate_model_config, network_of

HERE = Path(__file__).resolve().parent
CASES = json.loads((HERE / "fixtures" / "models_v1.json").read_text())["cases"]
RUNS = HERE.parent / "docs" / "results" / "never_hurts_r1" / "runs"


def _id(case):
    return case.get("arm") or f"{case['kind']}:{case['model']['name']}:" + ",".join(
        f"{k}={v}" for k, v in case["model"]["flags"].items() if k.startswith(("dcm", "use_dcm")))


@pytest.fixture(scope="module", autouse=True)
def _tiny():
    yield register_tiny_backbone()
    unregister_tiny_backbone()


def _fingerprint(net):
    return sum((i + 1) * float(t.double().sum()) for i, t in enumerate(net.state_dict().values())
               if t.is_floating_point())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_a_checkpoint_of_the_previous_release_loads_into_the_same_network(case, tmp_path):
    ck = tmp_path / "best.pth"
    torch.save({"model": synthetic_state(case["keys"]), "config": {"model": case["model"]}, "layer4_on": False}, ck)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a saved config of its release migrates silently
        net, cfg = load_checkpoint_model(ck)
    assert cfg["model"]["config_version"] == CONFIG_VERSION
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == case["keys"]
    assert [n for n, p in net.named_parameters() if not n.startswith("backbone.") and not p.requires_grad] \
        == case["frozen"]
    assert [[g["name"], len(g["params"]), g["lr"], g.get("weight_decay")] for g in net.param_groups(1.0)] \
        == case["groups"]
    q, s, sm, _ = episode(B=1, K=1, size=32, seed=0)
    with torch.no_grad():
        logits = net(q, s, sm)["logits"][..., 3::8, 3::8]
        torch.manual_seed(1)
        train_logits = net.train()(q, s, sm)["logits"][..., 3::8, 3::8]
    want = torch.tensor(case["logits"]).reshape(logits.shape)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(train_logits, torch.tensor(case["train_logits"]).reshape(logits.shape),
                               rtol=1e-5, atol=1e-5)
    # the same initialisation: the migrated config, built under the same seed, gives the same weights
    torch.manual_seed(0)
    fresh = build_model_from_config(cfg, backbone_weights="random")
    assert _fingerprint(fresh) == pytest.approx(case["init"], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "arm"], ids=_id)
def test_an_arm_of_the_previous_release_keeps_its_network_and_run_folder(case):
    host, spec = case["host"], case["arm"]
    legacy = "[" in spec and "+" in spec.split("[", 1)[1] or any(
        spec.endswith(f"[{t}]") for t in ("residual", "rawin", "redin", "decoder", "fit", "mapdrop0.5", "sb1", "concat"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arm = parse_arm(spec, host)
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert bool(deprecations) == legacy, [str(w.message) for w in deprecations]
    assert arm.tag == case["tag"]
    base = [o for o in case["overrides"] if not o.startswith("model.flags.") or
            o.split("=")[0].split(".")[-1] in ("reduce_dim", "decoder_dim", "ppm_scales")]
    model = load_config(case["recipe"], base + [f"model.name={arm.model}", *arm.overrides])["model"]
    assert network_of(model) == network_of(case["model"])
    if legacy:  # the spelling the warning proposes: no warning, the same run folder and network
        new = str(deprecations[0].message).split("write '")[1].split("'")[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            arm2 = parse_arm(new, host)
        assert arm2.tag == case["tag"]
        model2 = load_config(case["recipe"], base + [f"model.name={arm2.model}", *arm2.overrides])["model"]
        assert network_of(model2) == network_of(case["model"])


@pytest.mark.parametrize("case", [c for c in CASES if c["kind"] == "set"], ids=_id)
def test_flat_flags_in_a_recipe_warn_and_build_the_same_network(case):
    with pytest.warns(DeprecationWarning, match="flat DCM flags"):
        model = load_config(case["recipe"], case["overrides"])["model"]
    assert not any(k.startswith(("dcm_", "use_dcm")) for k in model["flags"])
    assert network_of(model) == network_of(case["model"])


def test_the_migration_reads_the_version_field():
    v1 = {"name": "pfenet+dcm", "flags": {"reduce_dim": 8}}
    assert migrate_model_config(v1)["dcm"] == {"fusion": "paper"}  # no version: that release's default
    with pytest.warns(DeprecationWarning):
        v2 = migrate_model_config({**v1, "flags": {"dcm_input": "raw"}, "config_version": 2})
    assert v2["dcm"] == {"input": "raw"}  # version 2: flat flags change today's default
    assert migrate_model_config({**v1, "config_version": 2}).get("dcm") is None  # nothing to migrate
    twice = migrate_model_config(migrate_model_config(v1))
    assert twice == migrate_model_config(v1)
    with pytest.raises(ValueError, match="model.config_version"):
        migrate_model_config({**v1, "config_version": CONFIG_VERSION + 1})


@pytest.mark.parametrize("folder", sorted(p.name for p in RUNS.iterdir()) if RUNS.is_dir() else [])
def test_committed_run_folders_of_the_previous_release_are_the_same_network(folder):
    """The never-hurts round's run folders (configs with the flat flags) are found and accepted by the arm
    that made them, and their config builds the network of that arm."""
    from benchmarks.plug_in import check_run_dir
    tag, fold, seed = folder.rsplit("_", 2)
    variant = tag.split("_dcm", 1)[1].lstrip("_") if "_dcm" in tag else ""
    host = tag.split("_")[0]
    arm_spec = host + ("+dcm" if "_dcm" in tag else "") + (f"[{variant}]" if variant else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        arm = parse_arm(arm_spec, host)
    assert arm.tag == tag
    cfg = load_config(f"plug_in_{host}_voc_lite0", ["data.root=VOC2012", f"model.name={arm.model}", *arm.overrides,
                                                  f"data.fold={fold[1:]}", f"train.seed={seed[4:]}"])
    check_run_dir(cfg, RUNS / folder)  # --resume / --report-only reuse it
    saved = yaml.safe_load((RUNS / folder / "config.yaml").read_text())
    with torch.device("meta"):
        old = build_model_from_config({**saved, "model": migrate_model_config(saved["model"])}, backbone_weights="random")
        new = build_model_from_config(cfg, backbone_weights="random")
    assert [(k, v.shape) for k, v in old.state_dict().items()] == [(k, v.shape) for k, v in new.state_dict().items()]
    assert old.dcm_spec == new.dcm_spec
    check_model_config(cfg)


def test_report_only_tabulates_run_folders_of_the_previous_release(tmp_path, capsys):
    from benchmarks import plug_in
    out = tmp_path / "plug_in_canet"
    out.mkdir()
    for arm in ("canet", "canet_dcm_fit"):
        for f in (1, 2, 3):
            for s in (0, 1):
                shutil.copytree(RUNS / f"{arm}_f{f}_seed{s}", out / f"{arm}_f{f}_seed{s}")
    with pytest.warns(DeprecationWarning, match=r"write 'canet\+dcm\[gate=fit\]'"):
        rc = plug_in.main(["--host", "canet", "--config", "plug_in_canet_voc_lite0", "--data-root", "VOC2012",
                           "--arms", "canet", "canet+dcm[fit]", "--folds", "1", "2", "3", "--seeds", "2",
                           "--split", "val", "--report-only", "--out", str(tmp_path), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "missing" not in text
    table = json.loads(next(f for f in out.glob("table6_canet_val_*.json") if "episodes" not in f.name).read_text())
    assert set(table["results"]["canet+dcm[fit]"]["miou"]) == {"1", "2", "3"}
    # the spelling of this release finds the same folders
    rc = plug_in.main(["--host", "canet", "--config", "plug_in_canet_voc_lite0", "--data-root", "VOC2012",
                       "--arms", "canet", "canet+dcm[gate=fit]", "--folds", "1", "2", "3", "--seeds", "2",
                       "--split", "val", "--report-only", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0 and "missing" not in capsys.readouterr().out


def test_a_new_run_restarts_in_a_folder_of_the_previous_release_holding_only_its_config(tmp_path):
    """A run of the previous release stopped before its first checkpoint (its folder holds the config with
    the flat flags and a log): started again without --resume, the same arm takes the folder; another does not."""
    from benchmarks.engine import RunFolderTaken, claim_run_folder
    folder = "pfenet_dcm_rawin_f1_seed0"
    if not (RUNS / folder / "config.yaml").is_file():
        pytest.skip(f"{RUNS / folder} is not in this checkout")
    run = tmp_path / folder
    run.mkdir()
    (run / "config.yaml").write_text((RUNS / folder / "config.yaml").read_text())
    (run / "log.jsonl").write_text('{"event": "start"}\n')

    saved = yaml.safe_load((RUNS / folder / "config.yaml").read_text())

    def cfg(arm_spec):  # the saved run's settings with the model section of an arm in this release's form
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            arm = parse_arm(arm_spec, "pfenet")
        model = load_config("plug_in_pfenet_voc_lite0", ["data.root=VOC2012", f"model.name={arm.model}", *arm.overrides])["model"]
        return {**saved, "model": model}

    claim_run_folder(run, resume=False, cfg=cfg("pfenet+dcm[input=raw]"), echo=lambda s: None).release()
    with pytest.raises(RunFolderTaken):
        claim_run_folder(run, resume=False, cfg=cfg("pfenet+dcm"), echo=lambda s: None)
