"""The training/evaluation engine: config, schedule, sampler, learning, checkpoints, resume, DDP (CPU)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.engine.config import CONFIG_DIR, ConfigError, DEFAULTS, apply_overrides, load_config
from benchmarks.engine import (PolyLR, ResumableDistributedSampler, Trainer, TrainingInterrupted,
                               build_model_from_config, eval_protocol, load_checkpoint_model, train)
from benchmarks.engine.fusion import _fuse

from _scripts import ROOT, tiny

# a tiny, fast recipe: DPCN on 32-px synthetic images, random Lite0 backbone, 8-channel head
TINY = tiny(2, "run.progress=false", "run.log_every=1")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*extra):
    return load_config("synthetic", TINY + list(extra))


def quiet(*_):
    pass


# ----------------------------------------------------------------------------- config
def test_config_defaults_overrides_and_types():
    cfg = load_config(None, ["train.lr=0.02", "model.dcm.kernel_size=3", "model.flags.reduce_dim=8", "eval.seeds=[1, 2]",
                             "run.name=x"])
    assert cfg["train"]["lr"] == 0.02 and cfg["train"]["momentum"] == 0.9
    assert cfg["model"]["dcm"] == {"kernel_size": 3} and cfg["model"]["flags"] == {"reduce_dim": 8}
    assert cfg["eval"]["seeds"] == [1, 2]
    assert DEFAULTS["train"]["lr"] == 0.005  # overrides never touch the defaults


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", ["train.lrr", "train.lr"]),
    ("trian.lr=1", ["trian", "did you mean 'train'"]),
    ("train.epochs=0", ["train.epochs", "positive"]),
    ("train.lr", ["key=value"]),
    ("eval.fusion=max", ["eval.fusion"]),
    ("data.dataset=pascal", ["data.root"]),
])
def test_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_every_recipe_loads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"synthetic", "dpcn_pascal", "dpcn_coco", "pfenet_pascal", "canet_pascal"} <= set(names)
    for n in names:
        cfg = load_config(n, ["data.root=/data"])
        assert cfg["train"]["momentum"] == 0.9 and cfg["model"]["name"]
    p = load_config("dpcn_pascal", ["data.root=/d"])
    assert (p["train"]["lr"], p["train"]["batch_size"], p["train"]["epochs"], p["data"]["train_size"]) == (0.005, 8, 200, 473)
    assert p["train"]["weight_decay"] == 1e-4 and p["train"]["power"] == 0.9 and p["train"]["finetune_layer4"]
    c = load_config("dpcn_coco", ["data.root=/d"])
    assert (c["train"]["lr"], c["train"]["batch_size"], c["train"]["epochs"], c["data"]["train_size"]) == (0.002, 32, 50, 473)
    assert not c["train"]["finetune_layer4"]


def test_base_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: 0.3\n  epochs: 7\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg["train"]["lr"], cfg["train"]["epochs"]) == (0.3, 9)
    (tmp_path / "c.yaml").write_text("_base_: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_recipe")


# ----------------------------------------------------------------------------- schedule, sampler, fusion
class _HandWrittenPolyLR:
    """The poly schedule as the engine had it before ``PolyLR`` became a ``LambdaLR`` (verbatim), the reference
    the new class must match and whose checkpoints it must resume."""

    def __init__(self, optimizer, max_iters, power=0.9, warmup_iters=0):
        self.optimizer = optimizer
        self.max_iters = max(1, int(max_iters))
        self.power = float(power)
        self.warmup_iters = int(warmup_iters)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, b in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = b
        self.last_iter = 0

    def factor(self, it):
        f = max(0.0, 1.0 - min(it, self.max_iters) / self.max_iters) ** self.power
        if self.warmup_iters and it <= self.warmup_iters:
            f *= it / self.warmup_iters
        return f

    def step(self):
        self.last_iter += 1
        f = self.factor(self.last_iter)
        for g, b in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = b * f

    def state_dict(self):
        return {"max_iters": self.max_iters, "power": self.power, "warmup_iters": self.warmup_iters,
                "base_lrs": list(self.base_lrs), "last_iter": self.last_iter}


def _two_group_sgd(lr=0.01):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr},
                            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr / 10}], lr=lr, momentum=0.9)


def _literal_lr(base, it, max_iters, power, warmup):
    """PFENet's poly_learning_rate, it counted from 1, times the linear warmup."""
    lr = base * (1 - min(it, max_iters) / max_iters) ** power
    return lr * it / warmup if warmup and it <= warmup else lr


def _lrs(opt):
    return [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize("max_iters, power, warmup", [(20, 0.9, 0), (20, 0.9, 5), (7, 1.0, 3), (30, 2.0, 30)])
def test_poly_lr_is_pfenets_formula_and_the_old_schedule(max_iters, power, warmup):
    """Iteration by iteration (and past the end): LambdaLR-based PolyLR == the literal formula == the old class,
    stepped before the optimizer step (no warning about that order)."""
    import warnings
    opt, old_opt = _two_group_sgd(), _two_group_sgd()
    s, old = PolyLR(opt, max_iters, power, warmup), _HandWrittenPolyLR(old_opt, max_iters, power, warmup)
    assert isinstance(s, torch.optim.lr_scheduler.LambdaLR)
    assert _lrs(opt) == _lrs(old_opt) == [0.01, 0.001]  # built: the base lr, like the old class
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for it in range(1, max_iters + 3):
            s.step()
            old.step()
            opt.step()
            assert s.last_iter == s.last_epoch == it
            assert _lrs(opt) == _lrs(old_opt) == s.get_last_lr(), it  # bit-identical to the old class
            for got, base in zip(_lrs(opt), (0.01, 0.001)):
                assert math.isclose(got, _literal_lr(base, it, max_iters, power, warmup), rel_tol=1e-12, abs_tol=1e-15)
    assert _lrs(opt) == [0.0, 0.0]


@pytest.mark.parametrize("old_format", [False, True])
def test_poly_lr_resumes_mid_run(tmp_path, old_format):
    """state_dict -> torch.save -> a fresh optimizer + PolyLR -> load_state_dict at iteration 6 continues with the
    uninterrupted lrs; ``old_format``: the state was written by the hand-written class (checkpoints before the
    switch to LambdaLR), and its schedule parameters win over the new constructor's, as they did."""
    max_iters, power, warmup = 15, 0.9, 4
    ref_opt = _two_group_sgd()
    ref = PolyLR(ref_opt, max_iters, power, warmup)
    expect = []
    for _ in range(max_iters):
        ref.step()
        expect.append(_lrs(ref_opt))
    opt = _two_group_sgd()
    first = (_HandWrittenPolyLR if old_format else PolyLR)(opt, max_iters, power, warmup)
    for _ in range(6):
        first.step()
        opt.step()
    assert _lrs(opt) == expect[5]
    torch.save({"optimizer": opt.state_dict(), "scheduler": first.state_dict()}, tmp_path / "ck.pth")
    ck = torch.load(tmp_path / "ck.pth", weights_only=False)
    assert ("last_iter" in ck["scheduler"]) == old_format
    opt2 = _two_group_sgd()
    s2 = PolyLR(opt2, max_iters=99, power=0.5, warmup_iters=0)  # a different schedule: the checkpoint's is used
    opt2.load_state_dict(ck["optimizer"])
    s2.load_state_dict(ck["scheduler"])
    assert (s2.max_iters, s2.power, s2.warmup_iters, s2.last_iter) == (max_iters, power, warmup, 6)
    assert s2.get_last_lr() == _lrs(opt2) == expect[5]
    for it in range(7, max_iters + 1):
        s2.step()
        assert _lrs(opt2) == expect[it - 1], it
    assert PolyLR(_two_group_sgd(), 3).state_dict()["lr_lambdas"] == [{"max_iters": 3, "power": 0.9, "warmup_iters": 0}] * 2


def test_sampler_splits_and_resumes():
    data = list(range(11))
    a = list(ResumableDistributedSampler(data, 2, 0))
    b = list(ResumableDistributedSampler(data, 2, 1))
    assert len(a) == len(b) == 6 and set(a) | set(b) == set(data)
    s = ResumableDistributedSampler(data, 1, 0)
    s.set_start(4)
    assert list(s) == list(range(4, 11)) and len(s) == 7


def test_fusion_strategies():
    probs = torch.tensor([[[[0.9, 0.2]]], [[[0.6, 0.4]]], [[[0.1, 0.7]]]])  # K=3, B=1, 1x2
    assert _fuse(probs, "vote").squeeze().tolist() == pytest.approx([2 / 3, 1 / 3])
    assert _fuse(probs, "average").squeeze().tolist() == pytest.approx([1.6 / 3, 1.3 / 3])
    assert _fuse(probs, "or").squeeze().tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="fusion"):
        _fuse(probs, "max")


# ----------------------------------------------------------------------------- training
def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_learns_beyond_the_no_training_reference(tmp_path):
    """2 short epochs (120 iterations) of DPCN (ImageNet Lite0, the demo recipe at 64 px, 1-2 objects per image)
    clearly beat both no-training references (measured: 27.7 vs 7.9 / 7.4 mIoU)."""
    cfg = load_config("synthetic", [
        "data.args={image_size: 64, num_images: 300, objects: [1, 2]}", "data.train_episodes=480", "model.flags.reduce_dim=32",
        "model.flags.decoder_dim=32", "train.epochs=2", "train.val_episodes=100", "eval.episodes=100",
        "run.progress=false"])
    out = train(cfg, tmp_path / "run", echo=quiet)
    rows = {r["label"]: r for r in out["results"]["rows"]}
    trained = next(v for k, v in rows.items() if k.startswith("trained"))
    untrained = next(v for k, v in rows.items() if "untrained" in k)
    prior = next(v for k, v in rows.items() if "prior" in k)
    assert trained["miou"] > untrained["miou"] + 10, rows
    assert trained["miou"] > prior["miou"] + 10, rows
    for f in ("config.yaml", "log.jsonl", "last.pth", "best.pth", "results.json"):
        assert (tmp_path / "run" / f).is_file(), f
    assert not list((tmp_path / "run").glob("*.tmp"))
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events.count("epoch") == 2 and "eval" in events and events[-1] == "end"
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved == cfg


def test_resume_mid_epoch_gives_bitwise_identical_weights(tmp_path):
    cfg = tiny("train.checkpoint_every_iters=2", "model.flags={reduce_dim: 8, decoder_dim: 8, reduce_dropout: 0.5}")
    full = Trainer(cfg, tmp_path / "full", echo=quiet)
    full.fit()
    ref = _params(full.model)

    # "kill" after 7 iterations of 4 per epoch: the last checkpoint is epoch 2, iteration 2
    t = Trainer(cfg, tmp_path / "cut", stop_after_iters=7, echo=quiet)
    with pytest.raises(TrainingInterrupted):
        t.fit()
    ck = torch.load(tmp_path / "cut" / "last.pth", weights_only=False)
    assert (ck["epoch"], ck["iter_in_epoch"]) == (1, 2)
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, echo=quiet)
    resumed.fit()
    got = _params(resumed.model)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert resumed.global_step == full.global_step == 8
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    # the same checkpoint with the scheduler state the hand-written PolyLR wrote: same weights
    sch = ck["scheduler"]
    ck["scheduler"] = {"max_iters": sch["lr_lambdas"][0]["max_iters"], "power": sch["lr_lambdas"][0]["power"],
                       "warmup_iters": sch["lr_lambdas"][0]["warmup_iters"], "base_lrs": sch["base_lrs"],
                       "last_iter": sch["last_epoch"]}
    torch.save(ck, tmp_path / "old_format.pth")
    resumed_old = Trainer(cfg, tmp_path / "cut_old", resume=tmp_path / "old_format.pth", echo=quiet)
    resumed_old.fit()
    for k, v in _params(resumed_old.model).items():
        assert torch.equal(ref[k], v), k
    assert resumed_old.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    # epoch-end resume too
    t2 = Trainer(cfg, tmp_path / "cut2", stop_after_iters=4, echo=quiet)
    with pytest.raises(TrainingInterrupted):
        t2.fit()
    r2 = Trainer(cfg, tmp_path / "cut2", resume=True, echo=quiet)
    r2.fit()
    for k, v in _params(r2.model).items():
        assert torch.equal(ref[k], v), k


def test_layer4_frozen_then_trained(tmp_path):
    cfg = tiny("train.finetune_layer4=true", "train.layer4_start_epoch=1", "train.layer4_lr_scale=0.5",
               "train.val_every=5")
    t = Trainer(cfg, tmp_path / "r", echo=quiet)
    l4 = list(t.model.backbone.high_level_parameters())
    before = [p.detach().clone() for p in l4]
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert set(groups) == {"head", "layer4"}
    assert groups["layer4"]["initial_lr"] == pytest.approx(0.5 * groups["head"]["initial_lr"])
    t.cfg["train"]["epochs"] = t.epochs = 1
    t.fit()  # epoch 0: layer4 frozen
    assert all(torch.equal(a, p) for a, p in zip(before, l4)) and not any(p.requires_grad for p in l4)
    t2 = Trainer(cfg, tmp_path / "r", resume=True, echo=quiet)
    t2.fit()  # epoch 1: trained
    l4b = list(t2.model.backbone.high_level_parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, l4b)) and all(p.requires_grad for p in l4b)
    mid = [p for p in t2.model.backbone.mid_level_parameters()]
    assert not any(p.requires_grad for p in mid)


def test_checkpoint_reload_and_eval_protocol(tmp_path):
    cfg = tiny("train.epochs=1", "eval.reference=untrained")
    out = train(cfg, tmp_path / "r", echo=quiet)
    model, saved = load_checkpoint_model(tmp_path / "r" / "best.pth")
    assert saved["model"] == cfg["model"] and not model.training
    p = eval_protocol(saved)
    assert (p.dataset, p.fold, p.shot, p.episodes, p.scales) == ("synthetic", 0, 1, 8, (32,))
    v = eval_protocol(saved, validation=True)
    assert v.seeds == (123,) and v.episodes == 8
    res = out["results"]
    assert res["rows"][0]["label"].startswith("no training") and res["rows"][-1]["label"].startswith("trained")
    with pytest.raises(FileNotFoundError):
        load_checkpoint_model(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="layer4_trainable"):
        build_model_from_config(apply_overrides(cfg, ["model.flags.layer4_trainable=true"]))


def test_bad_batch_size_is_explained(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny("train.batch_size=64"), tmp_path / "r", echo=quiet)


# ----------------------------------------------------------------------------- DDP on CPU (gloo, 2 processes)
def test_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "train_dpcn.py"), "--device", "cpu", "--out", str(tmp_path), "--name", "ddp",
           "--set", "train.batch_size=2"] + [a for o in TINY if not o.startswith("train.batch_size") for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    start = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["iters_per_epoch"] == 4  # 16 episodes / 2 processes / batch 2
    assert start["ddp_find_unused_parameters"] is False  # DPCN uses every trainable parameter
    assert (run / "results.json").is_file() and (run / "best.pth").is_file()
    assert "trained dpcn" in p.stdout


class _Branchy(torch.nn.Module):
    """A trainable branch that the loss never uses, dropout and BatchNorm (state the probe must leave alone)."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Conv2d(3, 2, 1)
        self.bn = torch.nn.BatchNorm2d(2)
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, x):
        return torch.nn.functional.dropout(self.bn(self.used(x)), 0.5, self.training).mean()


def test_unused_parameter_probe_leaves_no_trace():
    from benchmarks.engine import DistInfo, ddp_find_unused_parameters, unused_parameters
    m = _Branchy().eval()
    x = torch.randn(2, 3, 4, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    assert unused_parameters(m, lambda net: net(x)) == ["unused.weight", "unused.bias"]
    assert all(p.grad is None for p in m.parameters()) and not m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BatchNorm statistics restored
    assert torch.equal(torch.get_rng_state(), rng)
    assert ddp_find_unused_parameters(m, lambda net: net(x), DistInfo(), torch.device("cpu")) is True
    m.unused.requires_grad_(False)
    assert ddp_find_unused_parameters(m, lambda net: net(x), DistInfo(), torch.device("cpu")) is False
    m.ddp_find_unused_parameters = True  # a network's own answer wins over the probe
    assert ddp_find_unused_parameters(m, lambda net: None, DistInfo(), torch.device("cpu")) is True


@pytest.mark.parametrize("name, layer4, unused", [("dpcn", True, False), ("canet", False, False), ("canet", True, True)])
def test_which_networks_leave_parameters_without_gradient(name, layer4, unused):
    """The measurement behind find_unused_parameters (benchmarks/engine/distributed.py): CANet never uses layer4."""
    from benchmarks.engine import unused_parameters
    from models import build_model
    torch.manual_seed(0)
    m = build_model(name, backbone="efficientnet_lite0", shot=1, backbone_weights="random")
    if layer4:
        m.backbone.set_layer4_trainable(True)
    q, s = torch.rand(2, 3, 32, 32), torch.rand(2, 1, 3, 32, 32)
    sm = torch.zeros(2, 1, 32, 32)
    sm[..., 8:24, 8:24] = 1
    qm = torch.zeros(2, 32, 32, dtype=torch.long)
    qm[:, 10:20, 10:20] = 1
    names = unused_parameters(m, lambda net: net(q, s, sm, query_mask=qm)["loss"])
    assert bool(names) == unused, names
    assert all(n.startswith("backbone.") for n in names)


def test_engine_package_keeps_every_name_and_loads_checkpoints_without_the_trainer():
    import benchmarks.engine as engine
    used_elsewhere = [  # every name imported from benchmarks.engine in the repository
        "default_run_name", "TrainingInterrupted", "ValidationFailed", "train", "short_error", "exit_process",
        "load_checkpoint_model", "resolve_device", "test_size", "PolyLR", "ResumableDistributedSampler", "Trainer",
        "build_model_from_config", "eval_protocol", "eval_factory", "evaluate_fusions", "evaluate_model",
        "make_fusions_predict_fn", "DistInfo", "all_ranks_finite", "json_default", "build_train_dataset",
        "seed_everything", "evaluate_reference", "amp_context", "unwrap", "teardown", "first_line", "atomic_save",
        "strip_module_prefix", "rng_state", "set_rng_state", "format_table", "RunLogger", "has_prior",
        "init_distributed", "make_predict_fn", "evaluate_run", "finite_json"]
    assert not [n for n in engine._EXPORTS if n.startswith("_")]  # private names stay in their modules
    for n in used_elsewhere + engine.__all__:
        assert getattr(engine, n) is not None, n
    with pytest.raises(AttributeError):
        engine.no_such_name
    code = ("import sys; from benchmarks.engine import load_checkpoint_model, eval_protocol; "
            "assert 'benchmarks.engine.trainer' not in sys.modules, sorted(sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


class _ShotSensitive(torch.nn.Module):
    """A stand-in network whose prediction depends on which supports it sees (so fusions differ)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, q, s, sm, query_mask=None):
        frac = (sm == 1).float().flatten(2).mean(2).mean(1)  # support foreground fraction, shots averaged
        x = q[:, 0] - q[:, 0].mean((1, 2), keepdim=True)
        fg = self.w * 4 * x - 40 * (frac[:, None, None] - 0.15)
        return {"logits": torch.stack([torch.zeros_like(fg), fg], 1)}


def test_fusions_in_one_pass_equal_separate_evaluations():
    """evaluate_fusions (shared 1-shot forwards, one pass) == one evaluate_model call per strategy."""
    from benchmarks.engine import eval_factory, evaluate_fusions, evaluate_model
    cfg = tiny("model.shot=3", "eval.episodes=12")
    model = _ShotSensitive().eval()
    protocol = eval_protocol(cfg)
    assert protocol.shot == 3
    factory = eval_factory(cfg)
    fusions = ["native", "vote", "average", "or"]
    together = evaluate_fusions(model, protocol, factory, fusions, batch_size=4)
    assert list(together) == fusions
    assert len({round(r.miou, 6) for r in together.values()}) >= 3, {f: r.miou for f, r in together.items()}
    for f in fusions:
        alone = evaluate_model(model, protocol, factory, fusion=f, batch_size=5)
        assert together[f].miou == pytest.approx(alone.miou, abs=1e-9), f
        assert together[f].fbiou == pytest.approx(alone.fbiou, abs=1e-9), f
        assert together[f].class_iou == pytest.approx(alone.class_iou, abs=1e-9), f
    with pytest.raises(ValueError, match="fusion"):
        evaluate_fusions(model, protocol, factory, ["max"])


def test_fusion_predictions_literal():
    """Each strategy's foreground probability, computed literally from per-shot forwards."""
    from benchmarks.datasets import collate_episodes
    from benchmarks.engine import eval_factory, make_fusions_predict_fn
    cfg = tiny("model.shot=3", "eval.episodes=4")
    protocol = eval_protocol(cfg)
    ds = eval_factory(cfg)(protocol, protocol.seeds[0], protocol.scales[0])
    batch = collate_episodes([ds[i] for i in range(4)])
    model = _ShotSensitive().eval()
    out = make_fusions_predict_fn(model, ["native", "vote", "average", "or"])(batch)
    q, s, sm = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    with torch.no_grad():
        native = torch.softmax(model(q, s, sm)["logits"], 1)[:, 1]
        shots = [torch.softmax(model(q, s[:, k:k + 1], sm[:, k:k + 1])["logits"], 1)[:, 1] for k in range(3)]
    fg = [(p > 0.5).float() for p in shots]
    expect = {"native": native, "average": sum(shots) / 3, "vote": sum(fg) / 3,
              "or": torch.clamp(sum(fg), max=1.0)}
    for f, p in expect.items():
        got = torch.softmax(out[f], 1)[:, 1]
        assert torch.allclose(got, p.clamp(1e-6, 1 - 1e-6), atol=1e-5), f
    assert not torch.equal(out["vote"], out["or"])


# ----------------------------------------------------------------------------- failures that must not lose work
def test_failed_validation_keeps_the_epoch_and_resumes(tmp_path, monkeypatch):
    cfg = tiny()
    full = Trainer(cfg, tmp_path / "full", echo=quiet)
    full.fit()

    calls = {"n": 0}
    real = Trainer.validate

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("cannot read image '/data/broken.jpg'")
        return real(self)

    monkeypatch.setattr(Trainer, "validate", flaky)
    from benchmarks.engine import ValidationFailed
    t = Trainer(cfg, tmp_path / "cut", echo=quiet)
    with pytest.raises(ValidationFailed) as e:
        t.fit()
    assert "broken.jpg" in str(e.value) and "last.pth" in str(e.value) and "--resume" in str(e.value)
    ck = torch.load(tmp_path / "cut" / "last.pth", weights_only=False)
    assert ck["epoch"] == 1 and ck["pending_val"] and "val_miou" not in ck["history"][-1]
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, echo=quiet)
    resumed.fit()
    assert [h["val_miou"] for h in resumed.history] == [h["val_miou"] for h in full.history]
    for k, v in _params(resumed.model).items():
        assert torch.equal(v, _params(full.model)[k]), k


def test_epoch_loss_after_a_mid_epoch_resume_is_the_uninterrupted_one(tmp_path):
    cfg = tiny("train.checkpoint_every_iters=2")
    full = Trainer(cfg, tmp_path / "full", echo=quiet)
    full.fit()
    t = Trainer(cfg, tmp_path / "cut", stop_after_iters=6, echo=quiet)
    with pytest.raises(TrainingInterrupted):
        t.fit()
    resumed = Trainer(cfg, tmp_path / "cut", resume=True, echo=quiet)
    resumed.fit()
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]


def test_deterministic_flag_enables_deterministic_algorithms_for_the_run(tmp_path):
    seen = {}
    real = Trainer.fit

    def spy(self):
        seen["during"] = torch.are_deterministic_algorithms_enabled()
        return real(self)

    before = torch.are_deterministic_algorithms_enabled()
    try:
        Trainer.fit = spy
        train(tiny("train.deterministic=true", "train.epochs=1"), tmp_path / "d", echo=quiet)
        assert seen["during"] is True
        assert torch.are_deterministic_algorithms_enabled() == before
        train(tiny("train.deterministic=false", "train.epochs=1"), tmp_path / "n", echo=quiet)
        assert seen["during"] is before
    finally:
        Trainer.fit = real


def _finite_worker(rank, port, values, out):
    import torch.distributed as dist
    from benchmarks.engine import DistInfo, all_ranks_finite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        res = [all_ranks_finite(torch.tensor(v[rank]), DistInfo(rank, 2, rank)) for v in values]
        out.put((rank, res))
    finally:
        dist.destroy_process_group()


def test_non_finite_loss_on_one_rank_is_skipped_by_every_rank():
    import socket
    import time as _time
    import torch.multiprocessing as mp
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    values = [(1.0, 2.0), (1.0, float("nan")), (float("inf"), 1.0), (3.0, 4.0)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_finite_worker, args=(r, port, values, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0] == got[1] == [True, False, False, True]


_NAN_ON_RANK1 = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import models.dpcn as dpcn
_forward = dpcn.DPCN.forward
calls = {{"n": 0}}
def forward(self, *a, **k):
    out = _forward(self, *a, **k)
    if self.training and "loss" in out:
        calls["n"] += 1
        if os.environ.get("RANK") == "1" and calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")  # one rank, one step
    return out
dpcn.DPCN.forward = forward
import runpy
sys.argv = ["train_dpcn.py"] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_ddp_non_finite_loss_on_one_rank_finishes(tmp_path):
    """Two gloo processes, the loss non-finite on rank 1 at its 2nd step: both skip that step and the run ends."""
    script = tmp_path / "nan_rank1.py"
    script.write_text(_NAN_ON_RANK1.format(root=str(ROOT), script=str(ROOT / "examples" / "train_dpcn.py")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--device", "cpu", "--out", str(tmp_path), "--name", "nan", "--no-eval", "--no-progress",
           "--set", "train.batch_size=2"] + [a for o in TINY if not o.startswith("train.batch_size") for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "step skipped on every process" in p.stderr
    epochs = [json.loads(ln) for ln in (tmp_path / "nan" / "log.jsonl").read_text().splitlines()
              if json.loads(ln)["event"] == "epoch"]
    assert len(epochs) == 2 and all(math.isfinite(e["train_loss"]) for e in epochs)
