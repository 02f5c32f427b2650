"""A procedural few-shot segmentation set: 20 textured object classes on textured backgrounds.

Built for CPU training demos and tests: small images (96×96 by default), vectorised numpy rendering
(well under a millisecond per image), nothing cached on disk. Image ``i`` of a split is a pure
function of ``(data_seed, split, i)`` (:func:`synthetic_image`).

Classes (ids 1..20, 4 folds of 5 like PASCAL-5i: fold ``f`` novel = ``5f+1 .. 5f+5``): class
``k = id - 1`` has

* a **shape family** ``k % 5``: ring (hole), square with an off-centre hole, triangle, thin-armed
  cross, five-pointed star with thin spikes;
* a **texture** ``k % 4``: stripes, checkerboard, dots, concentric rings;
* a **hue** ``(7k mod 20)/20`` rendered saturated (two tones of it).

By the Chinese remainder theorem every (shape, texture) pair occurs exactly once over the 20 classes
and every fold contains all five shapes and all four textures, so held-out classes are *new
combinations* of seen shapes/textures with unseen hues — a model must learn "segment what looks like
the support", not memorise classes. Backgrounds are desaturated (saturation ≤ 0.15) smooth waves
plus grey clutter blobs (label 0), so objects differ from background by colour saturation and from
each other by hue, shape and texture. Each image holds 2–4 objects of distinct classes (sometimes a
second instance of one class) in separate grid cells, so every object is fully visible; the other
objects are the distractors of an episode.
"""
from __future__ import annotations

import colorsys
import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .base import FewShotDataset

__all__ = ["SyntheticFewShot", "synthetic_image", "SYNTHETIC_CLASSES", "synthetic_fold_classes"]

SHAPES = ("ring", "holed-square", "triangle", "cross", "star")
TEXTURES = ("stripes", "checker", "dots", "rings")
NUM_CLASSES = 20
SYNTHETIC_CLASSES = tuple(f"{SHAPES[k % 5]}/{TEXTURES[k % 4]}/hue{(7 * k) % 20:02d}" for k in range(NUM_CLASSES))
_SPLIT_CODE = {"train": 0, "val": 1, "test": 1}


def synthetic_fold_classes(fold: int) -> List[int]:
    """Novel class ids of synthetic fold ``fold`` (``5·fold+1 .. 5·fold+5``).

    Example:
        >>> synthetic_fold_classes(3)
        [16, 17, 18, 19, 20]
    """
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"fold: expected 0, 1, 2 or 3, got {fold!r}")
    return list(range(5 * fold + 1, 5 * fold + 6))


def _class_colours(k: int) -> Tuple[np.ndarray, np.ndarray]:
    h = ((7 * k) % 20) / 20.0
    c1 = np.array(colorsys.hsv_to_rgb(h, 0.85, 0.95), dtype=np.float32)
    c2 = np.array(colorsys.hsv_to_rgb(h, 0.85, 0.5), dtype=np.float32)
    return c1, c2


_COLOURS = [_class_colours(k) for k in range(NUM_CLASSES)]


def _layout(data_seed: int, split: str, index: int, size: int, objects: Tuple[int, int]) -> dict:
    """The random scene description of one image (cheap: no pixels)."""
    rng = np.random.default_rng([data_seed, _SPLIT_CODE[split], index, 0])
    lo, hi = objects
    n = int(rng.integers(lo, hi + 1))
    g = max(2, math.ceil(math.sqrt(hi)))
    cell = size / g
    cells = rng.choice(g * g, size=n, replace=False)
    classes = rng.choice(NUM_CLASSES, size=n, replace=False)
    if n >= 2 and rng.random() < 0.25:
        classes[-1] = classes[0]  # a second instance of the same class
    objs = []
    for cidx, k in zip(cells, classes):
        r = 0.5 * cell * rng.uniform(0.62, 0.95)
        slack = 0.5 * cell - r
        cy = (cidx // g + 0.5) * cell + rng.uniform(-slack, slack)
        cx = (cidx % g + 0.5) * cell + rng.uniform(-slack, slack)
        objs.append(dict(k=int(k), cy=cy, cx=cx, r=r, theta=rng.uniform(0, 2 * np.pi),
                         freq=2.2 * rng.uniform(0.85, 1.2), phase=rng.uniform(0, 2 * np.pi),
                         alpha=rng.uniform(0, np.pi), value=rng.uniform(0.85, 1.05)))
    bg = dict(hue=rng.uniform(), sat=rng.uniform(0.0, 0.15), val=rng.uniform(0.3, 0.7),
              waves=[(rng.uniform(1, 4), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.12))
                     for _ in range(2)],
              blobs=[(rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.06, 0.16),
                      size * rng.uniform(0.06, 0.16), rng.uniform(-0.2, 0.2)) for _ in range(int(rng.integers(0, 3)))])
    return dict(objects=objs, background=bg)


def _shape_mask(fam: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.hypot(u, v)
    if fam == 0:  # ring
        return (rho <= 1.0) & (rho >= 0.5)
    if fam == 1:  # square with an off-centre round hole
        return (np.maximum(np.abs(u), np.abs(v)) <= 0.8) & (np.hypot(u - 0.15, v + 0.1) >= 0.3)
    if fam == 2:  # triangle
        return (v <= 0.7) & (v >= -0.9 + 1.6 * np.abs(u))
    if fam == 3:  # cross with thin arms
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.2) & (av <= 0.95)) | ((av <= 0.2) & (au <= 0.95))
    phi = np.arctan2(v, u)  # star with thin spikes
    return rho <= 0.3 + 0.65 * ((1 + np.cos(5 * phi)) / 2) ** 3


def _texture(tex: int, u, v, freq, phase, alpha) -> np.ndarray:
    if tex == 0:
        return np.sin(2 * np.pi * freq * (u * np.cos(alpha) + v * np.sin(alpha)) + phase) > 0
    if tex == 1:
        return np.sin(np.pi * freq * u + phase) * np.sin(np.pi * freq * v) > 0
    if tex == 2:
        return np.cos(2 * np.pi * freq * u + phase) + np.cos(2 * np.pi * freq * v) > 0.8
    return np.sin(2 * np.pi * freq * np.hypot(u, v) + phase) > 0


def _render(layout: dict, size: int, rng: np.random.Generator, void_width: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    bg = layout["background"]
    base = np.array(colorsys.hsv_to_rgb(bg["hue"], bg["sat"], bg["val"]), dtype=np.float32)
    shade = np.zeros((size, size), dtype=np.float32)
    for f, a, ph, amp in bg["waves"]:
        shade += amp * np.sin(2 * np.pi * f / size * (xx * np.cos(a) + yy * np.sin(a)) + ph)
    for by, bx, ry, rx, dv in bg["blobs"]:
        shade += dv * ((((yy - by) / ry) ** 2 + ((xx - bx) / rx) ** 2) <= 1.0)
    img = base[None, None, :] + shade[..., None]
    label = np.zeros((size, size), dtype=np.uint8)
    for o in layout["objects"]:
        r = o["r"]
        y0, y1 = max(0, int(o["cy"] - r) - 1), min(size, int(math.ceil(o["cy"] + r)) + 1)
        x0, x1 = max(0, int(o["cx"] - r) - 1), min(size, int(math.ceil(o["cx"] + r)) + 1)
        dy, dx = yy[y0:y1, x0:x1] - o["cy"], xx[y0:y1, x0:x1] - o["cx"]
        ct, st = math.cos(o["theta"]), math.sin(o["theta"])
        u, v = (dx * ct + dy * st) / r, (-dx * st + dy * ct) / r
        k = o["k"]
        inside = _shape_mask(k % 5, u, v)
        t = _texture(k % 4, u, v, o["freq"], o["phase"], o["alpha"])
        c1, c2 = _COLOURS[k]
        col = np.where(t[..., None], c1, c2) * o["value"]
        patch = img[y0:y1, x0:x1]
        patch[inside] = col[inside]
        label[y0:y1, x0:x1][inside] = k + 1
    img += rng.normal(0.0, 0.02, size=img.shape).astype(np.float32)
    img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if void_width > 0:  # VOC-like 255 band along object boundaries
        edge = np.zeros_like(label, dtype=bool)
        for s in range(1, void_width + 1):
            dv = label[s:, :] != label[:-s, :]
            dh = label[:, s:] != label[:, :-s]
            edge[s:, :] |= dv
            edge[:-s, :] |= dv
            edge[:, s:] |= dh
            edge[:, :-s] |= dh
        label[edge] = 255
    return img, label


def synthetic_image(data_seed: int, split: str, index: int, size: int = 96, objects: Tuple[int, int] = (2, 4),
                    void_width: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of ``split``: ``(uint8[size, size, 3] RGB, uint8[size, size] label)``; label values are
    class ids 1..20, 0 background, 255 on the optional void band. A pure function of its arguments.

    Example:
        >>> img, lab = synthetic_image(0, "train", 5, size=64)
        >>> img.shape, lab.shape, bool((synthetic_image(0, "train", 5, size=64)[0] == img).all())
        ((64, 64, 3), (64, 64), True)
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")
    lo, hi = objects
    if not 1 <= lo <= hi <= 9:
        raise ValueError(f"objects: expected 1 <= min <= max <= 9, got {objects}")
    if size < 16:
        raise ValueError(f"size: expected >= 16 pixels, got {size}")
    lay = _layout(data_seed, split, index, size, objects)
    return _render(lay, size, np.random.default_rng([data_seed, _SPLIT_CODE[split], index, 1]), void_width)


class SyntheticFewShot(FewShotDataset):
    """Episodes over :func:`synthetic_image` scenes, with the same record format as the real benchmarks.

    Args:
        fold: 0..3 (novel classes ``5·fold+1 .. 5·fold+5``); train uses the other 15.
        shot, split ('train' | 'val' | 'test' (= 'val' images)), episodes (eval default 1000; train one per
            query image), seed (episodes), transform (default: Normalize only, plus a horizontal flip in
            training), sampling, on_small_pool: as :class:`~benchmarks.datasets.PascalFewShot`.
        num_images: images in the split (default 2000 train / 500 val).
        image_size: side of the square images (default 96).
        data_seed: seed of the image content (independent of the episode ``seed``).
        objects: (min, max) objects per image.
        exclude_novel_in_train: drop training images that contain a novel class (default True: no
            novel-class leakage; about a third of the training images remain with 2–4 objects).
        void_width: width of a 255 band along object boundaries (default 0: none).
        min_pixels: support-pool filter; 0 by default (objects are whole by construction); a positive
            value renders every image once to count pixels.
        support_annotation: ``'mask'`` or ``'box'`` (one box per 8-connected component of the class).
    """

    dataset_name = "synthetic"

    def __init__(self, fold: int = 0, shot: int = 1, split: str = "train", *, num_images: Optional[int] = None,
                 image_size: int = 96, data_seed: int = 0, seed: int = 0, episodes: Optional[int] = None,
                 transform: Optional[Callable] = None, objects: Tuple[int, int] = (2, 4),
                 exclude_novel_in_train: bool = True, void_width: int = 0, min_pixels: int = 0,
                 sampling: str = "sequential", on_small_pool: str = "raise", support_annotation: str = "mask"):
        super().__init__(split=split, shot=shot, fold=fold, episodes=episodes, seed=seed, transform=transform,
                         sampling=sampling, on_small_pool=on_small_pool, on_error="raise",
                         support_annotation=support_annotation)
        novel = synthetic_fold_classes(fold)
        if num_images is None:
            num_images = 2000 if self.training else 500
        if num_images < 2:
            raise ValueError(f"num_images: expected >= 2, got {num_images}")
        synthetic_image(data_seed, split, 0, image_size, objects, void_width)  # validates the arguments
        self.image_size = int(image_size)
        self.data_seed = int(data_seed)
        self.objects = (int(objects[0]), int(objects[1]))
        self.void_width = int(void_width)
        self.img_split = "val" if split == "test" else split
        self.novel_classes = novel
        self.base_classes = [c for c in range(1, NUM_CLASSES + 1) if c not in novel]
        self.class_ids = self.base_classes if self.training else novel
        self.class_names = {k + 1: n for k, n in enumerate(SYNTHETIC_CLASSES)}
        self._names = [f"{self.img_split}_{i:06d}" for i in range(num_images)]
        if min_pixels > 0:
            self._counts = [self._exact_counts(i) for i in range(num_images)]
        else:
            self._counts = []
            for i in range(num_images):
                lay = _layout(self.data_seed, self.img_split, i, self.image_size, self.objects)
                cnt: Dict[int, int] = {}
                for o in lay["objects"]:  # approximate area: only used for presence with min_pixels == 0
                    cnt[o["k"] + 1] = cnt.get(o["k"] + 1, 0) + max(1, int(o["r"] ** 2))
                self._counts.append(cnt)
        self._source = self
        self._finalize(min_pixels=min_pixels, exclude_classes=novel if (self.training and exclude_novel_in_train) else ())

    def _exact_counts(self, i: int) -> Dict[int, int]:
        _, lab = self.render(i)
        bc = np.bincount(lab.ravel(), minlength=256)
        return {int(c): int(bc[c]) for c in range(1, NUM_CLASSES + 1) if bc[c]}

    def render(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image ``i`` of this split and its full label map (class ids)."""
        return synthetic_image(self.data_seed, self.img_split, i, self.image_size, self.objects, self.void_width)

    def _default_transform(self):
        from . import transforms as T
        ops = ([T.RandomHorizontalFlip(0.5)] if self.training else []) + [T.Normalize()]
        return T.Compose(ops)

    def files(self, i: int) -> Tuple[str]:
        return (self._names[i],)

    def load(self, i: int, class_id: int) -> Tuple[np.ndarray, np.ndarray]:
        img, lab = self.render(i)
        out = np.zeros(lab.shape, dtype=np.uint8)
        out[lab == class_id] = 1
        out[lab == 255] = 255
        return img, out

    def extra_repr(self) -> str:
        return f"images={len(self._names)}, image_size={self.image_size}, data_seed={self.data_seed}"
