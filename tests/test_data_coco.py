"""COCO-20i: fold tables (both schemes), 91->80 remapping, mask rasterisation against PIL polygons,
crowd handling, PNG-label mode, bad input — on the real sample ../shared/data/coco-mini."""
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from benchmarks.datasets import COCO_CLASSES, CocoFewShot, DatasetError, coco_fold_classes
from benchmarks.datasets.transforms import test_transform

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = SHARED / "coco-mini"
ANN = COCO / "annotations" / "instances.json"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
needs_coco = pytest.mark.skipif(not ANN.is_file(), reason=f"COCO sample not found at {COCO} (shared test data absent)")

# docs/PROTOCOLS.md#coco-20i-folds, use_split_coco=True (interleaved) fold tables
INTERLEAVED_FOLDS = {
    0: "person, airplane, boat, parking meter, dog, elephant, backpack, suitcase, sports ball, skateboard, wine glass, "
       "spoon, sandwich, hot dog, chair, dining table, mouse, microwave, refrigerator, scissors",
    1: "bicycle, bus, traffic light, bench, horse, bear, umbrella, frisbee, kite, surfboard, cup, bowl, orange, pizza, "
       "couch, toilet, remote, oven, book, teddy bear",
    2: "car, train, fire hydrant, bird, sheep, zebra, handbag, skis, baseball bat, tennis racket, fork, banana, "
       "broccoli, donut, potted plant, tv, keyboard, toaster, clock, hair drier",
    3: "motorcycle, truck, stop sign, cat, cow, giraffe, tie, snowboard, baseball glove, bottle, knife, apple, carrot, "
       "cake, bed, laptop, cell phone, sink, vase, toothbrush",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("coco-cache")


@pytest.fixture(scope="module")
def coco_json():
    return json.loads(ANN.read_text())


def make(split="val", fold=0, cache=False, **kw):
    kw.setdefault("on_small_pool", "skip")
    kw.setdefault("episodes", 10)
    return CocoFewShot(COCO, fold=fold, split=split, annotation_file=ANN, image_dir=COCO / "images",
                       cache_dir=cache, **kw)


@needs_coco
def test_names_and_91_to_80_remap(coco_json, cache):
    cats = sorted(coco_json["categories"], key=lambda c: c["id"])
    assert [c["name"] for c in cats] == list(COCO_CLASSES)
    ds = make(cache=cache)
    assert ds.category_ids == [c["id"] for c in cats]
    assert ds.category_ids[0] == 1 and ds.category_ids[-1] == 90 and len(ds.category_ids) == 80
    remap = {c["id"]: k + 1 for k, c in enumerate(cats)}
    assert remap[1] == 1 and remap[13] == 12 and remap[67] == 61 and remap[90] == 80  # person, stop sign, table, brush
    assert ds.class_names[61] == "dining table" and ds.class_names[12] == "stop sign"


def test_fold_tables_both_schemes():
    for f, names in INTERLEAVED_FOLDS.items():
        ids = coco_fold_classes(f, "interleaved")
        assert ids == list(range(f + 1, 81, 4))
        assert [COCO_CLASSES[i - 1] for i in ids] == names.split(", ")
        assert coco_fold_classes(f, "consecutive") == list(range(20 * f + 1, 20 * f + 21))
    for scheme in ("interleaved", "consecutive"):
        allc = sorted(c for f in range(4) for c in coco_fold_classes(f, scheme))
        assert allc == list(range(1, 81))  # the 4 folds partition the 80 classes
    with pytest.raises(ValueError, match="fold_scheme"):
        coco_fold_classes(0, "random")


@needs_coco
@pytest.mark.parametrize("scheme", ["interleaved", "consecutive"])
def test_split_classes_and_pools_literal(scheme, coco_json, cache):
    from pycocotools import mask as mu
    cats = sorted(c["id"] for c in coco_json["categories"])
    remap = {cid: k + 1 for k, cid in enumerate(cats)}
    imgs = {im["id"]: im for im in coco_json["images"]}
    area = defaultdict(dict)  # literal: decode every non-crowd instance, OR per class, count
    masks = {}
    for a in coco_json["annotations"]:
        if a["iscrowd"]:
            continue
        im = imgs[a["image_id"]]
        rles = mu.frPyObjects(a["segmentation"], im["height"], im["width"])
        m = mu.decode(rles)
        m = m.max(axis=2) if m.ndim == 3 else m
        key = (a["image_id"], remap[a["category_id"]])
        masks[key] = m if key not in masks else np.maximum(masks[key], m)
    for (iid, c), m in masks.items():
        area[Path(imgs[iid]["file_name"]).stem][c] = int(m.sum())
    for f in (0, 3):
        novel = coco_fold_classes(f, scheme)
        val = make("val", f, cache, fold_scheme=scheme)
        tr = make("train", f, cache, fold_scheme=scheme)
        assert val.class_ids == novel and tr.class_ids == [c for c in range(1, 81) if c not in novel]
        for ds in (val, tr):
            expect = {c: sorted(n for n, cnt in area.items() if cnt.get(c, 0) >= 2048) for c in ds.class_ids}
            assert {c: sorted(v) for c, v in ds.pools.items()} == expect


def _polygon_fill(polys, h, w):
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    for p in polys:
        d.polygon([(p[i], p[i + 1]) for i in range(0, len(p), 2)], fill=1)
    return np.array(im, dtype=bool)


def _polygon_band(polys, h, w, width=3):
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    for p in polys:
        pts = [(p[i], p[i + 1]) for i in range(0, len(p), 2)]
        d.line(pts + [pts[0]], fill=1, width=width)
    return np.array(im, dtype=bool)


@needs_coco
def test_mask_rasterisation_matches_pil_polygons(coco_json, cache):
    ds = make(cache=cache)
    src = ds._source
    by_img = defaultdict(list)
    for a in coco_json["annotations"]:
        by_img[a["image_id"]].append(a)
    checked = inter = union = 0
    for i, iid in enumerate(src.image_ids):
        anns = by_img[iid]
        if any(a["iscrowd"] for a in anns):
            continue
        for c_orig in sorted({a["category_id"] for a in anns})[:2]:
            polys = [p for a in anns if a["category_id"] == c_orig for p in a["segmentation"]]
            h, w = src.sizes[i]
            ref = _polygon_fill(polys, h, w)
            got = src.mask(i, ds.category_ids.index(c_orig) + 1)
            assert set(np.unique(got).tolist()) <= {0, 1}
            diff = (got == 1) != ref
            band = _polygon_band(polys, h, w)
            assert not (diff & ~band).any(), f"image {iid} cat {c_orig}: differences away from the polygon outline"
            inter += int(((got == 1) & ref).sum())
            union += int(((got == 1) | ref).sum())
            checked += 1
        if checked >= 30:
            break
    assert checked >= 30
    # the two rasterisers differ only on boundary pixels: pooled IoU over all checked masks stays high
    assert inter / union > 0.9


@needs_coco
def test_crowd_regions_are_ignored(coco_json, cache):
    from pycocotools import mask as mu
    ds = make(cache=cache)
    src = ds._source
    crowd = [a for a in coco_json["annotations"] if a["iscrowd"]][:5]
    for a in crowd:
        i = src.image_ids.index(a["image_id"])
        k = ds.category_ids.index(a["category_id"]) + 1
        h, w = src.sizes[i]
        cm = mu.decode(mu.frPyObjects(a["segmentation"], h, w)).astype(bool)
        m = src.mask(i, k)
        assert (m[cm] != 0).all()                      # crowd pixels are never background
        assert (m[cm] == 255).sum() > 0                # ... they are ignore unless a non-crowd instance covers them
        assert src.counts[i].get(k, 0) == int((m == 1).sum())  # the area filter counts non-crowd pixels only
    fgds = make(cache=False, crowd="foreground")
    a = crowd[0]
    i = src.image_ids.index(a["image_id"])
    k = ds.category_ids.index(a["category_id"]) + 1
    assert set(np.unique(fgds._source.mask(i, k)).tolist()) <= {0, 1}


@needs_coco
def test_records_and_episode_determinism(cache):
    a = make(cache=cache, transform=test_transform(48), seed=3, episodes=6)
    b = make(cache=cache, transform=test_transform(64), seed=3, episodes=6)
    assert a.episodes == b.episodes
    r = a[0]
    e = a.episode(0)
    assert r["query_label_orig"].shape == tuple(a._source.sizes[e.query])
    assert r["class_id"] in a.novel_classes and r["query_name"] == a.image_names[e.query]


@needs_coco
def test_png_label_mode(tmp_path, coco_json, cache):
    """Write PFENet-style index PNGs for 40 images and read them through both PNG layouts."""
    src = make(cache=cache)._source
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "annotations" / "train2014").mkdir(parents=True)
    lines, literal = [], {}
    for i in range(40):
        h, w = src.sizes[i]
        lab = np.zeros((h, w), np.uint8)
        for k in sorted(src.anns[i]):  # later (higher) classes overwrite: the PNG format must pick one
            lab[src.mask(i, k) == 1] = k
        name = src.names[i]
        Image.fromarray(lab).save(root / "annotations" / "train2014" / f"{name}.png")
        Image.open(src.images[i]).save(root / "train2014" / f"{name}.jpg")
        lines.append(f"train2014/{name}.jpg annotations/train2014/{name}.png")
        literal[name] = {c: int((lab == c).sum()) for c in range(1, 81) if (lab == c).sum()}
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    a = CocoFewShot(root, fold=1, split="train", list_file=root / "list.txt", cache_dir=False,
                    on_small_pool="skip", fold_scheme="consecutive")
    b = CocoFewShot(root, fold=1, split="train", image_dir=root / "train2014", label_dir=root / "annotations" / "train2014",
                    cache_dir=False, on_small_pool="skip", fold_scheme="consecutive")
    expect = {c: sorted(n for n, cnt in literal.items() if cnt.get(c, 0) >= 2048) for c in a.class_ids}
    assert {c: sorted(v) for c, v in a.pools.items()} == expect
    assert {c: sorted(v) for c, v in b.pools.items()} == expect
    assert a.mode == b.mode == "png"


def test_bad_coco_inputs(tmp_path):
    with pytest.raises(DatasetError, match=r"annotation file '.*instances_val2014.json' not found"):
        CocoFewShot(tmp_path, cache_dir=False)
    (tmp_path / "val2014").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="not a COCO instance annotation file"):
        CocoFewShot(tmp_path, cache_dir=False)
    (tmp_path / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    with pytest.raises(DatasetError, match="1 categories; COCO-20i expects the 80"):
        CocoFewShot(tmp_path, cache_dir=False)


@needs_coco
def test_corrupt_coco_image_names_file(tmp_path, coco_json):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for im in coco_json["images"]:
        (imgs / im["file_name"]).write_bytes(b"garbage")
    ds = CocoFewShot(COCO, fold=0, split="val", annotation_file=ANN, image_dir=imgs, cache_dir=False,
                     on_small_pool="skip", episodes=2)
    with pytest.raises(DatasetError, match=r"cannot decode image '.*\.jpg'"):
        ds[0]


def test_import_is_light():
    code = ("import sys, benchmarks; bad = [m for m in ('pycocotools', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
