"""The closest-to-paper DPCN recipes, the prior diagnosis (benchmarks/dpcn_prior.py) and the GPU matrix
runner (benchmarks/gpu_matrix.py): pack round trip, plan, resume / skip / budget logic, import, report,
and one tiny unit end to end. Tiny shapes only."""
import json
import random

import numpy as np
import pytest
import torch

from benchmarks import gpu_matrix as GM
from benchmarks.engine.config import load_config
from benchmarks.scoring.prior_maps import diagnose, map_episode_stats, roc_auc

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ recipes
def test_paper_recipes_restore_what_the_cpu_recipe_removed():
    cpu = load_config("dpcn_voc_lite0_paper", ["data.root=/x"])
    f = cpu["model"]["flags"]
    assert (f["reduce_dim"], f["decoder_dim"], f["support_branch_weight"]) == (256, 256, 1.0)
    t = cpu["train"]
    assert t["finetune_layer4"] and 0 < t["layer4_start_epoch"] < t["epochs"]
    assert t["layer4_lr_scale"] == 1.0
    base = load_config("dpcn_voc_lite0", ["data.root=/x"])
    # same data, split, episodes and evaluation as the CPU recipe it replaces
    for k in ("dataset", "train_size", "test_size", "test_resize", "augment", "args"):
        assert cpu["data"][k] == base["data"][k], k
    assert cpu["eval"] == base["eval"]
    assert (t["val_episodes"], t["val_seed"]) == (base["train"]["val_episodes"], base["train"]["val_seed"])
    gpu = load_config("dpcn_voc_lite0_paper_gpu", ["data.root=/x"])
    g = gpu["train"]
    assert gpu["data"]["train_size"] == gpu["data"]["test_size"] == 320 and gpu["eval"]["scales"] == [320]
    assert g["amp"] == "bf16" and not g["cache_backbone"] and g["finetune_layer4"]
    assert g["epochs"] * gpu["data"]["train_episodes"] // g["batch_size"] >= 2000  # thousands of iterations
    assert gpu["model"]["flags"] == cpu["model"]["flags"]
    assert gpu["data"]["args"] == cpu["data"]["args"] and gpu["eval"]["episodes"] == cpu["eval"]["episodes"]


# ------------------------------------------------------------------------------ the prior diagnosis
def _auc_pairs(s, y):
    pos, neg = s[y == 1], s[y == 0]
    tot = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return tot / (len(pos) * len(neg))


def test_roc_auc_is_the_pairwise_probability_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = torch.randint(0, 6, (40,), generator=g).float() / 5  # many ties
        y = (torch.rand(40, generator=g) > 0.6).long()
        assert roc_auc(s, y) == pytest.approx(_auc_pairs(s.numpy(), y.numpy()), abs=1e-12)
    assert np.isnan(roc_auc(torch.tensor([0.2, 0.9]), torch.tensor([0, 0])))


def test_map_episode_stats_threshold_and_ignore():
    maps = torch.tensor([[[[0.9, 0.6], [0.2, 0.7]]]])
    mask = torch.tensor([[[1, 0], [1, 255]]])
    st = map_episode_stats(maps, mask)[0]
    # prediction (valid pixels): {(0,0), (0,1)}; foreground {(0,0), (1,0)}
    assert (st["inter"], st["union"]) == (1, 3)
    assert st["auc"] == pytest.approx(_auc_pairs(np.array([0.9, 0.2, 0.6]), np.array([1, 1, 0])))


def _tiny_synthetic_cfg(name="dpcn"):
    return load_config("synthetic", [f"model.name={name}", "model.backbone_weights=random", "model.flags.reduce_dim=8",
                                     "model.flags.decoder_dim=8", "train.val_episodes=4", "data.num_workers=0",
                                     "data.args={image_size: 48}", "data.val_args={image_size: 48}",
                                     "data.test_size=48"])


def test_diagnose_tiny_random_dpcn_and_baseline():
    from benchmarks.engine import build_model_from_config
    for name, expect in (("dpcn", {"pfenet_prior", "sam_5x1", "sam_3x3", "sam_1x5", "M0", "Mr"}),
                         ("baseline", {"pfenet_prior"})):
        cfg = _tiny_synthetic_cfg(name)
        torch.manual_seed(0)
        model = build_model_from_config(cfg).eval()
        r = diagnose(model, cfg, batch_size=2)
        assert r["episodes"] == 4
        own = r["variants"]["own"]
        assert set(own) == expect
        for v in own.values():
            assert 0.0 <= v["iou"] <= 100.0 and (np.isnan(v["auc"]) or 0.0 <= v["auc"] <= 1.0)
        assert "skipped" in r["variants"]["imagenet"]  # random backbone weights: no reference layer4
        assert model.training is False


def test_maps_are_the_networks_own_and_the_prior_is_sam_1x1():
    """The maps the diagnosis scores are those of the network's forward; PFENet's prior is what DPCN with
    SAM off uses as M⁰ (SAM with the single window (1, 1))."""
    from benchmarks.datasets import collate_episodes
    from benchmarks.scoring.prior_maps import maps_of_batch, upsample
    from benchmarks.engine import build_model_from_config, eval_factory, eval_protocol
    cfg = _tiny_synthetic_cfg("dpcn")
    p = eval_protocol(cfg, validation=True)
    batch = collate_episodes([eval_factory(cfg)(p, p.seeds[0], p.scales[0])[i] for i in range(2)])
    q, s, sm = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    for flags in ({}, {"use_sam": False}):
        torch.manual_seed(0)
        model = build_model_from_config({**cfg, "model": {**cfg["model"], "flags": {**cfg["model"]["flags"], **flags}}})
        model.eval()
        maps = maps_of_batch(model, batch, "cpu")
        with torch.no_grad():
            r = model(q, s, sm)
        size = q.shape[-2:]
        assert torch.allclose(maps["Mr"], upsample(r["refined_pseudo_mask"], size), atol=1e-5)
        if flags:
            assert torch.allclose(maps["pfenet_prior"], upsample(r["initial_pseudo_mask"], size), atol=1e-5)
        else:
            assert torch.allclose(maps["M0"], upsample(r["initial_pseudo_mask"], size), atol=1e-5)
            assert torch.allclose(maps["sam_3x3"], upsample(r["activation_maps"][:, 1:2], size), atol=1e-5)


# ------------------------------------------------------------------------------ a tiny VOC folder and its pack
def _voc(root, n=60, size=64, seed=0):
    from PIL import Image
    rng = random.Random(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir(parents=True)
    for i in range(n):
        stem = f"2008_{i:06d}"
        mask = np.zeros((size, size), np.uint8)
        mask[2:34, 2:32] = 6 + i % 5           # a fold-1 novel class (960 px)
        mask[34:62, 30:62] = 11 + (i // 5) % 5  # a base class
        mask[0, :] = 255
        m = mask.astype(int)
        img = np.stack([m * 9 % 256, (m * 37 + i) % 256, np.full_like(m, rng.randrange(256))], -1)
        img = np.clip(img.astype(int) + np.array([rng.randrange(-20, 20) for _ in range(3)]), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        p = Image.fromarray(mask, mode="L").convert("P")
        p.save(root / "SegmentationClassAug" / f"{stem}.png")
    return root


@pytest.fixture
def voc(tmp_path):
    return _voc(tmp_path / "VOC2012")


def test_pack_round_trip_verify_and_tamper(voc, tmp_path):
    from PIL import Image
    ck = tmp_path / "lite0.pth"
    torch.save({"_blocks.0.w": torch.randn(3, 5), "_bn0.running_var": torch.rand(7), "_fc.weight": torch.randn(4, 4),
                "_conv_head.weight": torch.randn(2)}, ck)
    dst = tmp_path / "pack"
    m = GM.make_pack(voc, dst, weights=str(ck), echo=None)
    assert m["source_images"] == 60 and GM.verify_pack(dst)["pack_sha256"] == m["pack_sha256"]
    for stem in ("2008_000000", "2008_000031"):
        a = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{stem}.png"))
        b = np.asarray(Image.open(dst / "VOC2012" / "SegmentationClassAug" / f"{stem}.png"))
        assert np.array_equal(a, b)
        x = np.asarray(Image.open(voc / "JPEGImages" / f"{stem}.jpg").convert("RGB")).astype(float)
        y = np.asarray(Image.open(dst / "VOC2012" / "JPEGImages" / f"{stem}.jpg").convert("RGB")).astype(float)
        assert x.shape == y.shape and np.abs(x - y).mean() < 12
    # the weights come back exactly, without the classifier head
    w = GM.unpack_weights(dst, tmp_path / "work")
    sd = torch.load(w, weights_only=True)
    assert set(sd) == {"_blocks.0.w", "_bn0.running_var"}
    assert torch.equal(sd["_blocks.0.w"], torch.load(ck, weights_only=True)["_blocks.0.w"])
    # tampering, a missing file and an extra file are all caught
    f = dst / "VOC2012" / "JPEGImages" / "2008_000003.jpg"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(GM.MatrixError, match="differ"):
        GM.verify_pack(dst)
    f.unlink()
    with pytest.raises(GM.MatrixError, match="missing"):
        GM.verify_pack(dst)
    with pytest.raises(GM.MatrixError, match="over the"):
        GM.make_pack(voc, tmp_path / "pack2", weights="none", max_mib=0.01, echo=None)


# ------------------------------------------------------------------------------ plan
def test_plan_order_and_recipe_check():
    plan = GM.make_plan()
    ids = [u["id"] for u in plan["units"]]
    assert len(ids) == 27 == len(set(ids))
    assert ids[:3] == ["baseline_f1_seed0", "dpcn_f1_seed0", "dpcn_nodcm_f1_seed0"]
    assert ids[3] == "baseline_f2_seed0" and ids[-1] == "dpcn_nodcm_f3_seed2"
    GM.check_plan_recipe(plan)
    committed = GM.load_plan(GM.DEFAULT_OUT / "plan.json")
    assert [u["id"] for u in committed["units"]] == ids and committed["arms"] == list(GM.ARMS)
    bad = dict(plan, recipe_config_sha256="0" * 64)
    with pytest.raises(GM.MatrixError, match="changed"):
        GM.check_plan_recipe(bad)


# ------------------------------------------------------------------------------ the runner's logic
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


class _FakeUnit:
    """A unit process: finishes ``duration`` simulated seconds after its start (writing its files)."""

    def __init__(self, clock, out, uid, duration, rc=0):
        self.clock, self.out, self.uid, self.rc = clock, out, uid, rc
        self.end = clock() + duration
        self.terminated = False

    def poll(self):
        if self.terminated:
            return -15
        if self.clock() >= self.end:
            if self.rc == 0 and not GM.is_done(self.out, self.uid):
                _write_unit(self.out, self.uid)
            return self.rc
        return None

    def terminate(self):
        self.terminated = True

    def kill(self):
        self.terminated = True

    def wait(self, timeout=None):
        return -15


def _write_unit(out, uid, **extra):
    GM.atomic_write_text(GM.sealed_file(out, uid), json.dumps({"id": uid, "split": "test"}))
    GM.atomic_write_text(GM.unit_file(out, uid), json.dumps({"id": uid, "wall_s": 100.0, **extra}))


def _plan(n=5):
    return {"units": [{"id": f"u{i}", "arm": "dpcn", "fold": 1, "seed": i} for i in range(n)]}


def test_run_plan_skips_done_units_and_stops_before_the_budget(tmp_path):
    out, clock = tmp_path / "out", _Clock()
    _write_unit(out, "u0")
    launched = []

    def launch(u):
        launched.append(u["id"])
        return _FakeUnit(clock, out, u["id"], 100)

    export = tmp_path / "OUT" / "units.jsonl"
    s = GM.run_plan(_plan(), out, budget_s=260, launch=launch, estimate_s=100, margin_s=10, export=export,
                    log=lambda m: None, clock=clock, sleep=clock.sleep, poll_s=5)
    assert launched == ["u1", "u2"]  # u0 was done; u3 would not finish before 250 s
    assert s["finished"] == ["u1", "u2"] and s["not_started"] == ["u3", "u4"] and s["remaining"] == 2
    lines = [json.loads(x) for x in export.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["u1", "u2"] and lines[0]["sealed_test"]["split"] == "test"
    # the next session continues with the rest
    clock2 = _Clock()
    s2 = GM.run_plan(_plan(), out, budget_s=1000, parallel=2,
                     launch=lambda u: launched.append(u["id"]) or _FakeUnit(clock2, out, u["id"], 100),
                     estimate_s=100, margin_s=10, log=lambda m: None, clock=clock2, sleep=clock2.sleep, poll_s=5)
    assert launched[2:] == ["u3", "u4"] and s2["remaining"] == 0 and s2["seconds"] <= 110


def test_run_plan_stops_a_unit_at_the_margin_and_keeps_it_pending(tmp_path):
    out, clock = tmp_path / "out", _Clock()
    units = {}

    def launch(u):
        units[u["id"]] = _FakeUnit(clock, out, u["id"], 10_000)
        return units[u["id"]]

    s = GM.run_plan(_plan(2), out, budget_s=300, launch=launch, estimate_s=100, margin_s=20, log=lambda m: None,
                    clock=clock, sleep=clock.sleep, poll_s=5)
    assert s["stopped"] == ["u0"] and s["finished"] == [] and units["u0"].terminated
    assert 280 <= s["seconds"] <= 290 and not GM.is_done(out, "u0")
    assert s["not_started"] == ["u1"]  # 280 s in, a 100-s unit no longer fits


def test_run_plan_admits_by_the_running_units_projection(tmp_path):
    out, clock = tmp_path / "out", _Clock()
    launched = []

    def launch(u):
        launched.append(u["id"])
        return _FakeUnit(clock, out, u["id"], 200)

    # a running unit projects 400 s: at 200 s (when a slot frees) a second one would end after the budget
    s = GM.run_plan(_plan(3), out, budget_s=500, launch=launch, estimate_s=100, margin_s=10, log=lambda m: None,
                    clock=clock, sleep=clock.sleep, poll_s=5, progress=lambda uid, el: {"projected_s": 400.0},
                    progress_every_s=10)
    assert launched == ["u0"] and s["finished"] == ["u0"] and s["not_started"] == ["u1", "u2"]
    assert GM.project_unit_seconds(100, 500, 3000, 10.0, True) == pytest.approx(100 + 1.15 * 250 + 30)
    assert GM.project_unit_seconds(100, 500, 3000, 10.0, False, 1500) == pytest.approx(
        100 + 1.15 * (2500 + 0.6 * 1500) / 10 + 30)


def test_run_plan_failures_stop_new_units_and_update_nothing(tmp_path):
    out, clock = tmp_path / "out", _Clock()
    launched = []

    def launch(u):
        launched.append(u["id"])
        return _FakeUnit(clock, out, u["id"], 3, rc=1)

    export = tmp_path / "units.jsonl"
    s = GM.run_plan(_plan(5), out, budget_s=1000, launch=launch, estimate_s=100, log=lambda m: None, export=export,
                    clock=clock, sleep=clock.sleep, poll_s=5)
    assert launched == ["u0", "u1"] and [f["id"] for f in s["failed"]] == ["u0", "u1"]
    assert not export.exists() and s["remaining"] == 5


def test_estimate_from_committed_units(tmp_path):
    out = tmp_path / "out"
    assert GM.default_estimate(out, 321.0) == 321.0
    _write_unit(out, "a")
    GM.atomic_write_text(GM.unit_file(out, "b"), json.dumps({"id": "b", "wall_s": 999.0, "rehearse": True}))
    assert GM.default_estimate(out) == pytest.approx(110.0)


def test_import_is_idempotent_and_refuses_conflicts_and_rehearsals(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write_unit(src, "u1", val=1)
    line = GM.export_line(src, "u1")
    f = tmp_path / "units.jsonl"
    f.write_text(line + "\n" + line[:40] + "\n")  # a line cut by a kill is skipped
    plan = _plan(3)
    assert GM.import_lines(f, dst, plan=plan, echo=lambda m: None)["added"] == ["u1"]
    assert json.loads(GM.unit_file(dst, "u1").read_text())["val"] == 1 and GM.sealed_file(dst, "u1").is_file()
    assert GM.import_lines(f, dst, plan=plan, echo=lambda m: None)["same"] == ["u1"]
    _write_unit(src, "u1", val=2)
    f.write_text(GM.export_line(src, "u1") + "\n")
    with pytest.raises(GM.MatrixError, match="another result"):
        GM.import_lines(f, dst, plan=plan, echo=lambda m: None)
    _write_unit(src, "u2", rehearse=True)
    f.write_text(GM.export_line(src, "u2") + "\n")
    with pytest.raises(GM.MatrixError, match="rehearsal"):
        GM.import_lines(f, dst, plan=plan, echo=lambda m: None)


# ------------------------------------------------------------------------------ report and the decision rule
def _row(miou, seed):
    rng = np.random.default_rng(seed)
    cls = [6, 7, 8] * 4
    inter = rng.integers(10, 50, len(cls)).tolist()
    union = [i + int(rng.integers(20, 60)) for i in inter]
    return {"miou": miou, "fbiou": miou + 10, "class_iou": {"6": miou, "7": miou, "8": miou},
            "class_names": {"6": "bus", "7": "car", "8": "cat"},
            "per_seed": [{"class_iou": {"6": miou}, "episodes_per_class": {"6": 4, "7": 4, "8": 4},
                          "images_per_class": {"6": 3, "7": 4, "8": 4},
                          "episode_records": {"class": cls, "query": [f"q{i % 4}" for i in range(len(cls))],
                                              "inter": inter, "union": union}}]}


def test_report_tabulates_and_applies_the_rule(tmp_path, capsys):
    out = tmp_path / "gm"
    plan = GM.make_plan(seeds=(0, 1))
    GM.atomic_write_text(out / "plan.json", json.dumps(plan))
    gain = {"baseline": 0.0, "dpcn[nodcm]": 2.0, "dpcn": 5.0}
    for u in plan["units"]:
        m = 40.0 + gain[u["arm"]] + 0.3 * u["seed"] + u["fold"]
        hist = [{"epoch": e, "val_miou": m - 3 + e, "layer4": e > 2} for e in range(1, 4)]
        GM.atomic_write_text(GM.unit_file(out, u["id"]), json.dumps(
            {"id": u["id"], "wall_s": 100, "train_s": 90, "device": "cpu", "torch": "x", "history": hist,
             "best": {"miou": m, "epoch": 3}, "val": {"protocol_text": "val", "row": _row(m, u["seed"])},
             "prior": {"variants": {"own": {"pfenet_prior": {"iou": 20.0, "auc": 0.7}}}}}))
        GM.atomic_write_text(GM.sealed_file(out, u["id"]), json.dumps({"row": _row(m, 0), "protocol_text": "test"}))
    assert GM.main(["report", "--out", str(out)]) == 0
    js = json.loads((out / "table_val.json").read_text())
    dec = js["decision"]
    assert dec["complete"] and dec["dpcn_minus_baseline"]["mean"] == pytest.approx(5.0)
    assert dec["dpcn_minus_nodcm"]["met"] and dec["met"] and js["label"] == "exploratory"
    md = (out / "table_val.md").read_text()
    assert "still rising" in md and "dpcn_f1_seed0" in md and "rule MET" in md
    # the test split is not read before a committed decision
    assert GM.main(["report", "--out", str(out), "--split", "test"]) == 2
    # an incomplete matrix decides nothing
    GM.unit_file(out, "dpcn_f3_seed1").unlink()
    GM.main(["report", "--out", str(out)])
    dec = json.loads((out / "table_val.json").read_text())["decision"]
    assert not dec["complete"] and not dec["met"]
    capsys.readouterr()


def test_curve_rising():
    assert GM.curve_rising([{"val_miou": 1}, {"val_miou": 2}, {"val_miou": 3}])
    assert not GM.curve_rising([{"val_miou": 1}, {"val_miou": 3}, {"val_miou": 3.2}])
    assert GM.curve_rising([{"val_miou": 1}]) is None


# ------------------------------------------------------------------------------ one tiny unit, end to end
def test_tiny_unit_end_to_end(voc, tmp_path, monkeypatch):
    monkeypatch.setenv("DCM_CACHE_DIR", str(tmp_path / "cache"))
    pack = tmp_path / "pack"
    GM.make_pack(voc, pack, weights="none", echo=None)
    plan = GM.make_plan()
    out = tmp_path / "out"
    n = torch.get_num_threads()
    try:
        rec = GM.run_unit(plan, "dpcn_f1_seed0", pack, out, tmp_path / "work", rehearse=True, echo=lambda m: None)
    finally:
        torch.set_num_threads(n)
    assert rec["rehearse"] and rec["iterations"] == 4 and len(rec["history"]) == 2
    assert [h["layer4"] for h in rec["history"]] == [False, True]  # frozen, then trained
    assert GM.is_done(out, "dpcn_f1_seed0") and GM.sealed_file(out, "dpcn_f1_seed0").is_file()
    assert {"pfenet_prior", "M0", "Mr"} <= set(rec["prior"]["variants"]["own"])
    assert rec["val"]["row"]["per_seed"][0]["episode_records"]["inter"]
    line = json.loads(GM.export_line(out, "dpcn_f1_seed0"))
    assert line["unit"]["id"] == "dpcn_f1_seed0" and line["sealed_test"]["split"] == "test"
