"""PASCAL-5i on the real VOC2012 sample (../shared/data/voc-sample) and on small folders in tmp_path."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.datasets import DatasetError, PascalFewShot, VOC_CLASSES, binarize, pascal_fold_classes
from benchmarks.datasets import sources as sources_mod
from benchmarks.datasets._io import VOC_PALETTE, parse_list, read_label
from benchmarks.datasets.transforms import test_transform

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VOC = SHARED / "voc-sample" / "VOC2012"
LIST = VOC / "train_sample.txt"
needs_voc = pytest.mark.skipif(not LIST.is_file(), reason=f"VOC sample not found at {VOC} (shared test data absent)")

PUBLISHED_FOLDS = {  # docs/PROTOCOLS.md#pascal-5i-folds
    0: ["aeroplane", "bicycle", "bird", "boat", "bottle"],
    1: ["bus", "car", "cat", "chair", "cow"],
    2: ["diningtable", "dog", "horse", "motorbike", "person"],
    3: ["pottedplant", "sheep", "sofa", "train", "tvmonitor"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dcm-cache")


@pytest.fixture(scope="module")
def literal_counts():
    """{name: {class: pixels}} by a plain loop over the PNGs of the list (not using the library)."""
    out = {}
    for line in LIST.read_text().split("\n"):
        if not line.strip():
            continue
        img, lab = line.split()
        arr = np.array(Image.open(VOC / lab))
        out[Path(lab).stem] = {c: int((arr == c).sum()) for c in range(1, 21) if (arr == c).sum() > 0}
    return out


def test_fold_classes_match_spec_table():
    for f, names in PUBLISHED_FOLDS.items():
        ids = pascal_fold_classes(f)
        assert [VOC_CLASSES[i - 1] for i in ids] == names
    with pytest.raises(ValueError, match="fold"):
        pascal_fold_classes(4)


def test_voc_palette_known_colours():
    """docs/DATA.md#colour-masks: 0 background black, 1 aeroplane (128, 0, 0), 8 cat (64, 0, 0), 15 person
    (192, 128, 128), 255 void (224, 224, 192); every colour distinct."""
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[[0, 1, 8, 15, 255]].tolist() == [[0, 0, 0], [128, 0, 0], [64, 0, 0], [192, 128, 128],
                                                         [224, 224, 192]]
    assert len({tuple(c) for c in VOC_PALETTE.tolist()}) == 256


@needs_voc
def test_voc_palette_is_the_palette_of_the_voc_label_pngs():
    for p in sorted((VOC / "SegmentationClassAug").glob("*.png"))[:5]:
        im = Image.open(p)
        assert im.mode == "P", p
        assert np.array_equal(np.array(im.getpalette(), np.uint8).reshape(-1, 3)[:256], VOC_PALETTE), p


@needs_voc
def test_palette_decoding_known_image():
    arr = read_label(VOC / "SegmentationClassAug" / "2007_001185.png", max_id=20)
    # person holding a cat at a dining table with a bottle (checked by eye), plus the 255 border band
    assert sorted(np.unique(arr).tolist()) == [0, 5, 8, 11, 15, 255]
    assert sorted(np.unique(arr).tolist()) != sorted(np.unique(np.array(Image.open(
        VOC / "SegmentationClassAug" / "2007_001185.png").convert("L"))).tolist())  # luminance gives wrong ids


@needs_voc
def test_palette_indices_equal_colour_lookup_for_all_masks():
    cmap = VOC_PALETTE
    code = lambda rgb: (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    ids_known = np.array(list(range(21)) + [255])
    codes_known = code(cmap[ids_known])
    order = np.argsort(codes_known)
    codes_known, ids_known = codes_known[order], ids_known[order]
    for p in sorted((VOC / "SegmentationClassAug").glob("*.png")):
        idx = read_label(p, max_id=20)
        c = code(np.array(Image.open(p).convert("RGB")))
        pos = np.clip(np.searchsorted(codes_known, c), 0, len(codes_known) - 1)
        assert np.array_equal(codes_known[pos], c), f"{p}: colour outside the VOC palette"
        assert np.array_equal(ids_known[pos], idx), p


@needs_voc
def test_list_parsing():
    fmt, items = parse_list(LIST)
    assert fmt == "pfenet" and len(items) == 165
    assert items[0] == (1, "JPEGImages/2007_001185.jpg", "SegmentationClassAug/2007_001185.png")


@needs_voc
@pytest.mark.parametrize("fold", [0, 1, 2, 3])
@pytest.mark.parametrize("split", ["train", "val"])
def test_pools_and_queries_after_2048_filter(fold, split, literal_counts, cache):
    ds = PascalFewShot(VOC, fold=fold, split=split, list_file=LIST, cache_dir=cache, on_small_pool="skip",
                       episodes=20)
    classes = [c for c in range(1, 21) if (c in pascal_fold_classes(fold)) == (split == "val")]
    assert ds.class_ids == classes
    expect_pools = {c: [n for n, cnt in literal_counts.items() if cnt.get(c, 0) >= 2048] for c in classes}
    assert ds.pools == expect_pools
    # query rule: >= 1 qualifying class; eligible = every split class present (any size), minus classes whose
    # pool cannot give a support other than the query itself
    expect_q = []
    for n, cnt in literal_counts.items():
        if any(cnt.get(c, 0) >= 2048 for c in classes):
            present = tuple(c for c in classes if c in cnt and len([m for m in expect_pools[c] if m != n]) >= 1)
            if present:
                expect_q.append((n, present))
    assert ds.queries == expect_q


@needs_voc
def test_sample_counts_documented(literal_counts, cache):
    """The statistics docs/DATA.md reports for the sample (computed here independently)."""
    assert len(literal_counts) == 165
    pools = {c: sum(cnt.get(c, 0) >= 2048 for cnt in literal_counts.values()) for c in range(1, 21)}
    ds = PascalFewShot(VOC, fold=2, split="val", list_file=LIST, cache_dir=cache, episodes=5)
    assert ds.stats()["pool_sizes"] == {c: pools[c] for c in range(11, 16)}
    assert pools[1] == 0  # no aeroplane in the sample


@needs_voc
def test_exclude_novel_in_train(literal_counts, cache):
    ds = PascalFewShot(VOC, fold=1, split="train", list_file=LIST, cache_dir=cache, exclude_novel_in_train=True,
                       on_small_pool="skip")
    novel = set(pascal_fold_classes(1))
    clean = {n for n, cnt in literal_counts.items() if not (set(cnt) & novel)}
    assert {n for n, _ in ds.queries} <= clean
    assert all(set(p) <= clean for p in ds.pools.values())
    assert ds.stats()["excluded_images"] == len(literal_counts) - len(clean)
    plain = PascalFewShot(VOC, fold=1, split="train", list_file=LIST, cache_dir=cache, on_small_pool="skip")
    assert len(plain.queries) > len(ds.queries)


@needs_voc
def test_episodes_and_records(cache, literal_counts):
    ds = PascalFewShot(VOC, fold=2, split="val", shot=2, list_file=LIST, cache_dir=cache, episodes=12, seed=5,
                       transform=test_transform(64))
    pools = ds.pools
    for e in ds.episodes:
        qn = ds.image_names[e.query]
        assert e.class_id in literal_counts[qn]
        sn = [ds.image_names[s] for s in e.supports]
        assert len(set(sn)) == 2 and qn not in sn and all(s in pools[e.class_id] for s in sn)
    rec = ds[3]
    e = ds.episode(3)
    lab = np.array(Image.open(VOC / "SegmentationClassAug" / f"{ds.image_names[e.query]}.png"))
    assert torch.equal(rec["query_label_orig"], torch.from_numpy(binarize(lab, e.class_id)).long())
    assert rec["query_img"].shape == (3, 64, 64) and rec["support_imgs"].shape == (2, 3, 64, 64)
    assert rec["support_masks"].dtype == torch.long and set(rec["support_masks"].unique().tolist()) <= {0, 1, 255}
    assert rec["class_index"] == ds.class_ids.index(rec["class_id"])
    # PFENet queries are visited in list order
    assert [ds.episode(i).query for i in range(5)] == [ds._queries[i][0] for i in range(5)]


@needs_voc
def test_cache_is_reused_and_keyed_by_list_content(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    a = PascalFewShot(VOC, fold=0, split="val", list_file=LIST, cache_dir=c, episodes=4)
    files = list(c.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and json.loads(files[0].read_text())["key"]

    def boom(*a, **k):
        raise AssertionError("mask read despite cache")

    monkeypatch.setattr(sources_mod, "read_label", boom)
    b = PascalFewShot(VOC, fold=0, split="val", list_file=LIST, cache_dir=c, episodes=4)
    assert b.pools == a.pools
    # a different list (one line less) must be rescanned
    short = tmp_path / "short.txt"
    short.write_text("\n".join(LIST.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(AssertionError, match="despite cache"):
        PascalFewShot(VOC, fold=0, split="val", list_file=short, cache_dir=c, episodes=4)
    assert not list(c.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- tmp folders
def _mini_voc(tmp_path, n=10):
    """A small VOC folder with real images/masks copied from the sample."""
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    stems = [ln.split()[0][len("JPEGImages/"):-4] for ln in LIST.read_text().splitlines()[:n]]
    for s in stems:
        shutil.copy(VOC / "JPEGImages" / f"{s}.jpg", root / "JPEGImages")
        shutil.copy(VOC / "SegmentationClassAug" / f"{s}.png", root / "SegmentationClassAug")
    lst = root / "list.txt"
    lst.write_text("".join(f"JPEGImages/{s}.jpg SegmentationClassAug/{s}.png\n" for s in stems))
    return root, lst, stems


@needs_voc
def test_hsnet_pair_lists(tmp_path, literal_counts):
    root, _, stems = _mini_voc(tmp_path, 40)
    sd = tmp_path / "splits"
    for sub in ("trn", "val"):
        (sd / sub).mkdir(parents=True)
        for f in range(4):
            lines = [f"{s}__{c:02d}" for s in stems for c in sorted(literal_counts[s]) if c in pascal_fold_classes(f)]
            (sd / sub / f"fold{f}.txt").write_text("\n".join(lines) + "\n")
    val = PascalFewShot(root, fold=2, split="val", split_dir=sd, cache_dir=False, episodes=6,
                        on_small_pool="skip")
    assert val.list_format == "hsnet" and val.min_pixels == 0
    pairs = [(s, c) for s in stems for c in sorted(literal_counts[s]) if c in pascal_fold_classes(2)]
    usable = [(s, c) for s, c in pairs if len({t for t, d in pairs if d == c} - {s}) >= 1]
    assert val.queries == [(s, (c,)) for s, c in usable]
    tr = PascalFewShot(root, fold=2, split="train", split_dir=sd, cache_dir=False, on_small_pool="skip")
    assert {c for _, (c,) in tr.queries} <= set(tr.base_classes)
    with pytest.raises(DatasetError, match="not an episode class"):
        PascalFewShot(root, fold=1, split="val", list_file=sd / "val" / "fold2.txt", cache_dir=False)


def test_wrong_root_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match="is not a directory(.|\n)*SegmentationClassAug"):
        PascalFewShot(tmp_path / "nope")
    with pytest.raises(DatasetError, match="missing folder"):
        PascalFewShot(tmp_path)


@needs_voc
def test_missing_file_named_in_list(tmp_path):
    root, lst, _ = _mini_voc(tmp_path, 3)
    lst.write_text(lst.read_text() + "JPEGImages/2099_000001.jpg SegmentationClassAug/2099_000001.png\n")
    with pytest.raises(DatasetError, match=r"list.txt:4: image file '.*2099_000001.jpg' does not exist"):
        PascalFewShot(root, list_file=lst, cache_dir=False)


def test_malformed_list_line(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    lst = tmp_path / "l.txt"
    lst.write_text("JPEGImages/a.jpg SegmentationClassAug/a.png\nonly_one_token\n")
    with pytest.raises(DatasetError, match=r"l.txt:2: expected 'image_path label_path'"):
        PascalFewShot(tmp_path, list_file=lst, cache_dir=False)
    lst.write_text("a b c\n")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        PascalFewShot(tmp_path, list_file=lst, cache_dir=False)


def _write_fake_voc(root, masks):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    lines = []
    for name, m in masks.items():
        Image.fromarray(np.full(m.shape + (3,), 120, np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(m, mode="L").save(root / "SegmentationClassAug" / f"{name}.png")
        lines.append(f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


def _blob_masks(n, cls, size=64):
    out = {}
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        m[8:56, 8:56] = cls  # 2304 px >= 2048
        out[f"img{i}"] = m
    return out


def test_corrupt_mask_and_unexpected_ids(tmp_path):
    lst = _write_fake_voc(tmp_path / "a", _blob_masks(3, 3))
    (tmp_path / "a" / "SegmentationClassAug" / "img1.png").write_bytes(b"\x89PNG garbage" * 10)
    with pytest.raises(DatasetError, match=r"cannot decode mask '.*img1.png'"):
        PascalFewShot(tmp_path / "a", list_file=lst, cache_dir=False)
    m = _blob_masks(3, 3)
    m["img2"][0, 0] = 37
    lst_b = _write_fake_voc(tmp_path / "b", m)
    with pytest.raises(DatasetError, match=r"img2.png' contains unexpected ids \[37\]; expected class ids 0..20 and 255"):
        PascalFewShot(tmp_path / "b", list_file=lst_b, cache_dir=False)
    # a wrong format is never skipped, not even in training (it concerns the whole dataset) ...
    with pytest.raises(DatasetError, match="unexpected ids"):
        PascalFewShot(tmp_path / "b", fold=1, split="train", list_file=lst_b, cache_dir=False)


def test_corrupt_mask_skipped_with_logged_path_in_training(tmp_path, caplog):
    lst = _write_fake_voc(tmp_path, _blob_masks(4, 3))
    (tmp_path / "SegmentationClassAug" / "img1.png").write_bytes(b"\x89PNG garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="benchmarks.datasets"):
        ds = PascalFewShot(tmp_path, fold=1, split="train", list_file=lst, cache_dir=tmp_path / "c")
    assert any("img1.png" in r.message for r in caplog.records)
    assert [n for n, _ in ds.queries] == ["img0", "img2", "img3"]
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())  # such a scan is not cached


def test_rgb_mask_rejected(tmp_path):
    """RGB masks follow the one colour rule (docs/DATA.md#colour-masks): other colours than the VOC palette's
    and black-and-white masks (no class id) are refused, naming the file."""
    lst = _write_fake_voc(tmp_path, _blob_masks(3, 3))
    red = np.zeros((64, 64, 3), np.uint8)
    red[8:56, 8:56] = (255, 0, 0)  # not a VOC palette colour
    Image.fromarray(red).save(tmp_path / "SegmentationClassAug" / "img0.png")
    with pytest.raises(DatasetError, match=r"img0.png': a colour mask with colour \(255, 0, 0\).*VOC palette"):
        PascalFewShot(tmp_path, list_file=lst, cache_dir=False)
    Image.fromarray(np.where(red > 0, 255, 0).astype(np.uint8).max(axis=2, keepdims=True).repeat(3, 2)).save(
        tmp_path / "SegmentationClassAug" / "img0.png")  # black and white
    with pytest.raises(DatasetError, match=r"img0.png' is a black-and-white RGB image: .* no class id"):
        PascalFewShot(tmp_path, list_file=lst, cache_dir=False)


def test_rgb_mask_in_voc_colours_reads_as_the_palette_png(tmp_path):
    """A label PNG saved as RGB (palette ``.convert("RGB")``) gives the same class ids as the palette PNG."""
    masks = _blob_masks(3, 3)
    masks["img1"][20:30, 20:30] = 8    # cat (64, 0, 0)
    masks["img1"][0:4] = 255           # void border (224, 224, 192)
    lst = _write_fake_voc(tmp_path, masks)
    cmap = VOC_PALETTE
    Image.fromarray(cmap[masks["img1"]]).save(tmp_path / "SegmentationClassAug" / "img1.png")
    assert np.array_equal(read_label(tmp_path / "SegmentationClassAug" / "img1.png", max_id=20), masks["img1"])
    ds = PascalFewShot(tmp_path, list_file=lst, cache_dir=False)
    assert ds._counts[1] == {3: int((masks["img1"] == 3).sum()), 8: 100}


def test_corrupt_image_raises_in_eval_and_is_skipped_in_training(tmp_path, caplog):
    masks = _blob_masks(4, 3)  # class 3 (bird) = novel in fold 0, base in fold 1
    lst = _write_fake_voc(tmp_path, masks)
    (tmp_path / "JPEGImages" / "img0.jpg").write_bytes(b"not a jpeg at all")
    ev = PascalFewShot(tmp_path, fold=0, split="val", list_file=lst, cache_dir=False, episodes=4,
                       transform=test_transform(32))
    with pytest.raises(DatasetError, match=r"cannot decode image '.*img0.jpg'"):
        for i in range(len(ev)):
            ev[i]
    tr = PascalFewShot(tmp_path, fold=1, split="train", list_file=lst, cache_dir=False, seed=1,
                       transform=test_transform(32))
    with caplog.at_level(logging.WARNING, logger="benchmarks.datasets"):
        recs = [tr[i] for i in range(len(tr))]
    assert any("img0.jpg" in r.message for r in caplog.records)
    assert all(r["query_img"].shape == (3, 32, 32) for r in recs)


def test_pool_too_small_raises_clear_error(tmp_path):
    lst = _write_fake_voc(tmp_path, _blob_masks(3, 3))
    with pytest.raises(ValueError, match=r"class 3 \(bird\) has 3 support image\(s\)(.|\n)*5-shot"):
        PascalFewShot(tmp_path, fold=0, split="val", shot=5, list_file=lst, cache_dir=False)
    ok = PascalFewShot(tmp_path, fold=0, split="val", shot=2, list_file=lst, cache_dir=False, episodes=3)
    assert all(len(set(e.supports)) == 2 and e.query not in e.supports for e in ok.episodes)


def test_small_objects_are_queries_but_not_supports(tmp_path):
    masks = _blob_masks(3, 3)
    small = np.zeros((64, 64), np.uint8)
    small[:10, :10] = 4   # 100 px of boat: below 2048
    small[20:64, 0:64] = 3  # 2816 px of bird: qualifies
    masks["mixed"] = small
    lst = _write_fake_voc(tmp_path, masks)
    ds = PascalFewShot(tmp_path, fold=0, split="val", list_file=lst, cache_dir=False, episodes=3,
                       on_small_pool="skip")
    # boat has no qualifying support, so it is dropped; with a boat pool it would be eligible for 'mixed'
    assert ("mixed", (3,)) in ds.queries and "mixed" not in ds.pools[4]
    masks["boat0"] = masks["boat1"] = np.full((64, 64), 4, np.uint8)
    lst = _write_fake_voc(tmp_path / "b", masks)
    ds = PascalFewShot(tmp_path / "b", fold=0, split="val", list_file=lst, cache_dir=False, episodes=3)
    assert ("mixed", (3, 4)) in ds.queries and ds.pools[4] == ["boat0", "boat1"]
