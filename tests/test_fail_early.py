"""Nothing silent, nothing thrown away: bad inputs stop the scripts *before* their work, with one line that
names the argument or file and says what to do; colour masks are read by one rule; results are valid JSON
and logs hold no progress bars (subprocesses, tiny synthetic settings, random weights)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.datasets._io import VOC_PALETTE

from _scripts import ok, one_line_error, run, sets, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny(1)
#: plug_in.py on the synthetic set, seconds per run
PLUG = ["--no-progress", "--seeds", "1", "--backbone-weights", "random",
        *sets(["data.args={image_size: 32, num_images: 120}", "data.train_episodes=8", "data.num_workers=0",
               "train.epochs=1", "train.batch_size=4", "train.val_episodes=4", "eval.episodes=4",
               "model.flags.reduce_dim=8"])]


def _strict_json(text: str):
    def bare(c):
        raise ValueError(f"bare {c} in JSON")
    return json.loads(text, parse_constant=bare)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with the default progress setting (bars on), its stderr a pipe like a log file's."""
    out = tmp_path_factory.mktemp("runs")
    p = run("examples/train_dpcn.py", "--out", out, "--name", "tiny", *sets(TINY))
    ok(p)
    return out / "tiny", p


@pytest.fixture()
def files(tmp_path):
    """query / support images, a VOC label map saved as RGB (several classes), a plain file."""
    from PIL import Image

    from benchmarks.datasets import synthetic_image
    q, _ = synthetic_image(0, "val", 1, size=40)
    s, _ = synthetic_image(0, "val", 2, size=40)
    Image.fromarray(q).save(tmp_path / "query.png")
    Image.fromarray(s).save(tmp_path / "support.png")
    lab = np.zeros((40, 40), np.uint8)
    lab[5:15, 5:15], lab[20:30, 20:30], lab[0] = 8, 15, 255  # cat, person, void border
    Image.fromarray(VOC_PALETTE[lab]).save(tmp_path / "label_rgb.png")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


# ------------------------------------------------------------------ results, logs
def test_log_has_no_progress_bars_and_results_are_valid_json(trained):
    run_dir, p = trained
    assert "\r" not in p.stderr and "it/s" not in p.stderr, p.stderr[-1000:]
    assert "epoch 1/1" in p.stdout  # one line per epoch instead
    res = _strict_json((run_dir / "results.json").read_text())
    iou = [v for r in res["rows"] for v in r["class_iou"].values()]
    assert None in iou  # a class no test episode sampled: null, not NaN
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        _strict_json(line)


def test_finite_json_and_the_reader_of_nulls():
    from benchmarks.engine import finite_json
    from benchmarks.engine.trainer import _result_from_dict
    from benchmarks.engine.runlog import format_table
    from benchmarks.scoring.protocols import EvaluationResult, Protocol
    r = EvaluationResult(Protocol(dataset="synthetic", episodes=2, scales=(32,)),
                         [{"seed": 0, "miou": 50.0, "fbiou": 60.0, "class_iou": {1: 50.0, 2: math.nan}}])
    d = _strict_json(json.dumps(finite_json({"label": "x", **r.as_dict()})))
    assert d["class_iou"] == {"1": 50.0, "2": None}
    back = _result_from_dict(d)
    assert back.miou == 50.0 and math.isnan(back.class_iou[2])
    assert "nan" in format_table([("x", back)])


# ------------------------------------------------------------------ colour masks (item 2)
def test_predict_reads_an_rgb_voc_label_map_like_its_palette_png(trained, files):
    ck = trained[0] / "best.pth"
    args = ["examples/predict.py", "--checkpoint", ck, "--query", files / "query.png", "--support",
            files / "support.png", files / "label_rgb.png", "--size", "32", "--out", files / "out"]
    one_line_error(run(*args), "label_rgb.png", "--class-id")
    ok(run(*args, "--class-id", "8"))


def _fake_voc(root: Path):
    """A tiny VOC folder: 6 training images of class 6, 3 validation images of class 1 (fold 0), the second
    validation mask an RGB drawing in red (not a VOC palette colour)."""
    from PIL import Image
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    rng = np.random.default_rng(0)

    def put(name, cls, red=False):
        m = np.zeros((64, 64), np.uint8)
        m[8:56, 8:56] = cls
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        if red:
            c = np.zeros((64, 64, 3), np.uint8)
            c[m > 0] = (255, 0, 0)
            Image.fromarray(c).save(root / "SegmentationClassAug" / f"{name}.png")
        else:
            Image.fromarray(m, mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
        return f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png"

    (root / "train.txt").write_text("\n".join(put(f"t{i}", 6) for i in range(6)) + "\n")
    (root / "val.txt").write_text("\n".join(put(f"v{i}", 1, red=i == 1) for i in range(3)) + "\n")


def test_a_colour_mask_of_the_validation_part_stops_the_run_before_training(tmp_path):
    root = tmp_path / "voc"
    _fake_voc(root)
    p = run("examples/train_dpcn.py", "--dataset", "pascal", "--data-root", root, "--out", tmp_path / "runs",
            "--name", "r", "--no-progress",
            *sets(["model.backbone=efficientnet_lite0", "model.backbone_weights=random",
                   "model.flags={reduce_dim: 8, decoder_dim: 8}", "train.finetune_layer4=false",
                   f"data.train_args={{list_file: {root / 'train.txt'}}}",
                   f"data.val_args={{list_file: {root / 'val.txt'}}}", "data.args={cache_dir: false}",
                   "data.train_size=32", "data.test_size=32", "data.augment=flip", "data.train_episodes=8",
                   "data.num_workers=0", "train.batch_size=4", "train.val_episodes=4", "train.val_batch_size=4",
                   "eval.episodes=4", "eval.reference=none", "train.epochs=1"]))
    one_line_error(p, "v1.png", "(255, 0, 0)", "VOC palette")
    assert not (tmp_path / "runs" / "r" / "last.pth").exists()  # no epoch was trained


# ------------------------------------------------------------------ checks before the work (item 5)
def test_plug_in_checks_every_arm_before_the_first_run(tmp_path):
    p = run("benchmarks/plug_in.py", "--host", "pfenet", "--arms", "pfenet", "pfenet+dcm[lr_scale=-1]", "--out", tmp_path,
            *PLUG, timeout=600)
    one_line_error(p, "pfenet+dcm[lr_scale=-1]", "dcm.lr_scale")
    assert not list(tmp_path.rglob("*.pth"))  # nothing was trained


def test_plug_in_checks_every_fold_before_the_first_run(tmp_path):
    p = run("benchmarks/plug_in.py", "--host", "pfenet", "--folds", "0", "7", "--out", tmp_path, *PLUG, timeout=600)
    one_line_error(p, "--folds", "7")
    assert not list(tmp_path.rglob("*.pth"))


def test_evaluate_json_under_a_file_is_refused_before_the_evaluation(trained, files):
    p = run("benchmarks/evaluate.py", "--checkpoint", trained[0] / "best.pth", "--episodes", "2", "--no-progress",
            "--json", files / "a_file" / "sub" / "r.json")
    one_line_error(p, "--json", "a_file")
    assert "protocol:" not in p.stdout  # nothing was evaluated


def test_predict_out_under_a_file_is_refused_before_the_prediction(trained, files):
    one_line_error(run("examples/predict.py", "--checkpoint", trained[0] / "best.pth", "--query", files / "query.png",
                       "--support", files / "support.png", "--support-box", "1,1,30,30", "--size", "32",
                       "--out", files / "a_file" / "sub"), "--out", "a_file")


def test_train_out_a_file_is_refused(files):
    one_line_error(run("examples/train_dpcn.py", "--out", files / "a_file", *sets(TINY)), "--out", "a_file")
    assert (files / "a_file").read_text() == "x"


def test_output_problem():
    from benchmarks.engine.output_paths import output_problem
    import tempfile
    d = Path(tempfile.mkdtemp())
    (d / "f").write_text("x")
    assert "is a file" in output_problem(d / "f" / "a" / "b.json", "file")
    assert "is a file, not a folder" in output_problem(d / "f", "folder")
    assert "is a folder" in output_problem(d, "file")
    assert output_problem(d / "new" / "deeper", "folder") is None and output_problem(d / "f", "file") is None


# ------------------------------------------------------------------ one clear line (item 6)
def test_a_checkpoint_whose_config_names_another_model(trained, files):
    import torch
    ck = torch.load(trained[0] / "best.pth", weights_only=False)
    ck["config"]["model"]["name"] = "pfenet"
    torch.save(ck, files / "other.pth")
    one_line_error(run("examples/predict.py", "--checkpoint", files / "other.pth", "--query", files / "query.png",
                       "--support", files / "support.png", "--support-box", "1,1,30,30", "--size", "32",
                       "--out", files / "out"), "other.pth", "'pfenet'", "model.name")


def test_dataset_layout_help_is_shown_in_full(tmp_path):
    p = run("examples/train_dpcn.py", "--dataset", "pascal", "--data-root", tmp_path / "no_voc", "--out", tmp_path)
    one_line_error(p, "no_voc", "Expected layout:")
    assert "JPEGImages/<id>.jpg" in p.stderr and "SegmentationClassAug/<id>.png" in p.stderr


def test_a_prior_reference_of_a_model_without_prior_names_the_option(tmp_path):
    one_line_error(run("examples/train_dpcn.py", "--model", "baseline", "--out", tmp_path, "--no-progress",
                       *sets(TINY + ["eval.reference=[prior, untrained]"])),  # the default recipe's references
                   "eval.reference", "'prior'", "eval.reference=untrained")
    assert not list(tmp_path.rglob("*.pth"))


def test_another_hosts_model_on_a_dpcn_recipe_names_its_recipes(tmp_path):
    one_line_error(run("examples/train_dpcn.py", "--config", "synthetic", "--model", "canet", "--out", tmp_path,
                       "--no-progress", *sets(TINY)),
                   "decoder_dim", "--config", "plug_in_canet_synthetic", "canet_pascal")


def test_a_dpcn_only_arm_token_on_another_host(tmp_path):
    one_line_error(run("benchmarks/plug_in.py", "--host", "pfenet", "--arms", "pfenet", "pfenet+dcm[sb1]",
                       "--out", tmp_path, *PLUG), "sb1", "support_branch_weight", "(it is one of dpcn, baseline)")


def test_a_dataset_argument_the_dataset_does_not_take():
    one_line_error(run("examples/train_dpcn.py", "--print-config", "--dataset", "pascal", "--data-root", "/d",
                       "--set", "data.args.image_size=32"), "data.args.image_size", "'pascal'", "list_file")


def test_a_fold_the_dataset_does_not_have():
    one_line_error(run("examples/train_dpcn.py", "--print-config", "--fold", "7"), "data.fold", "7")
