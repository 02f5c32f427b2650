"""Box supports (DPCN Table A2, the PANet/CANet protocol): a support mask replaced by its boxes.

The rule (also in docs/DATA.md, "Box supports"), applied to the episode mask of one class at the
image's original resolution, before any transform:

* **boxes**: one box per *instance* of the class where the dataset has instances (COCO instance JSON:
  one per non-crowd annotation; PASCAL: one per object of ``SegmentationObject/<id>.png`` when that
  file exists), otherwise one per 8-connected component of the class's pixels (label 1) covering at
  least :data:`BOX_MIN_AREA` pixels; when no component is that large the largest one gets the box, so
  a support never loses its object. A box is the tight pixel bounding box (``y0:y1, x0:x1``, ends
  exclusive) of the instance's / component's label-1 pixels;
* **label**: 1 inside the union of the boxes, 0 elsewhere, except that every pixel that was 255
  (ignore: PASCAL's border band, COCO crowd regions) in the episode mask stays 255, inside a box
  or not. An object that is an axis-aligned rectangle therefore has a box label equal to its mask.

Only the support labels change: queries, their ground truth and the episode draws are those of
mask mode (see :class:`~benchmarks.datasets.FewShotDataset`, ``support_annotation``).
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import numpy as np

__all__ = ["BOX_MIN_AREA", "Box", "component_boxes", "mask_box", "boxes_label", "SUPPORT_ANNOTATIONS"]

#: smallest connected component (pixels at original resolution) that gets its own box (≈ 8×8)
BOX_MIN_AREA = 64
SUPPORT_ANNOTATIONS = ("mask", "box")

Box = Tuple[int, int, int, int]  # (y0, x0, y1, x1), ends exclusive


def _runs(fg: np.ndarray):
    """Horizontal runs of ``fg``: arrays ``row, start, end`` (end exclusive), row-major order."""
    h, w = fg.shape
    p = np.zeros((h, w + 2), dtype=np.int8)
    p[:, 1:-1] = fg
    d = np.diff(p, axis=1)
    rs, cs = np.nonzero(d == 1)
    _, ce = np.nonzero(d == -1)
    return rs, cs, ce


def component_boxes(fg: np.ndarray, min_area: int = BOX_MIN_AREA) -> List[Box]:
    """Bounding boxes of the 8-connected components of the boolean ``fg``, largest first.

    Components smaller than ``min_area`` pixels are dropped, unless none reaches it: then the largest
    one is kept (an empty ``fg`` gives no box).

    Example:
        >>> m = np.zeros((6, 8), bool); m[0:2, 0:3] = True; m[2, 3] = True; m[5, 7] = True
        >>> component_boxes(m, min_area=2)   # the diagonal pixel joins the first block (8-connectivity)
        [(0, 0, 3, 4)]
        >>> component_boxes(m, min_area=0)
        [(0, 0, 3, 4), (5, 7, 6, 8)]
    """
    fg = np.asarray(fg, dtype=bool)
    if fg.ndim != 2:
        raise ValueError(f"component_boxes: expected a 2-D mask, got shape {fg.shape}")
    rows, starts, ends = _runs(fg)
    n = len(rows)
    if n == 0:
        return []
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # runs of each row as a slice of the (row-major) run arrays
    row_first = np.searchsorted(rows, np.arange(fg.shape[0] + 1))
    for r in range(1, fg.shape[0]):
        a0, a1 = row_first[r], row_first[r + 1]
        b0, b1 = row_first[r - 1], row_first[r]
        if a0 == a1 or b0 == b1:
            continue
        bs, be = starts[b0:b1], ends[b0:b1]
        for a in range(a0, a1):
            # 8-adjacent runs of the row above: start_b <= end_a and end_b >= start_a (ends exclusive)
            lo = int(np.searchsorted(be, starts[a], side="left"))
            hi = int(np.searchsorted(bs, ends[a], side="right"))
            for b in range(b0 + lo, b0 + hi):
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(a) for a in range(n)])
    uniq, inv = np.unique(roots, return_inverse=True)
    k = len(uniq)
    area = np.bincount(inv, weights=ends - starts, minlength=k).astype(np.int64)
    y0 = np.full(k, fg.shape[0]); x0 = np.full(k, fg.shape[1]); y1 = np.zeros(k, np.int64); x1 = np.zeros(k, np.int64)
    np.minimum.at(y0, inv, rows); np.maximum.at(y1, inv, rows + 1)
    np.minimum.at(x0, inv, starts); np.maximum.at(x1, inv, ends)
    order = sorted(range(k), key=lambda i: (-area[i], y0[i], x0[i]))
    keep = [i for i in order if area[i] >= min_area] or order[:1]
    return [(int(y0[i]), int(x0[i]), int(y1[i]), int(x1[i])) for i in keep]


def mask_box(fg: np.ndarray):
    """The tight box ``(y0, x0, y1, x1)`` of the boolean ``fg`` (one instance), or ``None`` when empty."""
    ys = np.flatnonzero(np.asarray(fg).any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(np.asarray(fg).any(axis=0))
    return int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1


def boxes_label(mask: np.ndarray, boxes: Iterable[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """The box label of an episode mask: 1 inside the union of ``boxes``, 0 elsewhere, ``ignore_index`` kept.

    Example:
        >>> m = np.array([[0, 1, 255], [0, 0, 1], [255, 0, 0]], np.uint8)
        >>> boxes_label(m, [(0, 1, 2, 3)]).tolist()
        [[0, 1, 255], [0, 1, 1], [255, 0, 0]]
    """
    out = np.zeros(mask.shape, dtype=np.uint8)
    for y0, x0, y1, x1 in boxes:
        out[y0:y1, x0:x1] = 1
    out[mask == ignore_index] = ignore_index
    return out
