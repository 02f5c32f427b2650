"""The paper's remaining experiments as commands: box supports (Table A2), training curves
(benchmarks/plot_runs.py), qualitative grids (benchmarks/qualitative.py) — on the real VOC / COCO
samples where the shared data is present, end to end at tiny sizes."""
import json
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.datasets import CocoFewShot, PascalFewShot, SyntheticFewShot, build_dataset
from benchmarks.datasets.boxes import BOX_MIN_AREA, boxes_label, component_boxes
from benchmarks.scoring.protocols import Protocol, dataset_factory
from benchmarks.datasets.transforms import test_transform
from conftest import SHARED_DATA

from _scripts import ok, one_line_error, run, sets, tiny
VOC = SHARED_DATA / "voc-sample" / "VOC2012"
VOC_LIST = VOC / "train_sample.txt"
COCO = SHARED_DATA / "coco-mini"
COCO_ANN = COCO / "annotations" / "instances.json"
needs_voc = pytest.mark.skipif(not VOC_LIST.is_file(), reason=f"real VOC sample not found at {VOC} (shared data absent)")
needs_coco = pytest.mark.skipif(not COCO_ANN.is_file(), reason=f"real COCO sample not found at {COCO} (shared data absent)")

TINY = tiny(2)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def png_size(path):
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny training runs of the same recipe, folders ``tiny_seed0`` and ``tiny_seed1`` (seeds 0, 1)."""
    out = tmp_path_factory.mktemp("runs")
    for s in (0, 1):
        ok(run("examples/train_dpcn.py", "--out", out, "--name", f"tiny_seed{s}", "--no-progress", "--seed", s,
               *sets(TINY)))
    return out


# =============================================================================== box supports
def flood_boxes(fg):
    """Boxes and areas of the 8-connected components of ``fg`` by breadth-first search (reference)."""
    seen = np.zeros(fg.shape, bool)
    out = []
    h, w = fg.shape
    for y, x in zip(*np.nonzero(fg)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        q = deque([(y, x)])
        ys, xs = [], []
        while q:
            a, b = q.popleft()
            ys.append(a)
            xs.append(b)
            for da in (-1, 0, 1):
                for db in (-1, 0, 1):
                    c, d = a + da, b + db
                    if 0 <= c < h and 0 <= d < w and fg[c, d] and not seen[c, d]:
                        seen[c, d] = True
                        q.append((c, d))
        out.append(((min(ys), min(xs), max(ys) + 1, max(xs) + 1), len(ys)))
    return out


@needs_voc
@pytest.mark.parametrize("stem,cls", [("2007_001185", 15), ("2007_001185", 5), ("2010_001850", 12)])
def test_component_boxes_match_a_flood_fill_on_real_masks(stem, cls):
    lab = np.array(Image.open(VOC / "SegmentationClassAug" / f"{stem}.png"))
    fg = lab == cls
    ref = flood_boxes(fg)
    assert ref, "the class must be present"
    assert sorted(component_boxes(fg, min_area=0)) == sorted(b for b, _ in ref)
    big = sorted(b for b, a in ref if a >= BOX_MIN_AREA) or [max(ref, key=lambda t: t[1])[0]]
    assert sorted(component_boxes(fg)) == big


def _write_voc(root: Path, labels: dict, objects: dict = None):
    """A tiny VOC2012 folder: real JPEGs of the sample resized to the given labels' sizes."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    src = sorted((VOC / "JPEGImages").glob("*.jpg"))
    for (stem, lab), jpg in zip(labels.items(), src):
        Image.open(jpg).convert("RGB").resize(lab.shape[::-1]).save(root / "JPEGImages" / f"{stem}.jpg")
        Image.fromarray(lab.astype(np.uint8), mode="L").save(root / "SegmentationClassAug" / f"{stem}.png")
    if objects:
        (root / "SegmentationObject").mkdir()
        for stem, obj in objects.items():
            Image.fromarray(obj.astype(np.uint8), mode="L").save(root / "SegmentationObject" / f"{stem}.png")


def _framed_rect(h, w, cls, y0, x0, y1, x1, band=2):
    lab = np.zeros((h, w), np.uint8)
    lab[y0 - band:y1 + band, x0 - band:x1 + band] = 255
    lab[y0:y1, x0:x1] = cls
    return lab


@needs_voc
def test_box_of_a_rectangle_object_equals_its_mask(tmp_path):
    # class 12 (dog, fold 2) as rectangles with a VOC-like 255 band, on real images
    labels = {"a": _framed_rect(60, 80, 12, 10, 12, 40, 50), "b": _framed_rect(50, 70, 12, 5, 30, 45, 66),
              "c": _framed_rect(64, 64, 12, 20, 20, 30, 60)}
    labels["c"][50:60, 2:8] = 15  # another class elsewhere
    _write_voc(tmp_path / "VOC2012", labels)
    kw = dict(fold=2, split="val", min_pixels=0, on_small_pool="skip", cache_dir=False, episodes=6)
    dm = PascalFewShot(tmp_path / "VOC2012", **kw)
    db = PascalFewShot(tmp_path / "VOC2012", support_annotation="box", **kw)
    for i in range(3):
        im_m, m = dm.load_support(i, 12)
        im_b, b = db.load_support(i, 12)
        assert np.array_equal(im_m, im_b) and np.array_equal(m, b) and (b == 255).any() and (b == 1).any()
    for e in range(len(db)):
        assert torch.equal(db[e]["support_masks"], dm[e]["support_masks"])


@needs_voc
def test_pascal_instance_masks_give_one_box_per_object(tmp_path):
    # an L-shaped region of class 13 (horse) made of two objects: one component, two instances
    lab = np.zeros((60, 60), np.uint8)
    lab[10:20, 10:50] = 13
    lab[20:50, 10:20] = 13
    obj = np.zeros_like(lab)
    obj[10:20, 10:50] = 1
    obj[20:50, 10:20] = 2
    other = _framed_rect(60, 60, 13, 5, 5, 30, 30)
    root = tmp_path / "VOC2012"
    _write_voc(root, {"l": lab, "o": other}, objects={"l": obj})
    kw = dict(fold=2, split="val", min_pixels=0, cache_dir=False, episodes=2, support_annotation="box")
    ds = PascalFewShot(root, **kw)
    i = ds.image_names.index("l")
    assert sorted(ds.support_boxes(i, 13, ds._load(i, 13)[1])) == [(10, 10, 20, 50), (20, 10, 50, 20)]
    _, b = ds.load_support(i, 13)
    assert np.array_equal(b, (lab == 13).astype(np.uint8))  # the two boxes cover exactly the L
    (root / "SegmentationObject" / "l.png").unlink()  # without instances: one component, one box
    ds2 = PascalFewShot(root, **kw)
    _, b2 = ds2.load_support(i, 13)
    assert int(b2.sum()) == 40 * 40 and b2[10:50, 10:50].all()


@needs_voc
def test_box_mode_changes_only_the_support_masks_real_voc():
    kw = dict(fold=2, list_file=VOC_LIST, cache_dir=False, on_small_pool="skip")
    for split, n in (("val", 12), ("train", 6)):
        ds = {a: PascalFewShot(VOC, split=split, episodes=n, support_annotation=a, seed=5,
                               transform=test_transform(96), **kw) for a in ("mask", "box")}
        if split == "train":
            for d in ds.values():
                d.set_epoch(1)
        assert ds["mask"].episodes == ds["box"].episodes and ds["mask"].seed == ds["box"].seed
        changed = 0
        for e in range(n):
            rm, rb = ds["mask"][e], ds["box"][e]
            for k in ("query_img", "query_mask", "support_imgs", "query_label_orig", "query_name", "support_names",
                      "class_id"):
                if k in rm:
                    assert (torch.equal(rm[k], rb[k]) if isinstance(rm[k], torch.Tensor) else rm[k] == rb[k]), k
            ep = ds["box"].episode(e)
            for s in ep.supports:  # at original resolution: the object inside its boxes, 255 kept
                _, m = ds["mask"].load_support(s, ep.class_id)
                _, b = ds["box"].load_support(s, ep.class_id)
                assert np.array_equal(b == 255, m == 255)
                assert set(np.unique(b).tolist()) <= {0, 1, 255}
                covered = (m == 1) & (b == 1)
                assert covered.sum() >= 0.9 * (m == 1).sum()  # only components under 64 px may fall outside
                changed += int((b == 1).sum() > (m == 1).sum())
        assert changed > 0


@needs_coco
def test_coco_boxes_are_the_instances_boxes():
    ann = json.loads(COCO_ANN.read_text())
    cat_to_class = {c: k + 1 for k, c in enumerate(sorted(c["id"] for c in ann["categories"]))}
    by_img = {}
    for a in ann["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    ds = CocoFewShot(COCO, fold=0, split="val", annotation_file=COCO_ANN, image_dir=COCO / "images", cache_dir=False,
                     on_small_pool="skip", episodes=20, support_annotation="box")
    src = ds._source
    checked = multi = 0
    for e in ds.episodes:
        for s in e.supports:
            img_id = src.image_ids[s]
            want = sorted(a["bbox"] for a in by_img[img_id]
                          if not a.get("iscrowd", 0) and cat_to_class[a["category_id"]] == e.class_id)
            got = src.instance_boxes(s, e.class_id)
            assert len(got) == len(want), (img_id, e.class_id)
            for y0, x0, y1, x1 in got:  # each box lies in the JSON box of one instance (1 px slack) and fills it
                # (rasterising at pixel centres can shave a thin polygon spike, so not exactly the same box)
                near = [k for k, (x, y, w, h) in enumerate(want)
                        if x0 >= x - 1 and y0 >= y - 1 and x1 <= x + w + 1 and y1 <= y + h + 1
                        and (x1 - x0) * (y1 - y0) >= 0.8 * w * h]
                assert near, ((y0, x0, y1, x1), want)
                want.pop(near[0])
            _, m = ds._load(s, e.class_id)
            _, b = ds.load_support(s, e.class_id)
            assert np.array_equal(b, boxes_label(m, got))
            assert np.array_equal(b == 255, m == 255) and not ((m == 1) & (b != 1)).any()
            checked += 1
            multi += len(got) > 1
    assert checked >= 10 and multi >= 1


def test_support_annotation_validation_and_protocol():
    with pytest.raises(ValueError, match="support_annotation"):
        SyntheticFewShot(fold=0, split="val", num_images=20, image_size=24, episodes=2, support_annotation="boxes")
    with pytest.raises(ValueError, match="support_annotation"):
        Protocol(dataset="synthetic", support_annotation="bbox")
    pm = Protocol(dataset="synthetic", episodes=4, scales=(24,))
    pb = Protocol(dataset="synthetic", episodes=4, scales=(24,), support_annotation="box")
    assert "box supports" not in pm.describe() and "box supports" in pb.describe()
    assert pm.describe() == pb.describe().replace(", box supports (support masks replaced by their bounding boxes)", "")
    assert pb.as_dict()["support_annotation"] == "box"
    f = dataset_factory(num_images=30, image_size=24)
    dm, db = f(pm, 0, 24), f(pb, 0, 24)
    assert dm.support_annotation == "mask" and db.support_annotation == "box" and dm.episodes == db.episodes
    with pytest.raises(ValueError, match="contradicts"):
        dataset_factory(num_images=30, image_size=24, support_annotation="box")(pm, 0, 24)
    from benchmarks.engine.config import ConfigError, load_config
    assert load_config(None, ["data.train_args.support_annotation=box"])["data"]["train_args"] == {"support_annotation": "box"}
    for bad in ("data.args.support_annotation=box", "data.val_args.support_annotation=box",
                "data.train_args.support_annotation=bbox"):
        with pytest.raises(ConfigError, match="support_annotation"):
            load_config(None, [bad])
    # the training option: a dataset argument, as data.train_args passes it
    tr = build_dataset("synthetic", fold=0, split="train", num_images=120, image_size=24, support_annotation="box")
    assert tr.support_annotation == "box" and tr[0]["support_masks"].shape == (1, 24, 24)


def test_evaluate_cli_box_supports(runs):
    out = ok(run("benchmarks/evaluate.py", "--checkpoint", runs / "tiny_seed0" / "best.pth", "--episodes", "4",
                 "--support-annotation", "box", "--no-progress"))
    assert "box supports" in out and "4 episodes" in out


# =============================================================================== curves
def test_plot_runs_curves(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    p = ok(run("benchmarks/plot_runs.py", runs / "tiny_seed0", runs / "tiny_seed1", "--out", out, "--size", "900x300"))
    assert "1 line(s) from 2 run(s)" in p  # the _seed<N> runs merge into one mean line
    assert png_size(out) == (900, 300)
    out2 = tmp_path / "two.png"
    p = ok(run("benchmarks/plot_runs.py", runs / "tiny_seed0", runs / "tiny_seed1", runs / "tiny_seed0", "--out", out2))
    assert "1 line(s) from 2 run(s)" in p and png_size(out2) == (1500, 450)
    shutil.copytree(runs / "tiny_seed0", tmp_path / "other")
    p = ok(run("benchmarks/plot_runs.py", runs / "tiny_seed0", tmp_path / "other", "--label", "A", "--label", "B",
               "--out", out2))
    assert "2 line(s) from 2 run(s)" in p


def test_plot_runs_errors(runs, tmp_path):
    one_line_error(run("benchmarks/plot_runs.py", tmp_path / "missing", "--out", tmp_path / "c.png"), "missing", "not found")
    (tmp_path / "empty").mkdir()
    one_line_error(run("benchmarks/plot_runs.py", tmp_path / "empty", "--out", tmp_path / "c.png"), "log.jsonl")
    one_line_error(run("benchmarks/plot_runs.py", runs / "tiny_seed0", "--label", "a", "--label", "b",
                       "--out", tmp_path / "c.png"), "--label")
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    one_line_error(run("benchmarks/plot_runs.py", runs / "tiny_seed0", "--out", tmp_path / "c.png",
                       env={"PYTHONPATH": str(fake)}), "matplotlib", "pip install")
    assert not (tmp_path / "c.png").exists()


# =============================================================================== qualitative grids
def _grid_size_ok(size, cols, rows, tile):
    w, h = size
    head = h - rows * (tile + 14) - 6
    return w == cols * tile and head % 12 == 0 and 1 <= head // 12 <= 4


def test_qualitative_grid_two_models(runs, tmp_path):
    a, b = runs / "tiny_seed0" / "best.pth", runs / "tiny_seed1" / "best.pth"
    out = tmp_path / "grid.png"
    p = ok(run("benchmarks/qualitative.py", "--checkpoint", a, "--checkpoint", b, "--label", "A", "--label", "B",
               "--episodes", "2", "--pick", "worst", "--tile", "64", "--out", out))
    assert "2 episode(s)" in p and "synthetic fold 0" in p
    # support, query, ground truth, then per model: prediction + 3 SAM maps + M0 + Mr
    assert _grid_size_ok(png_size(out), 3 + 2 * 6, 2, 64), png_size(out)
    again = tmp_path / "again.png"
    ok(run("benchmarks/qualitative.py", "--checkpoint", a, "--checkpoint", b, "--label", "A", "--label", "B",
           "--episodes", "2", "--pick", "worst", "--tile", "64", "--out", again))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))  # deterministic choice


@needs_voc
def test_qualitative_grid_real_voc_box_supports(runs, tmp_path):
    out = tmp_path / "voc.png"
    p = ok(run("benchmarks/qualitative.py", "--checkpoint", runs / "tiny_seed0" / "best.pth", "--dataset", "pascal",
               "--data-root", VOC, "--fold", "2", "--scales", "64", "--set", "data.args={on_small_pool: skip}",
               "--episodes", "2", "--pick", "best", "--support-annotation", "box", "--tile", "64", "--out", out))
    assert "PASCAL-5i fold 2" in p and "box supports" in p
    assert _grid_size_ok(png_size(out), 3 + 6, 2, 64), png_size(out)


def test_qualitative_choice_rule():
    from benchmarks.qualitative import choose, foreground_iou
    s = [0.5, 0.1, 0.9, 0.1, 0.7]
    assert choose(s, 2, "worst") == [1, 3] and choose(s, 2, "best") == [2, 4] and choose(s, 3, "random") == [0, 1, 2]
    gt = np.array([[1, 1, 0], [0, 255, 0]])
    assert foreground_iou(np.array([[1, 0, 0], [0, 1, 1]]), gt) == pytest.approx(1 / 3)
    assert foreground_iou(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0


def test_qualitative_errors(runs, tmp_path):
    ck = runs / "tiny_seed0" / "best.pth"
    one_line_error(run("benchmarks/qualitative.py", "--checkpoint", tmp_path / "nope.pth", "--episodes", "2",
                       "--out", tmp_path / "g.png"), "nope.pth", "not found")
    one_line_error(run("benchmarks/qualitative.py", "--checkpoint", ck, "--episodes", "0", "--out", tmp_path / "g.png"),
                   "--episodes")
    one_line_error(run("benchmarks/qualitative.py", "--checkpoint", ck, "--label", "a", "--label", "b", "--episodes", "1",
                       "--out", tmp_path / "g.png"), "--label")
    one_line_error(run("benchmarks/qualitative.py", "--checkpoint", ck, "--episodes", "1", "--dataset", "pascal",
                       "--data-root", tmp_path / "no_voc", "--out", tmp_path / "g.png"), "no_voc")
    assert not (tmp_path / "g.png").exists()
