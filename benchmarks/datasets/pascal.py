"""PASCAL-5i: VOC2012 + SBD "SegmentationClassAug" index masks, 4 folds of 5 classes.

Protocol: docs/PROTOCOLS.md#pascal-5i-folds, #pascal-lists, #small-object-filter, #episode-sampling.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._io import DatasetError, PathLike, check_root, parse_list, resolve_cache_dir
from .base import FewShotDataset
from .sources import PngLabelSource

__all__ = ["PascalFewShot", "VOC_CLASSES", "pascal_fold_classes", "image_split_of", "describe_image_split",
           "check_image_split"]

log = logging.getLogger("benchmarks.datasets")

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

PASCAL_LAYOUT = """VOC2012/
  JPEGImages/<id>.jpg
  SegmentationClassAug/<id>.png   single-channel (palette 'P' or grey) PNG, pixel value = class id 0..20, 255 = void
                                  (or RGB in the VOC palette colours, docs/DATA.md#colour-masks)
  ImageSets/Segmentation/val.txt  (optional; used when no list file is given)"""


def pascal_fold_classes(fold: int) -> List[int]:
    """Novel (test) class ids of PASCAL-5i fold ``fold`` (1-based VOC ids; docs/PROTOCOLS.md#pascal-5i-folds).

    Example:
        >>> pascal_fold_classes(2)
        [11, 12, 13, 14, 15]
    """
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"fold: expected 0, 1, 2 or 3 for PASCAL-5i, got {fold!r}")
    return list(range(5 * fold + 1, 5 * fold + 6))


def check_image_split(spec) -> Tuple[int, float, float]:
    """``image_split`` mapping ``{seed, val, test}`` -> ``(seed, val, test)``, validated."""
    if not isinstance(spec, dict) or set(spec) - {"seed", "val", "test"} or "seed" not in spec:
        raise ValueError(f"image_split: expected a mapping {{seed: int, val: fraction, test: fraction}}, got {spec!r}")
    seed, val, test = spec["seed"], spec.get("val", 0.15), spec.get("test", 0.25)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"image_split.seed: expected a non-negative int, got {seed!r}")
    for k, v in (("val", val), ("test", test)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"image_split.{k}: expected a fraction in [0, 1), got {v!r}")
    if val + test >= 1:
        raise ValueError(f"image_split: val + test must leave images for training, got {val} + {test}")
    return seed, float(val), float(test)


def _unit(seed: int, stem: str) -> float:
    h = hashlib.blake2b(f"{seed}:{stem}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def image_split_of(stem: str, spec, in_val_list: Optional[bool] = None) -> str:
    """Which part (``'train'``, ``'val'``, ``'test'``) of an ``image_split`` the image ``stem`` is in.

    Each image gets ``u = BLAKE2b("<seed>:<stem>")`` as a number in ``[0, 1)``. Without a val list
    (``in_val_list=None``): ``u < test`` -> test, ``u < test + val`` -> val, else train. With the
    folder's own val list (full VOC2012), its images are the test part and the others split by
    ``u < val`` -> val, else train. A pure function of the name: adding or removing images never
    moves another image.

    Example:
        >>> spec = {"seed": 0, "val": 0.15, "test": 0.25}
        >>> image_split_of("2008_000019", spec), image_split_of("2008_000019", spec, in_val_list=True)
        ('train', 'test')
    """
    seed, val, test = check_image_split(spec)
    u = _unit(seed, stem)
    if in_val_list is not None:
        return "test" if in_val_list else ("val" if u < val else "train")
    return "test" if u < test else ("val" if u < test + val else "train")


def describe_image_split(spec) -> str:
    """The rule of :func:`image_split_of` in words (printed with every result)."""
    seed, val, test = check_image_split(spec)
    return (f"split by image name, seed {seed}: test = {test:.0%} and val = {val:.0%} of the images, train = the rest "
            f"(with ImageSets/Segmentation/val.txt in the folder: test = that list, val = {val:.0%} of the others)")


class PascalFewShot(FewShotDataset):
    """PASCAL-5i episodes from a ``VOC2012/`` folder.

    Args:
        root: the VOC2012 folder (``JPEGImages/``, ``SegmentationClassAug/``).
        fold: 0..3; ``split='train'`` uses the 15 base classes, ``'val'``/``'test'`` the 5 novel ones.
        shot: supports per episode (K).
        list_file: a PFENet list (``JPEGImages/x.jpg SegmentationClassAug/x.png`` per line, e.g.
            ``voc_sbd_merge_noduplicate.txt`` / ``val.txt``) or an HSNet pair file (``2007_000033__01``),
            or a sequence of such files. Duplicated lines keep their first occurrence.
        split_dir: instead of ``list_file``, HSNet's ``data/splits/pascal`` folder: training reads
            ``trn/fold{j}.txt`` for every ``j != fold``, evaluation ``val/fold{fold}.txt``.
            Without either, the list is built from the folder: ``ImageSets/Segmentation/val.txt`` is the val
            split and every other image with a mask the train split (≈ the 10582 "trainaug" set, not
            PFENet's 5953 list); without ``val.txt`` every image is used for both (with a warning).
        image_split: instead of lists, split the folder's images into disjoint ``train`` / ``val`` /
            ``test`` parts by name (:func:`image_split_of`; ``{seed, val, test}`` fractions): for a
            folder without its own val list (e.g. a VOC2012 train-side subset) the three parts are drawn
            from its images; with ``ImageSets/Segmentation/val.txt`` that list is the test part and
            ``val`` is carved from the training images. ``split`` then picks the part.
        min_pixels: support-pool area filter (docs/PROTOCOLS.md#small-object-filter); default 2048 for
            PFENet lists / folder lists, 0 for HSNet pair lists (HSNet applies none).
        exclude_novel_in_train: BAM's rule: drop training images that contain any novel-class pixel.
        episodes: number of episodes (eval default 1000; train default one per query image).
        seed: episode seed (eval list = pure function of it; training: of ``(seed, epoch)``).
        transform: ``f(image uint8[H,W,3], mask uint8[H,W], rng) -> (Tensor[3,H,W], LongTensor[H,W])``;
            default :func:`benchmarks.datasets.transforms.train_transform` / ``test_transform`` (473).
        sampling: ``'sequential'`` (PFENet: queries in list order, cycled) or ``'class_balanced'``.
        cache_dir: where the per-image class pixel counts are cached (``None``: ``$DCM_CACHE_DIR`` or
            ``~/.cache/dcm``; ``False``: no cache).
        on_small_pool: ``'raise'`` (default) or ``'skip'`` classes whose pool is smaller than ``shot``.
        on_error: unreadable image/mask: ``'raise'`` (default for val) or ``'skip'`` with a logged
            warning naming the file (default for train, so one bad file does not kill a long run).
        support_annotation: ``'mask'`` or ``'box'`` (supports annotated by boxes, Table A2): one box per
            object of ``SegmentationObject/<id>.png`` when the folder has that file, else one per
            8-connected component of the class (:mod:`benchmarks.datasets.boxes`).
    """

    dataset_name = "pascal"

    def __init__(self, root: PathLike, fold: int = 0, shot: int = 1, split: str = "val", *,
                 list_file: Union[PathLike, Sequence[PathLike], None] = None, list_format: str = "auto",
                 split_dir: Optional[PathLike] = None, image_split: Optional[dict] = None,
                 min_pixels: Optional[int] = None,
                 exclude_novel_in_train: bool = False, episodes: Optional[int] = None, seed: int = 321,
                 transform: Optional[Callable] = None, sampling: str = "sequential", cache_dir=None,
                 on_small_pool: str = "raise", on_error: Optional[str] = None, support_annotation: str = "mask"):
        super().__init__(split=split, shot=shot, fold=fold, episodes=episodes, seed=seed, transform=transform,
                         sampling=sampling, on_small_pool=on_small_pool, on_error=on_error,
                         support_annotation=support_annotation)
        novel = pascal_fold_classes(fold)
        self.root = check_root(root, "PascalFewShot", PASCAL_LAYOUT)
        self.novel_classes = novel
        self.base_classes = [c for c in range(1, 21) if c not in novel]
        self.class_ids = self.base_classes if self.training else novel
        self.class_names = {c: VOC_CLASSES[c - 1] for c in range(1, 21)}
        self.exclude_novel_in_train = bool(exclude_novel_in_train)

        if list_file is not None and split_dir is not None:
            raise ValueError("give either list_file or split_dir, not both")
        if image_split is not None:
            if list_file is not None or split_dir is not None:
                raise ValueError("image_split: splits the folder's images; give it without list_file / split_dir")
            check_image_split(image_split)
        self.image_split = image_split
        if split_dir is not None:
            sd = Path(split_dir)
            if self.training:
                files = [sd / "trn" / f"fold{j}.txt" for j in range(4) if j != fold]
            else:
                files = [sd / "val" / f"fold{fold}.txt"]
            fmt, items = self._read_lists(files, "hsnet")
            self.list_files = [str(f) for f in files]
        elif list_file is not None:
            files = [list_file] if isinstance(list_file, (str, Path)) else list(list_file)
            fmt, items = self._read_lists(files, list_format)
            self.list_files = [str(f) for f in files]
        else:
            fmt, items = "pfenet", self._folder_items()
            self.list_files = []
        self.list_format = fmt
        if min_pixels is None:
            min_pixels = 0 if fmt == "hsnet" else 2048

        names: List[str] = []
        index: Dict[str, int] = {}
        pairs: List[Tuple[int, int]] = []
        images, labels = [], []
        dup = 0
        for src, line, a, b in items:
            if fmt == "pfenet":
                img_rel, lab_rel = a, b
                name = Path(lab_rel).stem
            else:
                name, img_rel, lab_rel = a, f"JPEGImages/{a}.jpg", f"SegmentationClassAug/{a}.png"
            key = img_rel + " " + lab_rel
            if key not in index:
                for rel, what in ((img_rel, "image"), (lab_rel, "mask")):
                    if not (self.root / rel).is_file():
                        where = f"{src}:{line}" if src else "the folder scan"
                        raise DatasetError(f"{where}: {what} file '{self.root / rel}' does not exist (paths in lists are "
                                           f"relative to root '{self.root}'). Expected layout:\n{PASCAL_LAYOUT}",
                                           self.root / rel)
                index[key] = len(names)
                names.append(name)
                images.append(self.root / img_rel)
                labels.append(self.root / lab_rel)
            elif fmt == "pfenet":
                dup += 1
            if fmt == "hsnet":
                if not 1 <= b <= 20:
                    raise DatasetError(f"{src}:{line}: class {b} out of range 1..20", src)
                pairs.append((index[key], b))
        if dup:
            log.info("pascal: %d duplicated list lines ignored (first occurrence kept)", dup)
        if fmt == "hsnet":  # the same (image, class) pair twice would double its weight
            pairs = list(dict.fromkeys(pairs))
        scan = fmt == "pfenet" or min_pixels > 0 or (self.training and self.exclude_novel_in_train)
        self._source = PngLabelSource(images, labels, max_id=20, layout="Expected layout:\n" + PASCAL_LAYOUT,
                                      cache_dir=resolve_cache_dir(cache_dir), kind="voc", scan=scan,
                                      on_error=self.on_error)
        self._names = names
        self._counts = self._source.counts
        self._pairs = pairs if fmt == "hsnet" else None
        self._finalize(min_pixels=min_pixels,
                       exclude_classes=novel if (self.training and self.exclude_novel_in_train) else ())

    @staticmethod
    def _read_lists(files, list_format):
        fmts, items = set(), []
        for f in files:
            fmt, entries = parse_list(f, list_format)
            fmts.add(fmt)
            items.extend((str(f), n, a, b) for n, a, b in entries)
        if len(fmts) > 1:
            raise DatasetError(f"list files {list(map(str, files))} mix PFENet and HSNet formats")
        return fmts.pop(), items

    def _folder_items(self):
        jpg, seg = self.root / "JPEGImages", self.root / "SegmentationClassAug"
        for d in (jpg, seg):
            if not d.is_dir():
                raise DatasetError(f"PascalFewShot: missing folder '{d}'. Expected layout:\n{PASCAL_LAYOUT}", d)
        stems = sorted(p.stem for p in seg.glob("*.png") if (jpg / f"{p.stem}.jpg").is_file())
        if not stems:
            raise DatasetError(f"PascalFewShot: no <id>.png in '{seg}' with a matching '{jpg}/<id>.jpg'. "
                               f"Expected layout:\n{PASCAL_LAYOUT}", seg)
        val_file = self.root / "ImageSets" / "Segmentation" / "val.txt"
        if self.image_split is not None:
            val = ({ln.strip() for ln in val_file.read_text().splitlines() if ln.strip()} if val_file.is_file() else None)
            stems = [s for s in stems
                     if image_split_of(s, self.image_split, None if val is None else s in val) == self.split]
            if not stems:
                raise DatasetError(f"PascalFewShot: image_split {self.image_split} leaves no image in the "
                                   f"{self.split!r} part of '{seg}'", seg)
        elif val_file.is_file():
            val = {ln.strip() for ln in val_file.read_text().splitlines() if ln.strip()}
            stems = [s for s in stems if (s in val) != self.training]
        else:
            log.warning("pascal: no %s; train and val lists both contain every image of %s — give list_file "
                        "for a proper split", val_file, seg)
        return [("", 0, f"JPEGImages/{s}.jpg", f"SegmentationClassAug/{s}.png") for s in stems]

    def _instance_boxes(self, index: int, class_id: int):
        """Boxes of the objects of ``class_id`` from ``SegmentationObject/<id>.png`` (VOC2012's instance
        masks: object ids 1..N, 0 background, 255 border); ``None`` without that file. Object ``k``'s box
        is the box of its pixels that carry ``class_id`` in the class label."""
        lab_path = self._source.labels[index]
        obj_path = self.root / "SegmentationObject" / (lab_path.stem + ".png")
        if not obj_path.is_file():
            return None
        from ._io import read_label
        from .boxes import mask_box
        obj = read_label(obj_path, max_id=254, layout="SegmentationObject/<id>.png: object ids 1..N, 255 border")
        lab = self._source.read_label(index)
        if obj.shape != lab.shape:
            log.warning("pascal: %s is %s but its class mask is %s; using connected components", obj_path,
                        obj.shape, lab.shape)
            return None
        sel = lab == class_id
        ids = np.unique(obj[sel])
        boxes = [mask_box(sel & (obj == k)) for k in ids.tolist() if k not in (0, 255)]
        return [b for b in boxes if b is not None] or None

    def extra_repr(self) -> str:
        split = f", image_split={self.image_split}" if self.image_split is not None else ""
        return f"root='{self.root}', format={self.list_format!r}, min_pixels={self.min_pixels}{split}"
