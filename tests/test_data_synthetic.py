"""The procedural few-shot set: determinism, class design, distinctness, speed."""

import numpy as np
import pytest
from PIL import Image

from benchmarks.datasets import SYNTHETIC_CLASSES, SyntheticFewShot, synthetic_fold_classes, synthetic_image
from benchmarks.datasets.synthetic import _layout


def test_pure_function_of_seed_split_index():
    a = synthetic_image(3, "train", 17)
    b = synthetic_image(3, "train", 17)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for other in (synthetic_image(4, "train", 17), synthetic_image(3, "val", 17), synthetic_image(3, "train", 18)):
        assert not np.array_equal(a[0], other[0])
    # the same image through two dataset objects (different episode seeds, folds) is the same
    d1 = SyntheticFewShot(fold=0, split="val", num_images=60, seed=1, episodes=3)
    d2 = SyntheticFewShot(fold=2, split="val", num_images=60, seed=9, episodes=3)
    assert np.array_equal(d1.render(5)[0], d2.render(5)[0])
    assert np.array_equal(synthetic_image(0, "test", 2)[0], synthetic_image(0, "val", 2)[0])


def test_class_design_every_fold_has_all_shapes_and_textures():
    shapes = [n.split("/")[0] for n in SYNTHETIC_CLASSES]
    textures = [n.split("/")[1] for n in SYNTHETIC_CLASSES]
    assert len(set(zip(shapes, textures))) == 20 and len(set(SYNTHETIC_CLASSES)) == 20
    for f in range(4):
        ids = synthetic_fold_classes(f)
        assert ids == list(range(5 * f + 1, 5 * f + 6))
        assert len({shapes[i - 1] for i in ids}) == 5 and len({textures[i - 1] for i in ids}) == 4


def test_labels_match_layout_objects_whole_and_several_per_image():
    for i in range(30):
        img, lab = synthetic_image(0, "val", i)
        lay = _layout(0, "val", i, 96, (2, 4))
        ks = {o["k"] + 1 for o in lay["objects"]}
        assert set(np.unique(lab).tolist()) - {0} == ks
        assert 2 <= len(lay["objects"]) <= 4
        for k in ks:
            assert (lab == k).sum() >= 100  # whole objects, well visible at 96x96


def test_holes_are_background():
    found = 0
    for i in range(60):
        _, lab = synthetic_image(0, "train", i)
        for o in _layout(0, "train", i, 96, (2, 4))["objects"]:
            if o["k"] % 5 == 0:  # ring: centre is a hole
                assert lab[int(o["cy"]), int(o["cx"])] != o["k"] + 1
                found += 1
    assert found > 3


def test_objects_distinct_from_background_and_each_other():
    sat_fg, sat_bg, means = [], [], {k: [] for k in range(1, 21)}
    for i in range(80):
        img, lab = synthetic_image(0, "train", i)
        hsv = np.array(Image.fromarray(img).convert("HSV")).astype(float) / 255
        sat_fg.append(hsv[..., 1][lab > 0].mean())
        sat_bg.append(hsv[..., 1][lab == 0].mean())
        for k in np.unique(lab):
            if k:
                means[int(k)].append(img[lab == k].mean(0))
    assert min(sat_fg) > 0.5 and max(sat_bg) < 0.35
    cols = np.array([np.mean(v, 0) for v in means.values() if v])
    assert len(cols) == 20
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(20) * 1e9
    # mean colours differ between classes (shape and texture add further cues)
    assert d.min() > 12


def test_train_split_has_no_novel_pixels_by_default():
    ds = SyntheticFewShot(fold=1, split="train", num_images=120)
    novel = set(synthetic_fold_classes(1))
    assert ds.stats()["excluded_images"] > 0
    for name, _ in ds.queries[:40]:
        _, lab = ds.render(int(name.split("_")[1]))
        assert not (set(np.unique(lab).tolist()) & novel)
    leak = SyntheticFewShot(fold=1, split="train", num_images=120, exclude_novel_in_train=False)
    assert len(leak.queries) > len(ds.queries)


def test_void_band_and_exact_counts():
    img, lab = synthetic_image(0, "val", 4, void_width=1)
    assert (lab == 255).any()
    _, plain = synthetic_image(0, "val", 4)
    band = lab == 255
    # the band sits on label changes: every band pixel is next to a different label in the plain map
    pad = np.pad(plain, 1, mode="edge")
    nb_diff = np.zeros_like(band)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb_diff |= pad[dy:dy + 96, dx:dx + 96] != plain
    assert not (band & ~nb_diff).any()
    ds = SyntheticFewShot(fold=0, split="val", num_images=30, min_pixels=150, episodes=5, on_small_pool="skip")
    for i, cnt in enumerate(ds._counts[:10]):
        _, lab = ds.render(i)
        assert cnt == {int(c): int((lab == c).sum()) for c in np.unique(lab) if 0 < c < 255}


def test_generation_is_a_pure_function_of_its_arguments():
    # (speed is a benchmark matter, never asserted here: ~2 ms per 96x96 image on the development CPU)
    a = [synthetic_image(0, "train", i) for i in range(5)]
    b = [synthetic_image(0, "train", i) for i in range(5)]
    for (ia, la), (ib, lb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    assert not np.array_equal(a[0][0], a[1][0])


def test_records_and_configurable_size():
    ds = SyntheticFewShot(fold=3, split="val", shot=3, num_images=60, image_size=48, episodes=4)
    r = ds[1]
    assert r["query_img"].shape == (3, 48, 48) and r["support_imgs"].shape == (3, 3, 48, 48)
    assert r["class_id"] in synthetic_fold_classes(3) and r["query_mask"].sum() > 0
    assert r["support_masks"].flatten(1).sum(1).min() > 0  # every support shows the class


def test_bad_arguments():
    with pytest.raises(ValueError, match="objects"):
        SyntheticFewShot(objects=(0, 3))
    with pytest.raises(ValueError, match="size"):
        SyntheticFewShot(image_size=8)
    with pytest.raises(ValueError, match="fold"):
        SyntheticFewShot(fold=4)
    with pytest.raises(ValueError, match="num_images"):
        SyntheticFewShot(num_images=1)
