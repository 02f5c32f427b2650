"""Image sources: where an image and the binary mask of one class come from.

:class:`PngLabelSource` serves PASCAL (SegmentationClassAug) and COCO-20i from per-image index PNGs;
the COCO instance-JSON source lives in :mod:`benchmarks.datasets.coco`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ._io import CorruptFileError, PoolCache, class_counts, file_stamp, fingerprint, read_image, read_label
from .base import binarize

log = logging.getLogger("benchmarks.datasets")


class PngLabelSource:
    """Images with class-index label PNGs (ids ``0..max_id``, 255 = ignore).

    ``counts`` holds, per image, ``{class_id: pixels}`` of the original-resolution label, computed
    once and cached on disk (keyed by the label paths with their size and mtime), or ``None`` for
    an image whose mask could not be read (only with ``on_error='skip'``).
    """

    def __init__(self, images: Sequence[Path], labels: Sequence[Path], *, max_id: int, layout: str,
                 cache_dir: Optional[Path], kind: str, scan: bool = True, on_error: str = "raise"):
        self.images = [Path(p) for p in images]
        self.labels = [Path(p) for p in labels]
        self.max_id = max_id
        self.layout = layout
        self.counts: List[Optional[dict]] = [None] * len(self.labels)
        self.scanned = bool(scan)  # after a scan, counts[i] is None only for an unreadable mask
        if scan:
            self.counts = self._scan(cache_dir, kind, on_error)

    def _scan(self, cache_dir, kind, on_error) -> List[Optional[dict]]:
        key = fingerprint([kind, self.max_id] + [f"{p.resolve()}|{file_stamp(p)}" for p in self.labels])
        cache = PoolCache(cache_dir, kind, key)
        cached = cache.load()
        if cached is not None and len(cached) == len(self.labels):
            log.debug("loaded class pixel counts of %d masks from %s", len(cached), cache.path)
            return [None if c is None else {int(k): int(v) for k, v in c.items()} for c in cached]
        counts: List[Optional[dict]] = []
        bad = 0
        for p in self.labels:
            try:
                counts.append(class_counts(read_label(p, max_id=self.max_id, layout=self.layout), self.max_id))
            except CorruptFileError as e:
                if on_error == "raise":
                    raise
                log.warning("skipping unreadable mask %s: %s", p, e)
                counts.append(None)
                bad += 1
        if not bad:  # never cache a scan that met unreadable files: they may be fixed later
            cache.save([{str(k): v for k, v in c.items()} for c in counts])
        return counts

    def files(self, i: int) -> Tuple[str, str]:
        return str(self.images[i]), str(self.labels[i])

    def read_label(self, i: int) -> np.ndarray:
        return read_label(self.labels[i], max_id=self.max_id, layout=self.layout)

    def load(self, i: int, class_id: int) -> Tuple[np.ndarray, np.ndarray]:
        img = read_image(self.images[i])
        lab = self.read_label(i)
        if img.shape[:2] != lab.shape:
            raise CorruptFileError(f"image '{self.images[i]}' is {img.shape[1]}x{img.shape[0]} (WxH) but its mask "
                               f"'{self.labels[i]}' is {lab.shape[1]}x{lab.shape[0]}; they must have the same size",
                               self.labels[i])
        return img, binarize(lab, class_id)
