"""Joint image + mask transforms: PFENet's training augmentation and test-time resizing
(docs/PROTOCOLS.md#pfenet-augmentation, docs/PROTOCOLS.md#test-resizing).

Every transform is a callable ``t(image, mask, rng) -> (image, mask)`` where ``image`` is a float32
``Tensor[3, H, W]`` with RGB values in 0..255 (until :class:`Normalize`), ``mask`` a uint8/long
``Tensor[H, W]`` with values in {0, 1, 255} and ``rng`` a :class:`numpy.random.Generator` that supplies
all randomness (so a dataset can make augmentation a pure function of ``(seed, epoch, index)``).
:class:`Compose` also accepts numpy ``uint8[H, W, 3]`` / ``uint8[H, W]`` input and always returns a
float image and a ``long`` mask.

Resampling uses torchvision's tensor functional ops (no OpenCV): bilinear without antialiasing for
images (as ``cv2.INTER_LINEAR``), nearest for masks.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Compose", "ToTensor", "RandScale", "RandRotate", "RandomGaussianBlur", "RandomHorizontalFlip", "Crop",
    "Normalize", "TestResize", "SquashResize", "train_transform", "test_transform", "letterbox_shape",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_255 = tuple(m * 255 for m in IMAGENET_MEAN)  # (123.675, 116.28, 103.53): rotation/crop padding
IGNORE = 255


def _tvf():
    import torchvision.transforms.v2.functional as TF  # imported lazily: keeps `import benchmarks` light
    return TF


def _as_tensors(image, mask) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected a numpy array [H, W, 3], got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"mask: expected a numpy array [H, W], got shape {mask.shape}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected Tensor[3, H, W], got {getattr(image, 'shape', type(image))}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask: expected Tensor[H, W], got {getattr(mask, 'shape', type(mask))}")
    if tuple(image.shape[1:]) != tuple(mask.shape):
        raise ValueError(f"image and mask sizes differ: image {tuple(image.shape[1:])}, mask {tuple(mask.shape)}")
    if not image.is_floating_point():
        image = image.float()
    return image, mask


def _resize(image: torch.Tensor, mask: Optional[torch.Tensor], h: int, w: int):
    TF = _tvf()
    image = TF.resize(image, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    if mask is not None:
        dt = mask.dtype
        mask = TF.resize(mask[None].to(torch.uint8), [h, w], interpolation=TF.InterpolationMode.NEAREST)[0].to(dt)
    return image, mask


class Compose:
    """Apply transforms in order; numpy input is converted first, the mask returned as ``long``.

    Example:
        >>> t = Compose([TestResize(16), Normalize()])
        >>> img, m = t(np.zeros((10, 20, 3), np.uint8), np.ones((10, 20), np.uint8), None)
        >>> tuple(img.shape), tuple(m.shape), m.dtype
        ((3, 16, 16), (16, 16), torch.int64)
    """

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, mask, rng: Optional[np.random.Generator] = None):
        if rng is None:
            rng = np.random.default_rng()
        image, mask = _as_tensors(image, mask)
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask.long()

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class ToTensor:
    """numpy ``uint8[H,W,3]`` / ``uint8[H,W]`` -> float ``Tensor[3,H,W]`` (0..255) / mask tensor (no-op on tensors)."""

    def __call__(self, image, mask, rng=None):
        return _as_tensors(image, mask)


class Normalize:
    """``(x - mean·255) / (std·255)`` with ImageNet statistics (input RGB 0..255)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor([m * 255 for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([s * 255 for s in std]).view(3, 1, 1)

    def __call__(self, image, mask, rng=None):
        return (image - self.mean) / self.std, mask

    def __repr__(self):
        return "Normalize()"


class RandScale:
    """One factor ``s ~ U(lo, hi)`` for both axes; image bilinear, mask nearest
    (docs/PROTOCOLS.md#pfenet-augmentation, step 1)."""

    def __init__(self, scale: Tuple[float, float] = (0.9, 1.1)):
        lo, hi = scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale: expected 0 < min <= max, got {scale}")
        self.scale = (float(lo), float(hi))

    def __call__(self, image, mask, rng):
        s = rng.uniform(*self.scale)
        h, w = mask.shape
        # cv2.resize(fx=s, fy=s) rounds the output size
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        return _resize(image, mask, nh, nw)

    def __repr__(self):
        return f"RandScale({self.scale})"


class RandRotate:
    """With probability ``p`` rotate by ``U(lo, hi)`` degrees about the centre, same canvas; image bilinear
    with border = ImageNet mean·255, mask nearest with border 255 (docs/PROTOCOLS.md#pfenet-augmentation, step 2)."""

    def __init__(self, rotate: Tuple[float, float] = (-10.0, 10.0), p: float = 0.5,
                 padding: Sequence[float] = MEAN_255, ignore_label: int = IGNORE):
        self.rotate = (float(rotate[0]), float(rotate[1]))
        self.p = p
        self.padding = [float(v) for v in padding]
        self.ignore_label = ignore_label

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p:
            return image, mask
        angle = rng.uniform(*self.rotate)
        TF = _tvf()
        image = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=self.padding)
        dt = mask.dtype
        mask = TF.rotate(mask[None].to(torch.uint8), angle, interpolation=TF.InterpolationMode.NEAREST,
                         fill=[float(self.ignore_label)])[0].to(dt)
        return image, mask

    def __repr__(self):
        return f"RandRotate({self.rotate}, p={self.p})"


class RandomGaussianBlur:
    """With probability ``p`` a 5×5 Gaussian blur of the image; sigma 1.1 = OpenCV's automatic sigma for
    ksize 5 (``0.3·((k−1)/2 − 1) + 0.8``) (docs/PROTOCOLS.md#pfenet-augmentation, step 3)."""

    def __init__(self, kernel_size: int = 5, p: float = 0.5, sigma: Optional[float] = None):
        self.kernel_size = kernel_size
        self.p = p
        self.sigma = sigma if sigma is not None else 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8

    def __call__(self, image, mask, rng):
        if rng.random() >= self.p:
            return image, mask
        k = self.kernel_size
        return _tvf().gaussian_blur(image, [k, k], [self.sigma, self.sigma]), mask

    def __repr__(self):
        return f"RandomGaussianBlur({self.kernel_size}, p={self.p})"


class RandomHorizontalFlip:
    """With probability ``p`` flip image and mask left-right (docs/PROTOCOLS.md#pfenet-augmentation, step 4)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, mask, rng):
        if rng.random() < self.p:
            return image.flip(-1), mask.flip(-1)
        return image, mask

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Crop:
    """Crop ``size`` (int or (h, w)) — docs/PROTOCOLS.md#pfenet-augmentation, step 5.

    If the input is smaller it is first padded symmetrically (``pad//2`` before, the rest after) with
    the image mean / mask 255. ``mode='rand'`` draws the offset uniformly and re-draws it up to
    ``retries`` (30) times while the crop keeps fewer than ``fg_ratio`` (85%) of the mask's label-1
    pixels (the last draw is kept if none succeeds); ``mode='center'`` takes the centre.
    """

    def __init__(self, size, mode: str = "rand", padding: Sequence[float] = MEAN_255, ignore_label: int = IGNORE,
                 retries: int = 30, fg_ratio: float = 0.85):
        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"size: expected positive crop size, got {size}")
        if mode not in ("rand", "center"):
            raise ValueError(f"mode: expected 'rand' or 'center', got {mode!r}")
        self.mode = mode
        self.padding = [float(v) for v in padding]
        self.ignore_label = ignore_label
        self.retries = retries
        self.fg_ratio = fg_ratio

    def __call__(self, image, mask, rng):
        ch, cw = self.size
        h, w = mask.shape
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            top, left = ph // 2, pw // 2
            pad = (left, pw - left, top, ph - top)
            fill = torch.tensor(self.padding, dtype=image.dtype).view(3, 1, 1)
            image = F.pad(image - fill, pad, value=0.0) + fill
            mask = F.pad(mask, pad, value=self.ignore_label)
            h, w = mask.shape
        if self.mode == "center":
            y, x = (h - ch) // 2, (w - cw) // 2
        else:
            fg = mask == 1
            total = int(fg.sum())
            y = x = 0
            for attempt in range(self.retries + 1):
                y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                if total == 0 or int(fg[y:y + ch, x:x + cw].sum()) >= self.fg_ratio * total:
                    break
        return image[:, y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw]

    def __repr__(self):
        return f"Crop({self.size}, mode={self.mode!r})"


def letterbox_shape(h: int, w: int, size: int, upscale: bool = True) -> Tuple[int, int]:
    """Content size of :class:`TestResize` for an ``h × w`` input: the long side becomes ``size``, the
    short side is scaled (floored), then both are floored to a multiple of 8 (docs/PROTOCOLS.md#test-resizing).
    With ``upscale=False`` images whose long side is already ``<= size`` keep their size.

    Example:
        >>> letterbox_shape(375, 500, 473)
        (352, 472)
    """
    if upscale or max(h, w) > size:
        if h >= w:
            nh, nw = size, int(w * size / h)
        else:
            nh, nw = int(h * size / w), size
        nh, nw = max(8, nh // 8 * 8), max(8, nw // 8 * 8)
        return nh, nw
    return h, w


class TestResize:
    """Test-time letterbox (PFENet ``Resize``, docs/PROTOCOLS.md#test-resizing): resize to
    :func:`letterbox_shape` (image bilinear, mask nearest) and paste at the top-left of a
    ``size × size`` canvas; image padding 0 (raw black, before normalisation), mask padding 255.
    ``upscale=False`` is PFENet's ``test_Resize`` (only shrink)."""

    __test__ = False  # not a pytest test class

    def __init__(self, size: int = 473, upscale: bool = True, ignore_label: int = IGNORE):
        self.size = int(size)
        self.upscale = upscale
        self.ignore_label = ignore_label

    def __call__(self, image, mask, rng=None):
        h, w = mask.shape
        nh, nw = letterbox_shape(h, w, self.size, self.upscale)
        if (nh, nw) != (h, w):
            image, mask = _resize(image, mask, nh, nw)
        s = self.size
        out_img = image.new_zeros(3, s, s)
        out_mask = mask.new_full((s, s), self.ignore_label)
        out_img[:, :nh, :nw] = image[:, :s, :s]
        out_mask[:nh, :nw] = mask[:s, :s]
        return out_img, out_mask

    def __repr__(self):
        return f"TestResize({self.size}, upscale={self.upscale})"


class SquashResize:
    """Resize to ``size × size`` ignoring the aspect ratio (HSNet's 400×400; image bilinear, mask nearest)."""

    def __init__(self, size: int = 400):
        self.size = int(size)

    def __call__(self, image, mask, rng=None):
        return _resize(image, mask, self.size, self.size)

    def __repr__(self):
        return f"SquashResize({self.size})"


def train_transform(crop_size=473, scale: Tuple[float, float] = (0.9, 1.1),
                    rotate: Tuple[float, float] = (-10.0, 10.0), blur: bool = True, flip: bool = True) -> Compose:
    """PFENet's training pipeline (docs/PROTOCOLS.md#pfenet-augmentation): RandScale, RandRotate
    (p .5), Gaussian blur (p .5), hflip, Crop ``crop_size`` ('rand', 85% foreground rule), Normalize.
    PASCAL scale (0.9, 1.1); COCO (0.8, 1.25).

    Example:
        >>> t = train_transform(crop_size=33)
        >>> img, m = t(np.zeros((40, 50, 3), np.uint8), np.ones((40, 50), np.uint8), np.random.default_rng(0))
        >>> tuple(img.shape), tuple(m.shape)
        ((3, 33, 33), (33, 33))
    """
    ops = [RandScale(scale), RandRotate(rotate, p=0.5)]
    if blur:
        ops.append(RandomGaussianBlur(5, p=0.5))
    if flip:
        ops.append(RandomHorizontalFlip(0.5))
    ops += [Crop(crop_size, mode="rand"), Normalize()]
    return Compose(ops)


def flip_transform(size: int = 473, resize: str = "letterbox") -> Compose:
    """Training pipeline with only a horizontal flip (p .5) as augmentation: the evaluation resize
    ``resize`` at ``size``, then the flip, then Normalize. Every image has exactly two possible inputs,
    so a frozen backbone's features can be memoised (``train.cache_backbone``).

    Example:
        >>> t = flip_transform(24)
        >>> img = np.zeros((30, 60, 3), np.uint8); img[:, :30] = 255
        >>> a, _ = t(img, np.ones((30, 60), np.uint8), np.random.default_rng(0))
        >>> b, _ = t(img, np.ones((30, 60), np.uint8), np.random.default_rng(2))
        >>> tuple(a.shape), bool(torch.equal(a, b) or torch.equal(a, b.flip(-1)))
        ((3, 24, 24), True)
    """
    ops = test_transform(size, resize).transforms
    return Compose(ops[:-1] + [RandomHorizontalFlip(0.5), ops[-1]])


def test_transform(size: int = 473, resize: str = "letterbox") -> Compose:
    """Evaluation pipeline: ``'letterbox'`` (PFENet, default), ``'shrink'`` (PFENet ``resized_val: False``),
    ``'squash'`` (HSNet ``size × size``) or ``'none'``; then Normalize.

    Example:
        >>> img, m = test_transform(24)(np.zeros((30, 60, 3), np.uint8), np.ones((30, 60), np.uint8))
        >>> tuple(img.shape), int(m[0, 0]), int(m[-1, -1])
        ((3, 24, 24), 1, 255)
    """
    if resize == "letterbox":
        ops = [TestResize(size)]
    elif resize == "shrink":
        ops = [TestResize(size, upscale=False)]
    elif resize == "squash":
        ops = [SquashResize(size)]
    elif resize == "none":
        ops = []
    else:
        raise ValueError(f"resize: expected 'letterbox', 'shrink', 'squash' or 'none', got {resize!r}")
    return Compose(ops + [Normalize()])


test_transform.__test__ = False  # type: ignore[attr-defined]
