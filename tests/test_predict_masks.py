"""The support-mask reading rule of benchmarks.engine.inference.load_mask on real VOC label PNGs, palette and grey."""
import warnings

import numpy as np
import pytest

from benchmarks.engine.inference import PredictInputError, load_mask

from conftest import SHARED_DATA

VOC = SHARED_DATA / "voc-sample" / "VOC2012" / "SegmentationClassAug"


def _real_label(n_classes: int):
    from PIL import Image
    if not VOC.is_dir():
        pytest.skip(f"real VOC sample not found at {VOC}")
    for p in sorted(VOC.glob("*.png")):
        im = Image.open(p)
        ids = sorted(set(np.unique(np.asarray(im)).tolist()) - {0, 255})
        if len(ids) == n_classes and 255 in np.asarray(im):
            return im, ids
    pytest.skip(f"no VOC sample mask with exactly {n_classes} class(es)")


@pytest.mark.parametrize("mode", ["P", "L"])
def test_one_class_label_map_is_read_as_that_class(mode):
    im, (cls,) = _real_label(1)
    arr = np.asarray(im)
    from PIL import Image
    # the grey copy keeps the ids (PIL's palette -> "L" conversion would map them to luminance)
    src = im if mode == "P" else Image.fromarray(arr.astype(np.uint8), mode="L")
    with pytest.warns(RuntimeWarning, match="--class-id"):
        m = load_mask(src)
    assert np.array_equal(m == 1, arr == cls) and np.array_equal(m == 255, arr == 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(load_mask(src, class_id=cls), m)


@pytest.mark.parametrize("mode", ["P", "L"])
def test_several_classes_need_a_class_id(mode):
    from PIL import Image
    im, ids = _real_label(2)
    src = im if mode == "P" else Image.fromarray(np.asarray(im).astype(np.uint8), mode="L")
    with pytest.raises(PredictInputError, match="--class-id"):
        load_mask(src)
    m = load_mask(src, class_id=ids[1])
    assert np.array_equal(m == 1, np.asarray(im) == ids[1])


def test_class_id_values_without_border_and_all_255():
    arr = np.zeros((8, 8), np.uint8)
    arr[2:5, 2:5] = 7
    with pytest.warns(RuntimeWarning, match="class 7"):
        assert load_mask(arr).sum() == 9
    with pytest.raises(PredictInputError, match="255"):
        load_mask(np.full((4, 4), 255, np.uint8))


def test_binary_and_anti_aliased_masks_are_unchanged():
    lab = np.zeros((6, 6), np.uint8)
    lab[1:3, 1:3] = 1
    lab[0] = 255
    assert np.array_equal(load_mask(lab), lab)
    bw = np.zeros((6, 6), np.uint8)
    bw[2:, 2:] = 255
    assert np.array_equal(load_mask(bw), (bw > 127).astype(np.uint8))
    aa = np.linspace(0, 255, 36).reshape(6, 6).astype(np.uint8)
    assert np.array_equal(load_mask(aa), (aa > 127).astype(np.uint8))


def _voc_rgb(label):
    from benchmarks.datasets._io import VOC_PALETTE
    return VOC_PALETTE[label]


def test_rgb_voc_label_map_is_read_like_its_palette_png(tmp_path):
    """A VOC label map saved as RGB (palette PNG ``.convert("RGB")``): the same rule as the palette PNG --
    several classes ask for --class-id, cat (64, 0, 0) is class 8, the void colour (224, 224, 192) is ignore."""
    from PIL import Image
    lab = np.zeros((12, 12), np.uint8)
    lab[2:6, 2:6] = 8      # cat
    lab[6:10, 6:10] = 15   # person
    lab[0] = 255           # void border
    rgb = _voc_rgb(lab)
    assert tuple(rgb[3, 3]) == (64, 0, 0) and tuple(rgb[0, 0]) == (224, 224, 192)
    Image.fromarray(rgb).save(tmp_path / "lab.png")
    pal = Image.fromarray(lab, mode="P")
    pal.putpalette(_voc_rgb(np.arange(256, dtype=np.uint8)).ravel().tolist())
    for src in (tmp_path / "lab.png", rgb, pal):
        with pytest.raises(PredictInputError, match="--class-id"):
            load_mask(src)
        m = load_mask(src, class_id=8)
        assert np.array_equal(m == 1, lab == 8) and np.array_equal(m == 255, lab == 255)
    one = np.where(lab == 15, 0, lab).astype(np.uint8)
    with pytest.warns(RuntimeWarning, match="class 8"):
        m = load_mask(_voc_rgb(one))
    assert np.array_equal(m == 1, one == 8) and np.array_equal(m == 255, one == 255)


def test_rgb_black_white_mask_and_other_colours(tmp_path):
    from PIL import Image
    bw = np.zeros((6, 6, 3), np.uint8)
    bw[2:, 2:] = 255
    assert np.array_equal(load_mask(bw), (bw[..., 0] > 0).astype(np.uint8))
    drawn = bw.copy()
    drawn[2:, 2:] = (255, 0, 0)  # a red drawing: neither black/white nor VOC palette colours
    Image.fromarray(drawn).save(tmp_path / "red.png")
    with pytest.raises(PredictInputError, match=r"red.png.*\(255, 0, 0\).*black-and-white"):
        load_mask(tmp_path / "red.png")
