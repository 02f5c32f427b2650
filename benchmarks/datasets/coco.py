"""COCO-20i (docs/PROTOCOLS.md#coco-20i-folds): from the official instance JSON (polygons/RLE via pycocotools) or from
PFENet/HSNet-style per-image index PNGs; interleaved (default) or consecutive folds.

Mask rule for the instance JSON (documented choice; the PNG scripts of PFENet/HSNet resolve overlaps
in undocumented ways, docs/PROTOCOLS.md#coco-20i-folds): an episode is about one class ``c``, so the episode mask is built
**per class** directly from the annotations — 1 on the union of the non-crowd instances of ``c``,
255 on crowd (``iscrowd=1``) regions of ``c`` not covered by a non-crowd instance of ``c`` (they are
``c`` but unsegmented: neither right nor wrong), 0 elsewhere. Overlaps between instances of
*different* classes are therefore irrelevant: a pixel under both a person and a horse is foreground
of a person episode and of a horse episode. The 2048-pixel support filter counts the non-crowd union
of ``c``. A class is "present" in an image when that union is non-empty.

Category ids: the 80 COCO category ids (1..90 with gaps) are remapped to 1..80 in sorted order
(person=1, ..., toothbrush=80), the convention PFENet's PNG labels use.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ._io import CorruptFileError, DatasetError, PathLike, check_root, file_stamp, fingerprint, parse_list, read_image, PoolCache, \
    resolve_cache_dir
from .base import FewShotDataset
from .sources import PngLabelSource

__all__ = ["CocoFewShot", "COCO_CLASSES", "coco_fold_classes", "CocoJsonSource"]

log = logging.getLogger("benchmarks.datasets")

# the 80 COCO category names in sorted-category-id order (index + 1 = contiguous id)
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")

COCO_LAYOUT = """COCO root, either
  annotations/instances_{train,val}2014.json  + train2014/, val2014/   (official; annotation_file/image_dir override)
or per-image index PNGs (ids 0..80 contiguous, 255 ignore):
  a PFENet list 'train2014/x.jpg annotations/train2014/x.png' per line (list_file=...), or
  image_dir=<jpgs>, label_dir=<pngs with the same stems> (HSNet: annotations/{train,val}2014/)"""


def coco_fold_classes(fold: int, scheme: str = "interleaved") -> List[int]:
    """Novel class ids (contiguous 1..80) of COCO-20i fold ``fold`` (docs/PROTOCOLS.md#coco-20i-folds).

    ``'interleaved'`` (PFENet ``use_split_coco: True`` = HSNet): ``{fold+1, fold+5, ..., fold+77}``;
    ``'consecutive'`` (PANet style): ``20·fold+1 .. 20·fold+20``.

    Example:
        >>> coco_fold_classes(1)[:4], coco_fold_classes(1, "consecutive")[:2]
        ([2, 6, 10, 14], [21, 22])
    """
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"fold: expected 0, 1, 2 or 3 for COCO-20i, got {fold!r}")
    if scheme == "interleaved":
        return [fold + 1 + 4 * v for v in range(20)]
    if scheme == "consecutive":
        return list(range(20 * fold + 1, 20 * fold + 21))
    raise ValueError(f"fold_scheme: expected 'interleaved' or 'consecutive', got {scheme!r}")


def _decode(rle) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools + numpy 2 emit a DeprecationWarning per call
        warnings.simplefilter("ignore", DeprecationWarning)
        return _mask_utils().decode(rle)


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils  # lazy: `import benchmarks` must not need pycocotools
    except ImportError as e:  # pragma: no cover - environment dependent
        raise ImportError("COCO instance annotations need pycocotools (pip install pycocotools), or use "
                          "per-image PNG labels (list_file= / label_dir=)") from e
    return mask_utils


class CocoJsonSource:
    """Images + per-class masks rasterised from a COCO instance JSON (see the module docstring rule)."""

    def __init__(self, annotation_file: Path, image_dir: Path, *, crowd: str = "ignore", cache_dir=None,
                 on_error: str = "raise"):
        if crowd not in ("ignore", "foreground", "background"):
            raise ValueError(f"crowd: expected 'ignore', 'foreground' or 'background', got {crowd!r}")
        self.crowd = crowd
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if not self.annotation_file.is_file():
            raise DatasetError(f"COCO annotation file '{self.annotation_file}' not found. Expected layout:\n"
                               f"{COCO_LAYOUT}", self.annotation_file)
        if not self.image_dir.is_dir():
            raise DatasetError(f"COCO image folder '{self.image_dir}' not found. Expected layout:\n{COCO_LAYOUT}",
                               self.image_dir)
        try:
            data = json.loads(self.annotation_file.read_text())
            cats = data["categories"]
            images = data["images"]
            anns = data["annotations"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DatasetError(f"'{self.annotation_file}' is not a COCO instance annotation file "
                               f"(needs 'images', 'annotations', 'categories'): {type(e).__name__}: {e}",
                               self.annotation_file) from e
        cat_ids = sorted(int(c["id"]) for c in cats)
        if len(cat_ids) != 80:
            raise DatasetError(f"'{self.annotation_file}' has {len(cat_ids)} categories; COCO-20i expects the 80 "
                               "COCO object categories", self.annotation_file)
        self.category_ids = cat_ids  # contiguous id k (1..80) <-> cat_ids[k-1]
        self.cat_to_class = {cid: k + 1 for k, cid in enumerate(cat_ids)}
        names = {int(c["id"]): c["name"] for c in cats}
        self.class_names = {self.cat_to_class[cid]: names[cid] for cid in cat_ids}
        by_img: Dict[int, list] = {}
        for a in anns:
            if a.get("category_id") not in self.cat_to_class:
                raise DatasetError(f"'{self.annotation_file}': annotation {a.get('id')} has unknown category_id "
                                   f"{a.get('category_id')}", self.annotation_file)
            by_img.setdefault(int(a["image_id"]), []).append(a)
        imgs = sorted((im for im in images if int(im["id"]) in by_img), key=lambda im: int(im["id"]))
        self.image_ids = [int(im["id"]) for im in imgs]
        self.sizes = [(int(im["height"]), int(im["width"])) for im in imgs]
        self.names = [Path(im["file_name"]).stem for im in imgs]
        self.images = [self.image_dir / im["file_name"] for im in imgs]
        # per image: class -> (non-crowd segmentations, crowd segmentations)
        self.anns: List[Dict[int, Tuple[list, list]]] = []
        for im in imgs:
            d: Dict[int, Tuple[list, list]] = {}
            for a in by_img[int(im["id"])]:
                k = self.cat_to_class[int(a["category_id"])]
                d.setdefault(k, ([], []))[1 if a.get("iscrowd", 0) else 0].append(a["segmentation"])
            self.anns.append(d)
        self.counts = self._scan(cache_dir)

    def _rles(self, segs: list, h: int, w: int):
        mu = _mask_utils()
        out = []
        for s in segs:
            if isinstance(s, list):  # polygons
                polys = [p for p in s if len(p) >= 6]
                if polys:
                    out.extend(mu.frPyObjects(polys, h, w))
            elif isinstance(s, dict) and isinstance(s.get("counts"), list):  # uncompressed RLE
                out.append(mu.frPyObjects(s, h, w))
            elif isinstance(s, dict):  # compressed RLE
                out.append(s)
            else:
                raise DatasetError(f"'{self.annotation_file}': unsupported segmentation {type(s).__name__}",
                                   self.annotation_file)
        return out

    def _union(self, segs: list, h: int, w: int):
        mu = _mask_utils()
        rles = self._rles(segs, h, w)
        if not rles:
            return None
        return mu.merge(rles) if len(rles) > 1 else rles[0]

    def _scan(self, cache_dir) -> List[dict]:
        key = fingerprint(["coco-json", self.annotation_file.resolve(), file_stamp(self.annotation_file)])
        cache = PoolCache(cache_dir, "coco", key)
        cached = cache.load()
        if cached is not None and len(cached) == len(self.anns):
            return [{int(k): int(v) for k, v in c.items()} for c in cached]
        mu = _mask_utils()
        counts = []
        for (h, w), d in zip(self.sizes, self.anns):
            cnt = {}
            for k, (fg, _) in d.items():
                u = self._union(fg, h, w)
                if u is not None:
                    a = int(mu.area(u))
                    if a > 0:
                        cnt[k] = a
            counts.append(dict(sorted(cnt.items())))
        cache.save([{str(k): v for k, v in c.items()} for c in counts])
        return counts

    def mask(self, i: int, class_id: int) -> np.ndarray:
        """``uint8[H, W]`` episode mask of class ``class_id`` in image ``i`` (module docstring rule)."""
        mu = _mask_utils()
        h, w = self.sizes[i]
        out = np.zeros((h, w), dtype=np.uint8)
        fg, crowd = self.anns[i].get(class_id, ([], []))
        u = self._union(fg, h, w)
        fgm = None if u is None else _decode(u).astype(bool)
        if crowd and self.crowd != "background":
            cu = self._union(crowd, h, w)
            if cu is not None:
                out[_decode(cu).astype(bool)] = 255 if self.crowd == "ignore" else 1
        if fgm is not None:
            out[fgm] = 1
        return out

    def instance_boxes(self, i: int, class_id: int) -> List[Tuple[int, int, int, int]]:
        """One box ``(y0, x0, y1, x1)`` per non-crowd instance of ``class_id`` in image ``i``: the tight box
        of the instance's rasterised pixels (instances that rasterise to no pixel are left out)."""
        from .boxes import mask_box
        h, w = self.sizes[i]
        out = []
        for seg in self.anns[i].get(class_id, ([], []))[0]:
            u = self._union([seg], h, w)
            b = None if u is None else mask_box(_decode(u).astype(bool))
            if b is not None:
                out.append(b)
        return out

    def files(self, i: int) -> Tuple[str]:
        return (str(self.images[i]),)

    def load(self, i: int, class_id: int) -> Tuple[np.ndarray, np.ndarray]:
        img = read_image(self.images[i])
        if img.shape[:2] != self.sizes[i]:
            raise CorruptFileError(f"image '{self.images[i]}' is {img.shape[1]}x{img.shape[0]} (WxH) but "
                               f"'{self.annotation_file}' says {self.sizes[i][1]}x{self.sizes[i][0]}", self.images[i])
        return img, self.mask(i, class_id)


class CocoFewShot(FewShotDataset):
    """COCO-20i episodes.

    Args:
        root: COCO folder (see the expected layout in the error messages / docs/DATA.md).
        fold, shot, split: as for :class:`PascalFewShot` (train: 60 base classes; val/test: 20 novel).
        fold_scheme: ``'interleaved'`` (default; PFENet ``use_split_coco``, HSNet) or ``'consecutive'``.
        annotation_file, image_dir: instance JSON and its image folder; default
            ``root/annotations/instances_{train,val}2014.json`` and ``root/{train,val}2014``.
        list_file: PFENet list of ``image label`` PNG pairs relative to ``root`` (PNG mode).
        label_dir: with ``image_dir``: per-image PNGs with the image's stem (HSNet mode).
        crowd: JSON mode: crowd regions of the episode class -> ``'ignore'`` (255, default),
            ``'foreground'`` or ``'background'``.
        min_pixels (2048), exclude_novel_in_train, episodes (eval default 1000), seed, transform,
        sampling (``'sequential'`` PFENet / ``'class_balanced'`` HSNet), cache_dir, on_small_pool,
        on_error: as for :class:`PascalFewShot`.
        support_annotation: ``'mask'`` or ``'box'`` (Table A2): JSON mode, one box per non-crowd instance of
            the class; PNG modes (no instances), one per 8-connected component (:mod:`benchmarks.datasets.boxes`).
    """

    dataset_name = "coco"

    def __init__(self, root: PathLike, fold: int = 0, shot: int = 1, split: str = "val", *,
                 fold_scheme: str = "interleaved", annotation_file: Optional[PathLike] = None,
                 image_dir: Optional[PathLike] = None, list_file: Optional[PathLike] = None,
                 label_dir: Optional[PathLike] = None, crowd: str = "ignore", min_pixels: int = 2048,
                 exclude_novel_in_train: bool = False, episodes: Optional[int] = None, seed: int = 321,
                 transform: Optional[Callable] = None, sampling: str = "sequential", cache_dir=None,
                 on_small_pool: str = "raise", on_error: Optional[str] = None, support_annotation: str = "mask"):
        super().__init__(split=split, shot=shot, fold=fold, episodes=episodes, seed=seed, transform=transform,
                         sampling=sampling, on_small_pool=on_small_pool, on_error=on_error,
                         support_annotation=support_annotation)
        novel = coco_fold_classes(fold, fold_scheme)
        self.fold_scheme = fold_scheme
        self.root = check_root(root, "CocoFewShot", COCO_LAYOUT)
        self.novel_classes = novel
        self.base_classes = [c for c in range(1, 81) if c not in novel]
        self.class_ids = self.base_classes if self.training else novel
        self.exclude_novel_in_train = bool(exclude_novel_in_train)
        cache = resolve_cache_dir(cache_dir)
        year_split = "train2014" if self.training else "val2014"
        layout = "Expected layout:\n" + COCO_LAYOUT
        if list_file is not None:
            fmt, entries = parse_list(list_file, "pfenet")
            images, labels, names = [], [], []
            seen = set()
            for n, a, b in entries:
                if (a, b) in seen:
                    continue
                seen.add((a, b))
                for rel, what in ((a, "image"), (b, "mask")):
                    if not (self.root / rel).is_file():
                        raise DatasetError(f"{list_file}:{n}: {what} file '{self.root / rel}' does not exist (paths "
                                           f"are relative to root '{self.root}')", self.root / rel)
                images.append(self.root / a)
                labels.append(self.root / b)
                names.append(Path(b).stem)
            self.mode = "png"
            self._source = PngLabelSource(images, labels, max_id=80, layout=layout, cache_dir=cache, kind="coco-png",
                                          on_error=self.on_error)
            self.class_names = {k + 1: n for k, n in enumerate(COCO_CLASSES)}
        elif label_dir is not None:
            idir = Path(image_dir) if image_dir is not None else self.root / year_split
            ldir = Path(label_dir)
            for d in (idir, ldir):
                if not d.is_dir():
                    raise DatasetError(f"CocoFewShot: folder '{d}' not found. {layout}", d)
            stems = sorted(p.stem for p in ldir.glob("*.png"))
            missing = [s for s in stems if not (idir / f"{s}.jpg").is_file()]
            if missing:
                raise DatasetError(f"CocoFewShot: mask '{ldir / (missing[0] + '.png')}' has no image "
                                   f"'{idir / (missing[0] + '.jpg')}' ({len(missing)} such masks). {layout}",
                                   ldir / (missing[0] + ".png"))
            if not stems:
                raise DatasetError(f"CocoFewShot: no PNG masks in '{ldir}'. {layout}", ldir)
            names = stems
            self.mode = "png"
            self._source = PngLabelSource([idir / f"{s}.jpg" for s in stems], [ldir / f"{s}.png" for s in stems],
                                          max_id=80, layout=layout, cache_dir=cache, kind="coco-png",
                                          on_error=self.on_error)
            self.class_names = {k + 1: n for k, n in enumerate(COCO_CLASSES)}
        else:
            ann = Path(annotation_file) if annotation_file is not None else \
                self.root / "annotations" / f"instances_{year_split}.json"
            idir = Path(image_dir) if image_dir is not None else self.root / year_split
            self.mode = "json"
            self._source = CocoJsonSource(ann, idir, crowd=crowd, cache_dir=cache, on_error=self.on_error)
            names = self._source.names
            self.class_names = dict(self._source.class_names)
        self._names = list(names)
        self._counts = self._source.counts
        self._finalize(min_pixels=min_pixels,
                       exclude_classes=novel if (self.training and self.exclude_novel_in_train) else ())

    @property
    def category_ids(self) -> List[int]:
        """Original COCO category id of contiguous class ``k`` at position ``k-1`` (JSON mode)."""
        return list(getattr(self._source, "category_ids", []))

    def extra_repr(self) -> str:
        return f"root='{self.root}', mode={self.mode!r}, fold_scheme={self.fold_scheme!r}, min_pixels={self.min_pixels}"
