"""FSS-1000 in HSNet's layout and splits (docs/PROTOCOLS.md#fss-1000)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image

from ._io import CorruptFileError, DatasetError, PathLike, check_root, read_image, read_list_lines
from .base import FewShotDataset

__all__ = ["FSS1000"]

log = logging.getLogger("benchmarks.datasets")

FSS_LAYOUT = """FSS-1000/
  <class_name>/1.jpg ... 10.jpg   images
  <class_name>/1.png ... 10.png   masks (grey/RGB, object = bright; binarised at 128)
split files (HSNet data/splits/fss/{trn,val,test}.txt): one class name per line"""

# HSNet class-id offsets of its standard splits (trn 0-519, val 520-759, test 760-999)
_OFFSETS = {"trn": 0, "val": 520, "test": 760}


class FSS1000(FewShotDataset):
    """FSS-1000 episodes, HSNet protocol: one episode per image of the split (classes sorted by name,
    images sorted by file name), supports = other images of the same class, no area filter.

    Args:
        root: the FSS-1000 folder.
        split_file: HSNet split txt (class names, one a line), or the folder holding
            ``trn.txt``/``val.txt``/``test.txt`` (picked by ``split``). Not built in (no offline copy).
        split: ``'train'`` (``trn``), ``'val'`` or ``'test'``.
        shot, episodes (default: one per image, 2400 for the test split), seed, transform (default
        :func:`benchmarks.datasets.transforms.test_transform` ``(400, 'squash')``, as HSNet), on_error.
        class_id_offset: ``class_id = offset + 1 + index`` of the class in the sorted split list;
            default HSNet's (0 / 520 / 760 for trn / val / test), so ids are 1-based global ids.
        threshold: mask binarisation threshold on the 'L' image (128 as HSNet).
        support_annotation: ``'mask'`` or ``'box'`` (one box per 8-connected component, :mod:`benchmarks.datasets.boxes`).
    """

    dataset_name = "fss1000"
    default_episodes = None  # one episode per query image

    def __init__(self, root: PathLike, split_file: PathLike, split: str = "test", shot: int = 1, *,
                 episodes: Optional[int] = None, seed: int = 0, transform: Optional[Callable] = None,
                 class_id_offset: Optional[int] = None, threshold: int = 128, on_error: Optional[str] = None,
                 support_annotation: str = "mask"):
        super().__init__(split=split, shot=shot, fold=None, episodes=episodes, seed=seed, transform=transform,
                         sampling="sequential", on_small_pool="raise", on_error=on_error,
                         support_annotation=support_annotation)
        self.root = check_root(root, "FSS1000", FSS_LAYOUT)
        hs = {"train": "trn", "val": "val", "test": "test"}[split]
        sf = Path(split_file)
        if sf.is_dir():
            sf = sf / f"{hs}.txt"
        self.split_file = sf
        names = sorted({ln for _, ln in read_list_lines(sf)})
        if not names:
            raise DatasetError(f"FSS-1000 split file '{sf}' lists no class", sf)
        offset = _OFFSETS[hs] if class_id_offset is None else int(class_id_offset)
        self.threshold = threshold
        self.class_ids = [offset + 1 + k for k in range(len(names))]
        self.class_names = dict(zip(self.class_ids, names))
        imgs: List[Path] = []
        self._labels: List[Path] = []
        self._names = []
        pairs = []
        for cid, cname in zip(self.class_ids, names):
            d = self.root / cname
            if not d.is_dir():
                raise DatasetError(f"{sf}: class folder '{d}' does not exist. Expected layout:\n{FSS_LAYOUT}", d)
            jpgs = sorted(d.glob("*.jpg"), key=lambda p: p.name)
            if len(jpgs) < 2:
                raise DatasetError(f"FSS-1000 class folder '{d}' has {len(jpgs)} .jpg image(s); need at least 2 "
                                   f"(query + support). Expected layout:\n{FSS_LAYOUT}", d)
            for j in jpgs:
                m = j.with_suffix(".png")
                if not m.is_file():
                    raise DatasetError(f"FSS-1000: mask '{m}' for image '{j}' does not exist. Expected layout:\n"
                                       f"{FSS_LAYOUT}", m)
                pairs.append((len(imgs), cid))
                imgs.append(j)
                self._labels.append(m)
                self._names.append(f"{cname}/{j.stem}")
        self._images = imgs
        self._pairs = pairs
        self._counts = [None] * len(imgs)
        self._source = self  # load/files below
        self._finalize(min_pixels=0)

    def _default_transform(self):
        from . import transforms as T
        return T.test_transform(400, "squash")

    def files(self, i: int) -> Tuple[str, str]:
        return str(self._images[i]), str(self._labels[i])

    def load(self, i: int, class_id: int) -> Tuple[np.ndarray, np.ndarray]:
        img = read_image(self._images[i])
        p = self._labels[i]
        try:
            with Image.open(p) as im:
                im.load()
                m = np.asarray(im.convert("L"))
        except Exception as e:
            raise CorruptFileError(f"cannot decode FSS-1000 mask '{p}' ({type(e).__name__}: {e}); expected a PNG mask",
                               p) from e
        if m.shape != img.shape[:2]:
            raise DatasetError(f"FSS-1000 mask '{p}' is {m.shape[1]}x{m.shape[0]} but image '{self._images[i]}' is "
                               f"{img.shape[1]}x{img.shape[0]}", p)
        return img, (m >= self.threshold).astype(np.uint8)

    def extra_repr(self) -> str:
        return f"root='{self.root}', split_file='{self.split_file}', classes={len(self.class_ids)}"
