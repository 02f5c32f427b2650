"""Joint image/mask transforms: PFENet training augmentation (docs/PROTOCOLS.md#pfenet-augmentation) and test letterbox
(docs/PROTOCOLS.md#test-resizing)."""
import numpy as np
import pytest
import torch

from benchmarks.datasets import transforms as T

MEAN = torch.tensor(T.IMAGENET_MEAN).view(3, 1, 1) * 255
STD = torch.tensor(T.IMAGENET_STD).view(3, 1, 1) * 255


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w,size,expect", [
    (375, 500, 473, (352, 472)),   # 473*375/500 = 354.75 -> 354 -> 352 ; 473 -> 472
    (500, 375, 473, (472, 352)),
    (500, 500, 473, (472, 472)),
    (100, 40, 64, (64, 24)),       # 40*64/100 = 25.6 -> 25 -> 24
    (10, 20, 473, (232, 472)),     # upscaled
])
def test_letterbox_shape(h, w, size, expect):
    assert T.letterbox_shape(h, w, size) == expect


def test_letterbox_shrink_only_keeps_small_images():
    assert T.letterbox_shape(10, 20, 473, upscale=False) == (10, 20)
    assert T.letterbox_shape(600, 300, 473, upscale=False) == (472, 232)


def test_test_resize_pastes_top_left_with_pads():
    img = np.full((30, 60, 3), 200, np.uint8)
    mask = np.ones((30, 60), np.uint8)
    x, m = T.Compose([T.TestResize(48)])(img, mask)
    nh, nw = T.letterbox_shape(30, 60, 48)
    assert (nh, nw) == (24, 48)
    assert torch.all(x[:, :nh, :nw] == 200) and torch.all(x[:, nh:, :] == 0)
    assert torch.all(m[:nh, :nw] == 1) and torch.all(m[nh:, :] == 255)
    # after normalisation the image padding is (0 - mean)/std
    xn, _ = T.test_transform(48)(img, mask)
    assert torch.allclose(xn[:, -1, -1], (-MEAN / STD).view(3))


def test_test_resize_mask_nearest_keeps_label_values():
    mask = np.zeros((40, 40), np.uint8)
    mask[:20] = 1
    mask[30:] = 255
    _, m = T.test_transform(24)(_img(40, 40), mask)
    assert set(torch.unique(m).tolist()) <= {0, 1, 255}


def test_squash_resize():
    x, m = T.test_transform(20, "squash")(_img(30, 60), np.ones((30, 60), np.uint8))
    assert x.shape == (3, 20, 20) and torch.all(m == 1)


def test_normalize_values():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = (255, 128, 0)
    x, _ = T.Compose([T.Normalize()])(img, np.zeros((2, 2), np.uint8))
    expect = (torch.tensor([255.0, 128.0, 0.0]) - MEAN.view(3)) / STD.view(3)
    assert torch.allclose(x[:, 0, 0], expect)


def test_crop_pads_symmetrically_with_mean_and_255():
    img = np.full((5, 6, 3), 10, np.uint8)
    mask = np.ones((5, 6), np.uint8)
    x, m = T.Compose([T.Crop((9, 9), mode="center")])(img, mask, np.random.default_rng(0))
    # pad 4 rows -> 2 top / 2 bottom ; pad 3 cols -> 1 left / 2 right
    assert torch.all(m[2:7, 1:7] == 1)
    assert torch.all(m[:2] == 255) and torch.all(m[7:] == 255) and torch.all(m[:, :1] == 255) and torch.all(m[:, 7:] == 255)
    assert torch.allclose(x[:, 0, 0], MEAN.view(3)) and torch.all(x[:, 3, 3] == 10)


def test_crop_foreground_retry_rule():
    # a small object in a big image: a single random crop rarely keeps 85% of it
    mask = np.zeros((100, 100), np.uint8)
    mask[40:46, 40:46] = 1
    img = _img(100, 100)
    keep_retry, keep_none = [], []
    for s in range(40):
        _, m = T.Crop(30, retries=30)(*T.ToTensor()(img, mask), np.random.default_rng(s))
        keep_retry.append(int((m == 1).sum()) / 36)
        _, m = T.Crop(30, retries=0)(*T.ToTensor()(img, mask), np.random.default_rng(s))
        keep_none.append(int((m == 1).sum()) / 36)
    assert np.mean([k >= 0.85 for k in keep_retry]) > np.mean([k >= 0.85 for k in keep_none]) + 0.3
    # one draw succeeds with p ≈ (25/71)^2 ≈ 0.12 ; 31 draws: 1 - 0.88^31 ≈ 0.98
    assert np.mean([k >= 0.85 for k in keep_retry]) >= 0.85


def test_crop_keeps_image_and_mask_aligned():
    img = np.zeros((60, 80, 3), np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[10:50, 20:70] = 1
    img[mask == 1] = 255
    for s in range(5):
        x, m = T.Crop(32)(*T.ToTensor()(img, mask), np.random.default_rng(s))
        assert torch.equal((x[0] > 127).long(), (m == 1).long())


def test_rotate_border_is_255_and_mean():
    img = np.full((40, 40, 3), 7, np.uint8)
    mask = np.ones((40, 40), np.uint8)


    rot = T.RandRotate((10, 10), p=1.0)
    x, m = rot(*T.ToTensor()(img, mask), np.random.default_rng(0))
    assert int(m[0, 0]) == 255 and int(m[20, 20]) == 1
    assert torch.allclose(x[:, 0, 0], MEAN.view(3), atol=1e-3)
    assert set(torch.unique(m).tolist()) == {1, 255}
    # p = 0 never rotates
    x2, m2 = T.RandRotate(p=0.0)(*T.ToTensor()(img, mask), np.random.default_rng(0))
    assert torch.all(m2 == 1)


def test_rand_scale_range():
    img, mask = T.ToTensor()(_img(50, 40), np.ones((50, 40), np.uint8))
    sizes = [T.RandScale((0.5, 2.0))(img, mask, np.random.default_rng(s))[1].shape for s in range(30)]
    hs = [s[0] for s in sizes]
    assert min(hs) >= 25 and max(hs) <= 100 and len(set(hs)) > 5
    for h, w in sizes:  # aspect ratio kept
        assert abs(h / w - 50 / 40) < 0.06


def test_blur_sigma_matches_opencv_auto():
    assert T.RandomGaussianBlur(5).sigma == pytest.approx(1.1)
    img, mask = T.ToTensor()(_img(20, 20), np.ones((20, 20), np.uint8))
    out, m = T.RandomGaussianBlur(5, p=1.0)(img, mask, np.random.default_rng(0))
    assert out.std() < img.std() and torch.equal(m, mask)


def test_flip_moves_image_and_mask_together():
    img = np.zeros((4, 6, 3), np.uint8)
    img[:, 0] = 255
    mask = np.zeros((4, 6), np.uint8)
    mask[:, 0] = 1
    x, m = T.RandomHorizontalFlip(p=1.0)(*T.ToTensor()(img, mask), np.random.default_rng(0))
    assert torch.all(m[:, -1] == 1) and torch.all(x[:, :, -1] == 255)


def test_train_transform_shapes_types_and_determinism():
    t = T.train_transform(crop_size=41)
    img = _img(60, 50)
    mask = np.zeros((60, 50), np.uint8)
    mask[20:40, 10:30] = 1
    mask[0] = 255
    x1, m1 = t(img, mask, np.random.default_rng(3))
    x2, m2 = t(img, mask, np.random.default_rng(3))
    assert x1.shape == (3, 41, 41) and m1.shape == (41, 41) and m1.dtype == torch.long and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert set(torch.unique(m1).tolist()) <= {0, 1, 255}
    outs = {t(img, mask, np.random.default_rng(s))[1].sum().item() for s in range(6)}
    assert len(outs) > 1  # random across seeds


def test_bad_input_messages():
    with pytest.raises(ValueError, match="image and mask sizes differ"):
        T.test_transform(16)(_img(10, 12), np.ones((10, 11), np.uint8))
    with pytest.raises(ValueError, match=r"image: expected a numpy array \[H, W, 3\]"):
        T.test_transform(16)(np.zeros((10, 12), np.uint8), np.ones((10, 12), np.uint8))
    with pytest.raises(ValueError, match="resize"):
        T.test_transform(16, "bogus")
    with pytest.raises(ValueError, match="scale"):
        T.RandScale((2.0, 1.0))
