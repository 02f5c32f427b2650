"""The shared few-shot episode machinery: class pools, query rules, deterministic episodes, records.

Every dataset (PASCAL-5i, COCO-20i, FSS-1000, synthetic) is a :class:`FewShotDataset`; a subclass
only describes its images (names, per-class pixel counts, how to load an image and the binary mask
of one class) and the base class applies the protocol of docs/PROTOCOLS.md (#small-object-filter,
#episode-labels, #episode-sampling):

* **support pools**: image ``i`` enters the pool of class ``c`` iff ``c`` is an episode class of the
  split and covers at least ``min_pixels`` pixels (2048 = 2·32·32 for PASCAL/COCO) at original
  resolution;
* **queries**: an image is a query iff it has at least one qualifying class; the episode class is
  then drawn uniformly from *all* split classes present in the image, without re-applying the
  area test (PFENet, confirmed in PFENet issue #11). Pair lists (HSNet, FSS-1000) fix the class;
* **supports**: ``shot`` distinct pool images, never the query image itself. A pool that is too
  small raises a ``ValueError`` at construction (PFENet's sampler would loop forever);
* **evaluation episodes** are pre-generated with ``numpy.random.default_rng(seed)``: episode ``e``
  is a pure function of ``(seed, e)`` — identical for any ``num_workers``/batch size/transform size;
* **training episodes** are re-drawn every epoch from ``default_rng([seed, epoch])``
  (:meth:`FewShotDataset.set_epoch`); augmentation randomness comes from
  ``default_rng([seed, epoch, index])``, so training is seedable and worker-independent too;
* **box supports** (``support_annotation="box"``, DPCN Table A2): every support mask is replaced by
  the label of its boxes (:mod:`benchmarks.datasets.boxes`); queries, their ground truth and the
  episode draws stay those of mask mode.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ._io import CorruptFileError, DatasetError
from .boxes import BOX_MIN_AREA, SUPPORT_ANNOTATIONS, boxes_label, component_boxes

__all__ = ["FewShotDataset", "Episode", "collate_episodes", "binarize"]

log = logging.getLogger("benchmarks.datasets")


class Episode(NamedTuple):
    """One episode as image indices into the dataset: ``query``, ``class_id``, ``supports``."""
    query: int
    class_id: int
    supports: Tuple[int, ...]


def binarize(label: np.ndarray, class_id: int, ignore_index: int = 255) -> np.ndarray:
    """Episode label for ``class_id`` (docs/PROTOCOLS.md#episode-labels): 1 where ``label == class_id``,
    255 kept, 0 elsewhere.

    Example:
        >>> binarize(np.array([[0, 3, 5], [255, 3, 0]], dtype=np.uint8), 3).tolist()
        [[0, 1, 0], [255, 1, 0]]
    """
    out = np.zeros(label.shape, dtype=np.uint8)
    out[label == class_id] = 1
    out[label == ignore_index] = ignore_index
    return out


def _check_int(name: str, v, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    return int(v)


class FewShotDataset(Dataset):
    """Base class of the episode datasets; see the module docstring for the protocol.

    Subclasses set ``self._names`` (image names), ``self._counts`` (per image ``{class: pixels}`` or
    ``None`` when not scanned), optionally ``self._pairs`` (``[(image, class)]`` fixed query pairs),
    ``self.class_ids`` (episode classes of this split, in class-index order), ``self.class_names``
    and implement :meth:`_load` (image ``uint8[H,W,3]``, binary mask ``uint8[H,W]`` in {0,1,255}),
    then call :meth:`_finalize`.

    ``support_annotation``: ``"mask"`` (default) or ``"box"``: the supports' masks are replaced by
    their boxes (:mod:`benchmarks.datasets.boxes` states the rule). A subclass with instance
    annotations overrides :meth:`_instance_boxes` (or its source has ``instance_boxes(i, class_id)``);
    otherwise the boxes are those of the class's 8-connected components.
    """

    dataset_name = "fewshot"
    default_episodes: Optional[int] = 1000

    def __init__(self, *, split: str, shot: int, fold: Optional[int], episodes: Optional[int], seed: int,
                 transform: Optional[Callable], sampling: str = "sequential", on_small_pool: str = "raise",
                 on_error: Optional[str] = None, support_annotation: str = "mask"):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split: expected 'train', 'val' or 'test', got {split!r}")
        self.split = split
        self.training = split == "train"
        self.shot = _check_int("shot", shot, 1)
        self.fold = fold
        self.seed = _check_int("seed", seed, 0)
        if episodes is not None:
            episodes = _check_int("episodes", episodes, 1)
        self.num_episodes_arg = episodes
        if sampling not in ("sequential", "class_balanced"):
            raise ValueError(f"sampling: expected 'sequential' (PFENet/HSNet-PASCAL) or 'class_balanced' "
                             f"(HSNet-COCO), got {sampling!r}")
        self.sampling = sampling
        if on_small_pool not in ("raise", "skip"):
            raise ValueError(f"on_small_pool: expected 'raise' or 'skip', got {on_small_pool!r}")
        self.on_small_pool = on_small_pool
        if on_error is None:
            on_error = "skip" if self.training else "raise"
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        if support_annotation not in SUPPORT_ANNOTATIONS:
            raise ValueError(f"support_annotation: expected 'mask' or 'box' (DPCN Table A2: supports annotated by "
                             f"bounding boxes), got {support_annotation!r}")
        self.support_annotation = support_annotation
        self.transform = transform
        self.epoch = 0
        self._episode_cache: Optional[Tuple[int, np.ndarray, np.ndarray, np.ndarray]] = None
        self._bad: set = set()
        self._pairs: Optional[List[Tuple[int, int]]] = None

    # ------------------------------------------------------------------ subclass interface
    _source = None  # an object with .load(i, class_id) and .files(i) (see sources.py)

    def _load(self, index: int, class_id: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image ``uint8[H,W,3]`` and the episode mask ``uint8[H,W]`` in {0,1,255} for ``class_id``."""
        return self._source.load(index, class_id)

    def _instance_boxes(self, index: int, class_id: int) -> Optional[List[Tuple[int, int, int, int]]]:
        """Boxes ``(y0, x0, y1, x1)`` of the instances of ``class_id`` in image ``index``, or ``None``
        when the dataset has no instance annotation for it (then connected components are used)."""
        fn = getattr(self._source, "instance_boxes", None)
        return fn(index, class_id) if fn is not None else None

    def support_boxes(self, index: int, class_id: int, mask: np.ndarray) -> List[Tuple[int, int, int, int]]:
        """The boxes that replace ``mask`` (the episode mask of ``class_id`` in image ``index``) in box mode."""
        boxes = self._instance_boxes(index, class_id)
        if not boxes:
            boxes = component_boxes(mask == 1, BOX_MIN_AREA)
        return list(boxes)

    def load_support(self, index: int, class_id: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image and support label of image ``index`` for ``class_id`` as episodes use them: the episode
        mask, or in box mode the label of its boxes (:func:`~benchmarks.datasets.boxes.boxes_label`)."""
        img, mask = self._load(index, class_id)
        if self.support_annotation == "box":
            mask = boxes_label(mask, self.support_boxes(index, class_id, mask))
        return img, mask

    def _files(self, index: int) -> Tuple[str, ...]:
        return self._source.files(index) if self._source is not None else ()

    def _default_transform(self):  # pragma: no cover - overridden
        from . import transforms as T
        return T.train_transform() if self.training else T.test_transform()

    # ------------------------------------------------------------------ index building
    def _finalize(self, *, min_pixels: int, exclude_classes: Sequence[int] = ()) -> None:
        """Build queries and pools from ``_counts``/``_pairs`` (docs/PROTOCOLS.md#small-object-filter) and
        pre-generate eval episodes."""
        self.min_pixels = _check_int("min_pixels", min_pixels, 0)
        classes = list(self.class_ids)
        cls_set = set(classes)
        self.class_index = {c: i for i, c in enumerate(classes)}
        excl = set(exclude_classes)
        n = len(self._names)
        dropped = 0
        keep = np.ones(n, dtype=bool)
        if excl:
            for i, cnt in enumerate(self._counts):
                if cnt is not None and any(c in excl for c in cnt):
                    keep[i] = False
                    dropped += 1
        self.num_excluded = dropped
        pools: Dict[int, List[int]] = {c: [] for c in classes}
        queries: List[Tuple[int, Tuple[int, ...]]] = []
        if self._pairs is None:
            for i, cnt in enumerate(self._counts):
                if cnt is None or not keep[i]:
                    continue
                present = tuple(c for c in classes if cnt.get(c, 0) > 0)
                qual = [c for c in present if cnt[c] >= self.min_pixels]
                if qual:
                    queries.append((i, present))
                    for c in qual:
                        pools[c].append(i)
        else:
            seen = {c: set() for c in classes}
            scanned = bool(getattr(self._source, "scanned", False))
            for i, c in self._pairs:
                if c not in cls_set:
                    raise DatasetError(f"pair ({self._names[i]}, class {c}) is not an episode class of this split "
                                       f"(classes {classes}); check the split file and fold")
                if not keep[i]:
                    continue
                cnt = self._counts[i]
                if cnt is None and scanned:  # unreadable mask, skipped (logged) during the scan
                    continue
                if cnt is not None and cnt.get(c, 0) == 0:
                    log.warning("%s: class %d does not occur in %s; pair skipped", self.dataset_name, c, self._names[i])
                    continue
                queries.append((i, (c,)))
                if (cnt is None or cnt.get(c, 0) >= self.min_pixels) and i not in seen[c]:
                    seen[c].add(i)
                    pools[c].append(i)
        # K distinct supports other than the query must exist for every (query, class) that can be drawn
        pool_sets = {c: set(p) for c, p in pools.items()}
        fixed: List[Tuple[int, Tuple[int, ...]]] = []
        skipped: Dict[int, int] = {}
        for i, present in queries:
            ok = []
            for c in present:
                usable = len(pools[c]) - (1 if i in pool_sets[c] else 0)
                if usable >= self.shot:
                    ok.append(c)
                elif self.on_small_pool == "raise":
                    raise ValueError(
                        f"{self.dataset_name} ({self.split}, fold {self.fold}): class {c} "
                        f"({self.class_names.get(c, c)}) has {len(pools[c])} support image(s) after the "
                        f"{self.min_pixels}-pixel filter, {usable} of them usable for query '{self._names[i]}'; "
                        f"{self.shot}-shot episodes need at least {self.shot} images other than the query. Use "
                        f"fewer shots, a smaller min_pixels, or on_small_pool='skip' to drop such classes")
                else:
                    skipped[c] = skipped.get(c, 0) + 1
            if ok:
                fixed.append((i, tuple(ok)))
        if skipped:
            log.warning("%s (%s, fold %s): dropped class(es) %s from some queries: support pool smaller than "
                        "shot=%d (on_small_pool='skip')", self.dataset_name, self.split, self.fold,
                        sorted(skipped), self.shot)
        if not fixed:
            raise ValueError(f"{self.dataset_name} ({self.split}, fold {self.fold}): no query image has an episode "
                             f"class with a large enough support pool (classes {classes}, min_pixels "
                             f"{self.min_pixels}, shot {self.shot}, {n} images scanned)")
        self._queries = fixed
        self._pools = {c: np.asarray(p, dtype=np.int64) for c, p in pools.items()}
        by_class: Dict[int, List[int]] = {c: [] for c in classes}
        for qi, (_, present) in enumerate(fixed):
            for c in present:
                by_class[c].append(qi)
        self._queries_by_class = {c: np.asarray(v, dtype=np.int64) for c, v in by_class.items() if v}
        if self.num_episodes_arg is not None:
            self.num_episodes = self.num_episodes_arg
        elif self.training or self.default_episodes is None:
            self.num_episodes = len(fixed)
        else:
            self.num_episodes = self.default_episodes
        if not self.training:
            self._episodes_for(0)  # pre-generate now so errors surface at construction

    # ------------------------------------------------------------------ public inspection
    @property
    def image_names(self) -> List[str]:
        """Names of all images the dataset knows (list order)."""
        return list(self._names)

    @property
    def pools(self) -> Dict[int, List[str]]:
        """Support pool per episode class: image names after the ``min_pixels`` filter."""
        return {c: [self._names[i] for i in p] for c, p in self._pools.items()}

    @property
    def queries(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """Query images with the classes an episode may ask for (docs/PROTOCOLS.md#small-object-filter)."""
        return [(self._names[i], cs) for i, cs in self._queries]

    def stats(self) -> dict:
        """Counts for documentation: images, query images, pool size per class, excluded images."""
        return {
            "dataset": self.dataset_name, "split": self.split, "fold": self.fold, "shot": self.shot,
            "images": len(self._names), "query_images": len(self._queries),
            "query_pairs": sum(len(cs) for _, cs in self._queries) if self._pairs is None else len(self._queries),
            "pool_sizes": {int(c): int(len(p)) for c, p in self._pools.items()},
            "excluded_images": int(getattr(self, "num_excluded", 0)), "min_pixels": self.min_pixels,
        }

    # ------------------------------------------------------------------ episodes
    def set_epoch(self, epoch: int) -> None:
        """Select the training episodes of ``epoch`` (a pure function of ``(seed, epoch)``).

        Call it before creating the epoch's DataLoader iterator (workers copy the dataset then; with
        ``persistent_workers=True`` the change would not reach them).
        """
        self.epoch = _check_int("epoch", epoch, 0)

    def _draw_supports(self, rng: np.random.Generator, c: int, query: int) -> Tuple[int, ...]:
        pool = self._pools[c]
        chosen: List[int] = []
        tries = 0
        while len(chosen) < self.shot:
            j = int(pool[rng.integers(len(pool))])
            tries += 1
            if j != query and j not in chosen and j not in self._bad:
                chosen.append(j)
            elif tries > 1000 * self.shot:
                raise ValueError(f"{self.dataset_name}: cannot draw {self.shot} distinct readable supports for "
                                 f"class {c} (pool of {len(pool)}, {len(self._bad)} unreadable images)")
        return tuple(chosen)

    def _draw_query(self, rng: np.random.Generator, qi: int) -> Tuple[int, int]:
        img, present = self._queries[qi]
        c = present[int(rng.integers(len(present)))] if len(present) > 1 else present[0]
        return img, c

    def _episodes_for(self, epoch: int):
        key = epoch if self.training else 0
        if self._episode_cache is not None and self._episode_cache[0] == key:
            return self._episode_cache[1:]
        n, Q, K = self.num_episodes, len(self._queries), self.shot
        rng = np.random.default_rng([self.seed, key]) if self.training else np.random.default_rng(self.seed)
        q = np.empty(n, dtype=np.int64)
        cls = np.empty(n, dtype=np.int64)
        sup = np.empty((n, K), dtype=np.int64)
        if self.sampling == "sequential":
            if self.training:  # shuffled like a DataLoader with shuffle=True, one permutation per pass
                reps = -(-n // Q)
                order = np.concatenate([rng.permutation(Q) for _ in range(reps)])[:n]
            else:  # PFENet/HSNet evaluation: the query list in order, cycled
                order = np.arange(n) % Q
            for e in range(n):
                img, c = self._draw_query(rng, int(order[e]))
                q[e], cls[e] = img, c
                sup[e] = self._draw_supports(rng, c, img)
        else:
            classes = sorted(self._queries_by_class)
            for e in range(n):
                c = classes[int(rng.integers(len(classes)))]
                cand = self._queries_by_class[c]
                img = self._queries[int(cand[rng.integers(len(cand))])][0]
                q[e], cls[e] = img, c
                sup[e] = self._draw_supports(rng, c, img)
        self._episode_cache = (key, q, cls, sup)
        return q, cls, sup

    def episode(self, index: int) -> Episode:
        """The ``index``-th episode of the current epoch (eval: of the fixed list)."""
        if not 0 <= index < len(self):
            raise IndexError(f"episode index {index} out of range for {len(self)} episodes")
        q, cls, sup = self._episodes_for(self.epoch)
        return Episode(int(q[index]), int(cls[index]), tuple(int(s) for s in sup[index]))

    @property
    def episodes(self) -> List[Episode]:
        """All episodes of the current epoch (eval: the fixed list)."""
        q, cls, sup = self._episodes_for(self.epoch)
        return [Episode(int(a), int(b), tuple(int(s) for s in r)) for a, b, r in zip(q, cls, sup)]

    def __len__(self) -> int:
        return self.num_episodes

    # ------------------------------------------------------------------ records
    def _transform(self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        if self.transform is None:
            self.transform = self._default_transform()
        out = self.transform(img, mask, rng)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("transform must return (image Tensor[3,H,W], mask Tensor[H,W]); got "
                            f"{type(out).__name__}")
        return out

    def _make_record(self, ep: Episode, rng: np.random.Generator) -> dict:
        q_img, q_mask = self._load(ep.query, ep.class_id)
        s_raw = [self.load_support(s, ep.class_id) for s in ep.supports]
        qi, qm = self._transform(q_img, q_mask, rng)
        s_imgs, s_masks = [], []
        for im, m in s_raw:
            si, sm = self._transform(im, m, rng)
            s_imgs.append(si)
            s_masks.append(sm)
        shapes = {tuple(t.shape) for t in s_imgs}
        if len(shapes) > 1:
            raise ValueError(f"{self.dataset_name}: the transform produced support images of different sizes "
                             f"{sorted(shapes)}; use a fixed-size transform (test_transform/train_transform)")
        rec = {
            "query_img": qi, "query_mask": qm.long(),
            "support_imgs": torch.stack(s_imgs), "support_masks": torch.stack(s_masks).long(),
            "class_id": int(ep.class_id), "class_index": int(self.class_index[ep.class_id]),
        }
        if not self.training:
            rec["query_label_orig"] = torch.from_numpy(q_mask.astype(np.int64))
            rec["query_name"] = self._names[ep.query]
            rec["support_names"] = [self._names[s] for s in ep.supports]
        return rec

    def __getitem__(self, index: int) -> dict:
        ep = self.episode(index)
        rng = np.random.default_rng([self.seed, self.epoch if self.training else 0, index])
        try:
            return self._make_record(ep, rng)
        except CorruptFileError as err:
            if self.on_error == "raise":
                raise
            first = err
        # on_error == "skip": log the path and replace the episode by a deterministic re-draw
        for attempt in range(10):
            log.warning("%s: skipping unreadable file %s (episode %d): %s", self.dataset_name,
                        getattr(first, "path", None), index, first)
            bad = self._index_of_path(getattr(first, "path", None))
            if bad is not None:
                self._bad.add(bad)
            r = np.random.default_rng([self.seed, self.epoch, index, 1 + attempt])
            cand = [k for k, (img, _) in enumerate(self._queries) if img not in self._bad]
            if not cand:
                break
            img, c = self._draw_query(r, cand[int(r.integers(len(cand)))])
            try:
                ep = Episode(img, c, self._draw_supports(r, c, img))
                return self._make_record(ep, r)
            except CorruptFileError as err:
                first = err
        raise DatasetError(f"{self.dataset_name}: too many unreadable files around episode {index}; last: {first}",
                           getattr(first, "path", None))

    def _index_of_path(self, path) -> Optional[int]:
        if path is None:
            return None
        if getattr(self, "_path_index", None) is None:
            self._path_index = {str(f): i for i in range(len(self._names)) for f in self._files(i)}
        return self._path_index.get(str(path))

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, fold={self.fold}, shot={self.shot}, "
                f"episodes={len(self)}, seed={self.seed}, queries={len(self._queries)}"
                + (", " + self.extra_repr() if self.extra_repr() else "") + ")")


def collate_episodes(batch: Sequence[dict]) -> dict:
    """Batch episode records (see docs/CONTRACTS.md) for a DataLoader's ``collate_fn``.

    Tensors are stacked (``query_img`` [B,3,H,W], ``query_mask`` [B,H,W], ``support_imgs``
    [B,K,3,H,W], ``support_masks`` [B,K,H,W]); ``class_id``/``class_index`` become ``LongTensor[B]``;
    ``query_label_orig`` (variable size) stays a list of tensors; names stay lists.

    Example:
        >>> r = {"query_img": torch.zeros(3, 4, 4), "query_mask": torch.zeros(4, 4, dtype=torch.long),
        ...      "support_imgs": torch.zeros(1, 3, 4, 4), "support_masks": torch.zeros(1, 4, 4, dtype=torch.long),
        ...      "class_id": 3, "class_index": 2}
        >>> b = collate_episodes([r, r])
        >>> tuple(b["support_imgs"].shape), b["class_id"].tolist()
        ((2, 1, 3, 4, 4), [3, 3])
    """
    if not batch:
        raise ValueError("collate_episodes: empty batch")
    out: dict = {}
    for key in batch[0]:
        vals = [r[key] for r in batch]
        if key == "query_label_orig" or isinstance(vals[0], (str, list)):
            out[key] = vals
        elif isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise ValueError(f"collate_episodes: '{key}' shapes differ across the batch {sorted(shapes)}; use a "
                                 "fixed-size transform (test_transform / train_transform crop) or batch_size=1")
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, np.integer)):
            out[key] = torch.tensor([int(v) for v in vals], dtype=torch.long)
        else:
            out[key] = vals
    return out
