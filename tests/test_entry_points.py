"""The scripts users run: train_dpcn.py, evaluate.py, plug_in.py, predict.py (subprocess, tiny settings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _scripts import ROOT, fails, ok, one_line_error, run, sets, tiny
SHARED = ROOT.parent / "shared" / "data"

TINY = tiny(1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run through the CLI; its folder (best.pth, config.yaml, ...)."""
    out = tmp_path_factory.mktemp("runs")
    p = run("examples/train_dpcn.py", "--out", out, "--name", "tiny", "--no-progress", *sets(TINY))
    stdout = ok(p)
    assert "trained dpcn" in stdout and "mIoU" in stdout and "FB-IoU" in stdout
    return out / "tiny"


def test_train_cli_writes_the_run(trained):
    for f in ("config.yaml", "log.jsonl", "last.pth", "best.pth", "results.json"):
        assert (trained / f).is_file(), f
    res = json.loads((trained / "results.json").read_text())
    assert res["protocol"]["episodes"] == 8 and "synthetic fold 0" in res["protocol_text"]


def test_train_cli_print_config_and_recipes():
    out = ok(run("examples/train_dpcn.py", "--print-config", "--lr", "0.123", "--fold", "2"))
    assert "lr: 0.123" in out and "fold: 2" in out and "dataset: synthetic" in out
    out = ok(run("examples/train_dpcn.py", "--print-config", "--dataset", "pascal", "--data-root", "/data/VOC2012"))
    assert "lr: 0.005" in out and "train_size: 473" in out and "name: dpcn" in out
    out = ok(run("examples/train_dpcn.py", "--print-config", "--model", "pfenet", "--dataset", "pascal",
                 "--data-root", "/d"))
    assert "lr: 0.0025" in out and "name: pfenet" in out


def test_one_rule_picks_the_recipe_without_config(tmp_path, monkeypatch):
    from benchmarks.engine.config import ConfigError, choose_recipe
    want = {(None, None): "synthetic", ("dpcn", "synthetic"): "synthetic", ("baseline", None): "synthetic",
            ("pfenet", None): "plug_in_pfenet_synthetic", ("canet+dcm", None): "plug_in_canet_synthetic",
            ("pfenet+dcm", "pascal"): "pfenet_pascal", ("baseline", "coco"): "dpcn_coco",
            ("canet", "pascal"): "canet_pascal", ("dpcn", "pascal"): "dpcn_pascal"}
    assert {k: choose_recipe(None, *k) for k in want} == want
    assert choose_recipe("my_recipe.yaml", "canet", "coco") == "my_recipe.yaml"  # --config as given
    with pytest.raises(ConfigError, match=r"no recipe configs/canet_coco\.yaml for canet on 'coco'; pass --config"):
        choose_recipe(None, "canet", "coco")
    with pytest.raises(ConfigError, match="unknown model 'dpcnn'"):
        choose_recipe(None, "dpcnn")
    # both commands use it: train_dpcn.py --model canet runs CANet's synthetic recipe ...
    out = ok(run("examples/train_dpcn.py", "--print-config", "--model", "canet"))
    assert "name: canet" in out and "epochs: 3" in out and "reference: none" in out
    # ... and plug_in.py asks it with its --config, --host and --dataset
    import benchmarks.plug_in as plug_in
    asked = []
    monkeypatch.setattr(plug_in, "choose_recipe", lambda *a: asked.append(a) or choose_recipe(*a))
    assert plug_in.main(["--host", "canet", "--report-only", "--out", str(tmp_path)]) == 2  # no runs to tabulate
    assert asked == [(None, "canet", None)]


def test_train_cli_bad_arguments(tmp_path):
    fails(run("examples/train_dpcn.py", "--model", "dpcnn", "--out", tmp_path, *sets(TINY)), "unknown model", "dpcnn")
    fails(run("examples/train_dpcn.py", "--set", "train.lrr=1"), "train.lrr", "train.lr")
    fails(run("examples/train_dpcn.py", "--dataset", "pascal"), "data.root")
    fails(run("examples/train_dpcn.py", "--config", "nope.yaml"), "nope.yaml")
    fails(run("examples/train_dpcn.py", "--resume", "--out", tmp_path, "--name", "none"), "last.pth")
    fails(run("examples/train_dpcn.py", "--dataset", "pascal", "--data-root", tmp_path / "missing",
              "--out", tmp_path), "missing")


def test_evaluate_cli_kshot_fusions(trained, tmp_path):
    js, md = tmp_path / "e.json", tmp_path / "e.md"
    out = ok(run("benchmarks/evaluate.py", "--checkpoint", trained / "best.pth", "--shot", "2", "--episodes", "6",
                 "--fusion", "native", "vote", "average", "or", "--reference", "prior", "--json", js, "--md", md,
                 "--no-progress"))
    for w in ("2-shot", "6 episodes", "dpcn [native]", "dpcn [vote]", "dpcn [average]", "dpcn [or]", "prior mask"):
        assert w in out, out
    rows = json.loads(js.read_text())["rows"]
    assert [r["label"] for r in rows][1:] == ["dpcn [native]", "dpcn [vote]", "dpcn [average]", "dpcn [or]"]
    assert all(r["protocol"]["shot"] == 2 for r in rows)
    assert "| dpcn [vote] |" in md.read_text()


def test_evaluate_cli_errors(tmp_path):
    fails(run("benchmarks/evaluate.py", "--checkpoint", tmp_path / "missing.pth"), "missing.pth", "not found")
    fails(run("benchmarks/evaluate.py"), "--checkpoint")


def test_plug_in_cli_tiny(tmp_path):
    args = ["benchmarks/plug_in.py", "--host", "pfenet", "--out", tmp_path, "--no-progress", "--seeds", "1",
            "--backbone-weights", "random", *sets(["data.args={image_size: 32, num_images: 120}",
                                                    "data.train_episodes=8", "data.num_workers=0",
                                                    "train.epochs=1", "train.batch_size=4",
                                                    "train.val_episodes=4", "eval.episodes=4",
                                                    "model.flags.reduce_dim=8"])]
    out = ok(run(*args, timeout=400))
    for w in ("Table 6", "pfenet+dcm - pfenet", "paired difference", "n/a", "paper", "62.3", "60.8"):
        assert w in out, out
    res = json.loads((tmp_path / "plug_in_pfenet" / "table6_pfenet_val.json").read_text())
    assert set(res["results"]) == {"pfenet", "pfenet+dcm"} and res["folds"] == [0] and res["seeds"] == [321]
    assert (tmp_path / "plug_in_pfenet" / "table6_pfenet_val.md").is_file()
    # identical recipe apart from the model name (the +DCM network's DCM is its default, model.dcm: null)
    import yaml
    c0 = yaml.safe_load(Path(res["results"]["pfenet"]["runs"]["0"]["321"] + "/config.yaml").read_text())
    c1 = yaml.safe_load(Path(res["results"]["pfenet+dcm"]["runs"]["0"]["321"] + "/config.yaml").read_text())
    assert c0["model"]["name"] == "pfenet" and c1["model"]["name"] == "pfenet+dcm"
    c0["model"].pop("name"), c1["model"].pop("name"), c0["run"].pop("name"), c1["run"].pop("name")
    assert c1["model"]["dcm"] is None and c1["model"]["config_version"] == 2
    assert c0 == c1
    # the finished runs' best checkpoints on the test split, without training (benchmarks.engine.evaluate_run)
    out = ok(run(*args, "--split", "test", "--resume", timeout=400))
    assert out.count("finished run: evaluating its best checkpoint on the test split") == 2, out
    test = json.loads((tmp_path / "plug_in_pfenet" / "table6_pfenet_test.json").read_text())
    assert test["split"] == "test" and set(test["results"]) == {"pfenet", "pfenet+dcm"}
    for arm in ("pfenet", "pfenet+dcm"):
        run_dir = Path(res["results"][arm]["runs"]["0"]["321"])
        r = json.loads((run_dir / "results_test.json").read_text())
        assert r["from_checkpoint"] is True and r["protocol"]["split"] == "test"
        assert r["best"] == json.loads((run_dir / "results.json").read_text())["best"]


def test_evaluate_run_repeats_the_final_test_of_a_finished_run(trained):
    from benchmarks.engine import evaluate_run
    from benchmarks.engine.config import load_config
    cfg = load_config(trained / "config.yaml", ["run.progress=false"])
    final = json.loads((trained / "results.json").read_text())
    rec = evaluate_run(cfg, trained)
    assert rec["from_checkpoint"] is True and len(rec["rows"]) == 1
    for k in ("protocol", "protocol_text", "fusion", "best", "train_seconds"):
        assert rec[k] == final[k], k
    assert rec["rows"][0]["label"] == final["rows"][-1]["label"]  # the trained row, without the references
    for k in ("miou", "fbiou"):
        assert rec["rows"][0][k] == pytest.approx(final["rows"][-1][k], abs=1e-6)
    on_test = evaluate_run(cfg, trained, "test")
    assert on_test["protocol"]["split"] == "test" and cfg["eval"]["split"] == "val"  # cfg is not changed
    assert sorted(p.name for p in trained.glob("results*.json")) == ["results.json"]  # nothing written


def _write_images(d: Path):
    from PIL import Image

    from benchmarks.datasets import synthetic_image
    q, _ = synthetic_image(0, "val", 1, size=80)
    s, lab = synthetic_image(0, "val", 2, size=72)
    Image.fromarray(q).save(d / "query.jpg")
    Image.fromarray(s).save(d / "support.png")
    cls = int(np.unique(lab[(lab > 0) & (lab < 255)])[0])
    Image.fromarray(((lab == cls) * 255).astype(np.uint8)).save(d / "support_mask.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(d / "small_mask.png")


def test_predict_cli_files(trained, tmp_path):
    from PIL import Image
    _write_images(tmp_path)
    out_dir = tmp_path / "out"
    out = ok(run("examples/predict.py", "--checkpoint", trained / "best.pth", "--query", tmp_path / "query.jpg",
                 "--support", tmp_path / "support.png", tmp_path / "support_mask.png",
                 "--support", tmp_path / "support.png", "--support-box", "5,5,40,40",
                 "--out", out_dir, "--figure", "--fusion", "vote"))
    assert "2 support(s)" in out
    mask = Image.open(out_dir / "query_mask.png")
    assert mask.size == (80, 80) and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert Image.open(out_dir / "query_overlay.png").size == (80, 80)
    assert Image.open(out_dir / "query_figure.png").size[0] > 80


def test_predict_cli_errors(trained, tmp_path):
    _write_images(tmp_path)
    ck, q, s = trained / "best.pth", tmp_path / "query.jpg", tmp_path / "support.png"
    fails(run("examples/predict.py", "--checkpoint", ck, "--query", tmp_path / "nope.jpg", "--support", s,
              tmp_path / "support_mask.png"), "nope.jpg", "not found")
    fails(run("examples/predict.py", "--checkpoint", ck, "--query", q, "--support", s, tmp_path / "small_mask.png"),
          "small_mask.png", "10x10", "72x72")
    fails(run("examples/predict.py", "--checkpoint", ck, "--query", q, "--support", s), "support 1", "mask")
    fails(run("examples/predict.py", "--checkpoint", ck, "--query", q, "--support", s, "--support-box", "1,2,3"),
          "x0,y0,x1,y1")
    fails(run("examples/predict.py", "--checkpoint", tmp_path / "none.pth", "--query", q, "--support", s,
              tmp_path / "support_mask.png"), "none.pth")


def test_predict_cli_bad_values_are_one_line(trained, tmp_path):
    _write_images(tmp_path)
    ck, q, s, m = trained / "best.pth", tmp_path / "query.jpg", tmp_path / "support.png", tmp_path / "support_mask.png"
    one_line_error(run("examples/predict.py", "--checkpoint", ck, "--query", q, "--support", s, "--support-box",
                       "0,0,inf,100"), "--support-box", "finite")
    for size in ("-5", "0"):
        one_line_error(run("examples/predict.py", "--checkpoint", ck, "--query", q, "--support", s, m, "--size", size),
                       "--size")
    f = tmp_path / "a_file"
    f.write_text("x")
    p = run("examples/predict.py", "--checkpoint", ck, "--query", q, "--support", s, m, "--out", f)
    one_line_error(p, "--out", "a_file", "not a folder")
    assert f.read_text() == "x"


def test_checkpoint_errors_are_one_line(trained, tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    good = (trained / "last.pth").read_bytes()
    (bad / "last.pth").write_bytes(good[: len(good) // 3])  # truncated
    one_line_error(run("examples/train_dpcn.py", "--resume", "--out", tmp_path, "--name", "run", *sets(TINY)),
                   "last.pth", "cannot be read")
    (bad / "last.pth").write_bytes(good)
    one_line_error(run("examples/train_dpcn.py", "--resume", "--out", tmp_path, "--name", "run",
                       *sets(TINY + ["model.flags={reduce_dim: 16, decoder_dim: 8}"])),
                   "last.pth", "different network")
    one_line_error(run("benchmarks/evaluate.py", "--checkpoint", trained / "best.pth", "--episodes", "2",
                       "--set", "model.flags.reduce_dim=16"), "best.pth", "does not fit")
    p = run("examples/predict.py", "--checkpoint", bad / "last.pth", "--query", tmp_path / "q.jpg", "--support",
            tmp_path / "q.jpg", tmp_path / "q.png")
    fails(p)
    for flag in ("--model", "--backbone", "--config"):
        assert flag not in p.stderr
    one_line_error(run("benchmarks/evaluate.py", "--checkpoint", trained / "best.pth", "--batch-size", "0"),
                   "--batch-size")


@pytest.mark.skipif(not (SHARED / "voc-sample" / "VOC2012").is_dir(), reason="real VOC sample not found")
def test_synthetic_checkpoint_on_pascal_and_a_corrupt_image_with_workers(trained, tmp_path):
    voc = SHARED / "voc-sample" / "VOC2012"
    # a model trained on the synthetic set evaluates on PASCAL (its synthetic dataset arguments are dropped)
    out = ok(run("benchmarks/evaluate.py", "--checkpoint", trained / "best.pth", "--dataset", "pascal",
                 "--data-root", voc, "--fold", "1", "--episodes", "2", "--workers", "0", "--no-progress",
                 "--set", "data.args={min_pixels: 0, on_small_pool: skip}"))
    assert "PASCAL-5i fold 1" in out
    # a corrupt JPEG, read in a DataLoader worker: one line naming the file
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").symlink_to(voc / "SegmentationClassAug")
    for img in (voc / "JPEGImages").glob("*.jpg"):
        (root / "JPEGImages" / img.name).symlink_to(img)
    victim = sorted((root / "JPEGImages").glob("*.jpg"))
    for v in victim:
        v.unlink()
        v.write_bytes(b"not a jpeg")
    p = run("benchmarks/evaluate.py", "--checkpoint", trained / "best.pth", "--dataset", "pascal", "--data-root", root,
            "--fold", "1", "--episodes", "4", "--workers", "2", "--no-progress",
            "--set", "data.args={min_pixels: 0, on_small_pool: skip}")
    one_line_error(p, ".jpg")
    assert "Original Traceback" not in p.stderr


def test_predict_function_api(trained, tmp_path):
    from benchmarks.engine import load_checkpoint_model
    from benchmarks.engine.inference import PredictInputError, predict
    from benchmarks.datasets import synthetic_image
    model, _ = load_checkpoint_model(trained / "best.pth")
    q, _ = synthetic_image(0, "val", 3, size=50)
    s, lab = synthetic_image(0, "val", 4, size=40)
    pred = predict(model, q, [(s, (lab > 0) & (lab < 255))], size=32)
    assert pred.mask.shape == pred.prob.shape == (50, 50) and pred.mask.dtype == np.uint8
    assert {"activation_map_1", "initial_pseudo_mask", "refined_pseudo_mask"} <= set(pred.extras)
    assert all(v.shape == (50, 50) for v in pred.extras.values())
    multi = predict(model, q, [(s, (lab > 0) & (lab < 255)), (s, (2, 2, 30, 30))], size=32, scales=[32, 40],
                    fusion="average")
    assert multi.mask.shape == (50, 50)
    with pytest.raises(PredictInputError, match="40x40"):
        predict(model, q, [(s, np.zeros((10, 12), np.uint8))], size=32)
    with pytest.raises(PredictInputError, match="box"):
        predict(model, q, [(s, (30, 30, 10, 10))], size=32)


_KILL_AT_FIRST_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import benchmarks.engine.checkpoints as checkpoints  # the trainer saves through this module
_save = checkpoints.atomic_save
def save_then_die(obj, path):
    out = _save(obj, path)
    if os.path.basename(str(path)) == "last.pth":
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after the first checkpoint is on disk
    return out
checkpoints.atomic_save = save_then_die
sys.argv = ["train_dpcn.py"] + sys.argv[1:]
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def test_kill_and_resume_cli_matches_uninterrupted(tmp_path):
    """SIGKILL a CLI run at the moment its first checkpoint is written (an event, not a timer); --resume
    finishes with the same weights."""
    import signal

    import torch
    args = ["--no-progress", "--no-eval", *sets(TINY + ["train.epochs=3", "data.train_episodes=32"])]
    ok(run("examples/train_dpcn.py", "--out", tmp_path, "--name", "full", *args))
    killer = tmp_path / "kill_at_checkpoint.py"
    killer.write_text(_KILL_AT_FIRST_CHECKPOINT.format(root=str(ROOT), script=str(ROOT / "examples/train_dpcn.py")))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(killer), "--out", str(tmp_path), "--name", "cut", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    ck = tmp_path / "cut" / "last.pth"
    state = torch.load(ck, weights_only=False)
    assert state["epoch"] == 1 and state["iter_in_epoch"] == 0
    ok(run("examples/train_dpcn.py", "--resume", tmp_path / "cut", "--no-progress", "--no-eval"))
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=False)["model"]
    b = torch.load(ck, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plug_into_your_model_example_runs():
    out = ok(run("examples/plug_into_your_model.py", "--iters", "3", "--size", "32", "--episodes", "8", "--seeds", "2"))
    assert "TinyHost + DCM (residual, kernel_norm=None)" in out and "8 episodes" in out and "seeds 0, 1" in out
    rows = [line for line in out.splitlines() if line.startswith("TinyHost")]
    assert len(rows) == 2 and all("±" in r for r in rows)
    per_seed = [[float(v) for v in r.split()[-2:]] for r in rows]
    assert all(0.0 <= v <= 100.0 for vs in per_seed for v in vs)
    diff = next(line for line in out.splitlines() if line.startswith("difference"))
    mean = float(diff.split("seed")[1].split()[0])
    assert abs(mean - ((per_seed[1][0] - per_seed[0][0]) + (per_seed[1][1] - per_seed[0][1])) / 2) < 0.02
    assert "95 % interval over seeds [" in diff


def test_readme_layer_example_runs_and_starts_as_the_host():
    """The README's "Use the layer" block runs as written; its zero-gated DCM leaves the head unchanged."""
    import re
    import torch
    block = re.search(r"## Use the layer in your network\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md: no python block under 'Use the layer in your network'"
    ns = {}
    torch.manual_seed(0)
    exec(compile(block.group(1), "README.md", "exec"), ns)
    m = ns["HostWithDCM"]()
    assert ns["logits"].shape == (2, 2, 60, 60) and m.dcm.channels == 256 and m.fuse.map_channels == 256
    q, s = torch.randn(1, 512, 20, 20), torch.randn(1, 2, 512, 20, 20)
    mask = torch.randint(0, 2, (1, 2, 80, 80))
    torch.testing.assert_close(m(q, s, mask), m.cls(m.reduce(q)), rtol=0, atol=0)
