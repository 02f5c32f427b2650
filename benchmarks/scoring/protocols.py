"""Few-shot evaluation under an explicit :class:`Protocol`; every result carries its protocol.

``evaluate(predict_fn, dataset_factory, protocol)`` runs ``protocol.episodes`` episodes for every seed
of ``protocol.seeds``, at every input size of ``protocol.scales`` (multi-scale testing: softmax
probabilities averaged over scales), scores them where ``protocol.resolution`` says and returns an
:class:`EvaluationResult` (class mIoU and FB-IoU in percent, mean over seeds, per seed, per class).

Scoring resolutions (docs/PROTOCOLS.md#test-resizing):

* ``'original'`` (default, PFENet ``ori_resize``): the logits ``[2, S, S]`` are bilinearly upsampled
  (``align_corners=True``) to ``L × L`` with ``L = max(h0, w0)`` of the original image, and the
  original-resolution label is pasted at the top-left of an ``L × L`` canvas filled with 255. Exactly
  PFENet's computation, including its sub-pixel misregistration (the letterboxed content covers
  ≈ 472/473 of the canvas).
* ``'original_crop'``: the letterboxed content region of the logits (:func:`~benchmarks.datasets.transforms.letterbox_shape`)
  is cropped and resized (bilinear, half-pixel centres) to exactly ``h0 × w0``: no padding, no
  misregistration. Needs ``resize`` in {'letterbox', 'shrink', 'squash'}.
* ``'input'``: scored at the network input against the transformed ``query_mask`` (the "473"
  alternative; with ``resize='squash'`` and size 400 this is HSNet's default 400×400 protocol).

The predict function receives the collated batch of one scale (``benchmarks.collate_episodes``; on
``device`` if given) and returns logits ``[B, 2, H, W]`` (or a dict with ``'logits'``); it runs under
``torch.no_grad()``. Put the model in ``eval()`` mode yourself.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..datasets import build_dataset, collate_episodes
from .metrics import FewShotIoU

__all__ = ["Protocol", "EvaluationResult", "evaluate", "evaluate_many", "dataset_factory", "content_shape", "BAM_SEEDS"]

log = logging.getLogger("benchmarks.scoring.protocols")

BAM_SEEDS = (510, 365, 382, 322, 988)  # np.random.seed(123); randint(0, 1000, 5) (docs/PROTOCOLS.md#seeds-and-episodes)
_RESOLUTIONS = ("original", "original_crop", "input")
_RESIZES = ("letterbox", "shrink", "squash", "none")
_PRETTY = {"pascal": "PASCAL-5i", "coco": "COCO-20i", "fss": "FSS-1000", "fss1000": "FSS-1000",
           "synthetic": "synthetic"}


@dataclass(frozen=True)
class Protocol:
    """Every knob of a few-shot evaluation; reported next to each result.

    Attributes:
        dataset: 'pascal' | 'coco' | 'fss' | 'synthetic'.
        fold, shot, split: which episodes ('val'/'test' = novel classes).
        episodes: episodes per seed (``None``: the dataset default, e.g. one per image for FSS-1000).
        seeds: episode seeds; results are averaged over them (BAM: :data:`BAM_SEEDS`).
        scales: test input sizes; more than one = multi-scale testing (DPCN: 473 and 641).
        resize: test transform: 'letterbox' (PFENet), 'shrink', 'squash' (HSNet), 'none'.
        resolution: 'original' (default), 'original_crop' or 'input' (module docstring).
        ignore_index: label value ignored by the metrics (255; the boundary band on PASCAL).
        episode_iou: also report the episode-wise mean foreground IoU.
        fold_scheme: COCO folds, 'interleaved' (default) or 'consecutive'.
        name: preset name ('' for a custom protocol).
        images: which images the split holds when the dataset's images are split by a rule of ours
            (e.g. PASCAL's ``image_split``), in words; '' for the dataset's own lists.
        support_annotation: 'mask' (default) or 'box': the supports are annotated by bounding boxes
            instead of masks (DPCN Table A2, PANet/CANet protocol); query ground truth unchanged. The
            box rule: :mod:`benchmarks.datasets.boxes`.

    Example:
        >>> p = Protocol.preset("dpcn", dataset="pascal", fold=1)
        >>> p.scales, p.episodes, p.resolution
        ((473, 641), 1000, 'original')
    """

    dataset: str = "pascal"
    fold: Optional[int] = 0
    shot: int = 1
    episodes: Optional[int] = 1000
    seeds: Tuple[int, ...] = (321,)
    split: str = "val"
    scales: Tuple[int, ...] = (473,)
    resize: str = "letterbox"
    resolution: str = "original"
    ignore_index: int = 255
    episode_iou: bool = False
    fold_scheme: str = "interleaved"
    name: str = ""
    images: str = ""
    support_annotation: str = "mask"

    def __post_init__(self):
        seeds = (self.seeds,) if isinstance(self.seeds, int) else tuple(int(s) for s in self.seeds)
        scales = (self.scales,) if isinstance(self.scales, int) else tuple(int(s) for s in self.scales)
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "scales", scales)
        if not seeds or any(s < 0 for s in seeds):
            raise ValueError(f"Protocol.seeds: expected one or more non-negative integers, got {self.seeds!r}")
        if not scales or any(s < 8 for s in scales):
            raise ValueError(f"Protocol.scales: expected one or more input sizes >= 8, got {self.scales!r}")
        if self.resolution not in _RESOLUTIONS:
            raise ValueError(f"Protocol.resolution: expected one of {_RESOLUTIONS}, got {self.resolution!r}")
        if self.resize not in _RESIZES:
            raise ValueError(f"Protocol.resize: expected one of {_RESIZES}, got {self.resize!r}")
        if self.resolution == "original_crop" and self.resize == "none":
            raise ValueError("Protocol: resolution='original_crop' needs a known resize (letterbox/shrink/squash)")
        if self.shot < 1:
            raise ValueError(f"Protocol.shot: expected >= 1, got {self.shot}")
        if self.episodes is not None and self.episodes < 1:
            raise ValueError(f"Protocol.episodes: expected >= 1 or None, got {self.episodes}")
        if self.fold_scheme not in ("interleaved", "consecutive"):
            raise ValueError(f"Protocol.fold_scheme: expected 'interleaved' or 'consecutive', got {self.fold_scheme!r}")
        if self.support_annotation not in ("mask", "box"):
            raise ValueError(f"Protocol.support_annotation: expected 'mask' or 'box', got {self.support_annotation!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "Protocol":
        """Published protocols (docs/PROTOCOLS.md#seeds-and-episodes, #test-resizing); keyword overrides replace any field.

        * ``'pfenet'``: seed 321, 5000 (PASCAL) / 20000 (COCO) episodes, 473 / 641, original resolution.
        * ``'bam'``: seeds :data:`BAM_SEEDS`, 1000 episodes, 473 / 641, original resolution.
        * ``'hsnet'``: seed 0, 1000 episodes (FSS-1000: every test image), 400×400 squash, scored at 400.
        * ``'dpcn'``: seed 321, 1000 episodes, multi-scale 473 + 641, original resolution.
        """
        ds = str(overrides.get("dataset", "pascal")).lower()
        coco = ds == "coco"
        base = {
            "pfenet": dict(seeds=(321,), episodes=20000 if coco else 5000, scales=(641,) if coco else (473,)),
            "bam": dict(seeds=BAM_SEEDS, episodes=1000, scales=(641,) if coco else (473,)),
            "hsnet": dict(seeds=(0,), episodes=None if ds.startswith("fss") else 1000, scales=(400,),
                          resize="squash", resolution="input"),
            "dpcn": dict(seeds=(321,), episodes=1000, scales=(473, 641)),
        }
        if name not in base:
            raise ValueError(f"preset: expected one of {sorted(base)}, got {name!r}")
        kw = dict(base[name], name=name)
        if ds.startswith("fss"):
            kw.update(fold=None, split="test")
        kw.update(overrides)
        return cls(**kw)

    def test_transform(self, size: int):
        """The evaluation transform of this protocol at input ``size``."""
        from ..datasets.transforms import test_transform
        return test_transform(size, self.resize)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        """One line: the protocol in words."""
        where = {"original": "scored at original resolution (L×L canvas)",
                 "original_crop": "scored at original resolution (exact crop)",
                 "input": f"scored at input resolution {self.scales[0]}"}[self.resolution]
        ds = _PRETTY.get(self.dataset, self.dataset)
        fold = f" fold {self.fold}" if self.fold is not None else ""
        scheme = f" ({self.fold_scheme} folds)" if self.dataset == "coco" else ""
        eps = "all" if self.episodes is None else str(self.episodes)
        seeds = ",".join(map(str, self.seeds))
        return (f"{ds}{fold}{scheme} {self.shot}-shot {self.split}: {eps} episodes × {len(self.seeds)} seed(s) "
                f"[{seeds}], {self.resize} {'+'.join(map(str, self.scales))}"
                f"{' (multi-scale)' if len(self.scales) > 1 else ''}, {where}, label {self.ignore_index} ignored"
                + (f", preset {self.name}" if self.name else "")
                + (", box supports (support masks replaced by their bounding boxes)"
                   if self.support_annotation == "box" else "")
                + (f", images: {self.images}" if self.images else ""))


@dataclass
class EvaluationResult:
    """Metrics of one evaluation with its protocol. Percentages (×100) as in the papers' tables.

    ``per_seed``: one dict per seed (``seed``, ``miou``, ``fbiou``, ``class_iou`` {class_id: %},
    ``episodes``, ``episodes_per_class``, ``images_per_class`` (distinct query images), ``episode_records``
    (:meth:`benchmarks.scoring.metrics.FewShotIoU.episode_records`: class, query image, foreground intersection and
    union of every episode), ``seconds`` and optionally ``episode_miou``).
    """

    protocol: Protocol
    per_seed: List[dict] = field(default_factory=list)
    class_names: Dict[int, str] = field(default_factory=dict)

    def _mean(self, key: str) -> float:
        v = [r[key] for r in self.per_seed if key in r]
        return sum(v) / len(v) if v else math.nan

    @property
    def miou(self) -> float:
        """Class mIoU (%) averaged over seeds."""
        return self._mean("miou")

    @property
    def fbiou(self) -> float:
        """FB-IoU (%) averaged over seeds."""
        return self._mean("fbiou")

    @property
    def miou_std(self) -> float:
        v = [r["miou"] for r in self.per_seed]
        if len(v) < 2:
            return 0.0
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))

    @property
    def class_iou(self) -> Dict[int, float]:
        """Per-class IoU (%) averaged over seeds (NaN for a class never sampled)."""
        keys = self.per_seed[0]["class_iou"].keys() if self.per_seed else []
        out = {}
        for c in keys:
            vals = [r["class_iou"][c] for r in self.per_seed if not math.isnan(r["class_iou"][c])]
            out[c] = sum(vals) / len(vals) if vals else math.nan
        return out

    def summary(self) -> str:
        """One line: numbers, then the protocol."""
        std = f" ± {self.miou_std:.2f}" if len(self.per_seed) > 1 else ""
        best = f" (best seed {max(r['miou'] for r in self.per_seed):.2f})" if len(self.per_seed) > 1 else ""
        ep = f", episode-wise fg-IoU {self._mean('episode_miou'):.2f}" if self.protocol.episode_iou else ""
        return f"mIoU {self.miou:.2f}{std}{best}, FB-IoU {self.fbiou:.2f}{ep} | {self.protocol.describe()}"

    def as_dict(self) -> dict:
        d = {"protocol": self.protocol.as_dict(), "miou": self.miou, "fbiou": self.fbiou, "miou_std": self.miou_std,
             "class_iou": {int(c): v for c, v in self.class_iou.items()},
             "class_names": {int(c): n for c, n in self.class_names.items()},
             "per_seed": self.per_seed, "summary": self.summary()}
        if self.protocol.episode_iou:
            d["episode_miou"] = self._mean("episode_miou")
        return d

    __str__ = summary


def dataset_factory(root=None, **dataset_kwargs) -> Callable:
    """A ``factory(protocol, seed, size)`` building the protocol's dataset with ``build_dataset``.

    ``root`` (not needed for 'synthetic') and ``dataset_kwargs`` (e.g. ``list_file=``, ``cache_dir=``,
    ``split_file=``, ``image_size=``) are passed through; ``fold``, ``shot``, ``split``, ``episodes``,
    ``seed``, ``fold_scheme`` (COCO), ``support_annotation`` and ``transform`` come from the protocol
    (a ``support_annotation`` among ``dataset_kwargs`` that contradicts the protocol is an error: the
    evaluation's annotation is a protocol field, reported with the result).

    Example:
        >>> f = dataset_factory(num_images=30, image_size=32)
        >>> ds = f(Protocol(dataset="synthetic", episodes=4, scales=(32,)), 0, 32)
        >>> len(ds), tuple(ds[0]["query_img"].shape)
        (4, (3, 32, 32))
    """

    def make(protocol: Protocol, seed: int, size: int):
        kw = dict(dataset_kwargs)
        name = protocol.dataset.lower()
        given = kw.pop("support_annotation", protocol.support_annotation)
        if given != protocol.support_annotation:
            raise ValueError(f"dataset argument support_annotation={given!r} contradicts the evaluation protocol's "
                             f"support_annotation={protocol.support_annotation!r}; for evaluation set it on the "
                             f"protocol (benchmarks/evaluate.py --support-annotation), for training in "
                             f"data.train_args (not data.args / data.val_args)")
        if protocol.support_annotation != "mask":
            kw["support_annotation"] = protocol.support_annotation
        if root is not None:
            kw["root"] = root
        kw.update(shot=protocol.shot, split=protocol.split, episodes=protocol.episodes, seed=seed,
                  transform=protocol.test_transform(size))
        if not name.startswith("fss"):
            kw["fold"] = protocol.fold
        if name == "coco":
            kw["fold_scheme"] = protocol.fold_scheme
        return build_dataset(name, **kw)

    return make


def _to_device(batch: dict, device) -> dict:
    if device is None:
        return batch
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out


def content_shape(h0: int, w0: int, canvas: Tuple[int, int], resize: str) -> Tuple[int, int]:
    """The size ``(h, w)`` an ``h0 x w0`` image takes inside a ``canvas`` under the protocol's ``resize``
    (``"squash"``: the canvas; ``"letterbox"``: fitted, upscaled; otherwise fitted, never upscaled)."""
    from ..datasets.transforms import letterbox_shape
    if resize == "squash":
        return canvas
    nh, nw = letterbox_shape(h0, w0, canvas[0], upscale=(resize == "letterbox"))
    return min(nh, canvas[0]), min(nw, canvas[1])


def _scored_probs(logits: torch.Tensor, batch: dict, i: int, protocol: Protocol, base_hw) -> torch.Tensor:
    """Probabilities ``[2, h, w]`` of sample ``i`` in the protocol's scoring space."""
    x = logits[i:i + 1].float()
    if protocol.resolution == "input":
        x = F.interpolate(x, size=base_hw, mode="bilinear", align_corners=True) if tuple(x.shape[-2:]) != base_hw else x
    else:
        lab = batch["query_label_orig"][i]
        h0, w0 = int(lab.shape[-2]), int(lab.shape[-1])
        if protocol.resolution == "original":
            L = max(h0, w0)
            x = F.interpolate(x, size=(L, L), mode="bilinear", align_corners=True)
        else:
            nh, nw = content_shape(h0, w0, tuple(batch["query_img"].shape[-2:]), protocol.resize)
            x = F.interpolate(x[..., :nh, :nw], size=(h0, w0), mode="bilinear", align_corners=False)
    return torch.softmax(x, dim=1)[0]


def _scored_target(batch: dict, i: int, protocol: Protocol) -> torch.Tensor:
    if protocol.resolution == "input":
        return batch["query_mask"][i].cpu()
    lab = batch["query_label_orig"][i].cpu()
    if protocol.resolution == "original_crop":
        return lab
    h0, w0 = lab.shape
    L = max(h0, w0)
    out = torch.full((L, L), protocol.ignore_index, dtype=torch.long)
    out[:h0, :w0] = lab
    return out


def _logits_of(out, batch) -> torch.Tensor:
    if isinstance(out, dict):
        if "logits" not in out:
            raise ValueError(f"predict_fn returned a dict without 'logits' (keys {sorted(out)})")
        out = out["logits"]
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[1] != 2:
        raise ValueError(f"predict_fn must return logits Tensor[B, 2, H, W], got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    B = batch["query_img"].shape[0]
    if out.shape[0] != B:
        raise ValueError(f"predict_fn returned {out.shape[0]} logit maps for a batch of {B} episodes")
    hw = tuple(batch["query_img"].shape[-2:])
    if tuple(out.shape[-2:]) != hw:  # be lenient: bring the logits to the input size first
        out = F.interpolate(out.float(), size=hw, mode="bilinear", align_corners=True)
    return out


def evaluate(predict_fn: Callable[[dict], torch.Tensor], dataset_factory: Callable, protocol: Protocol, *,
             batch_size: int = 1, num_workers: int = 0, device=None, progress: bool = False) -> EvaluationResult:
    """Evaluate ``predict_fn`` under ``protocol``.

    Args:
        predict_fn: ``f(batch) -> logits Tensor[B, 2, H, W]`` at the batch's input size (a dict with
            ``'logits'``, e.g. a model's output, is accepted).
        dataset_factory: ``f(protocol, seed, size) -> FewShotDataset`` (see :func:`dataset_factory`); the
            datasets of the different scales must yield the same episodes (they do: episodes depend on
            the seed only).
        protocol: the :class:`Protocol`.
        batch_size, num_workers: DataLoader settings; results do not depend on them.
        device: where to move the batch tensors before ``predict_fn`` (``None``: leave on CPU).
        progress: show a tqdm bar.
    Returns:
        :class:`EvaluationResult` (``.summary()`` one line, ``.as_dict()``).
    """
    return evaluate_many(lambda b: {"": predict_fn(b)}, dataset_factory, protocol, batch_size=batch_size,
                         num_workers=num_workers, device=device, progress=progress)[""]


def evaluate_many(predict_fn: Callable[[dict], Dict[str, torch.Tensor]], dataset_factory: Callable,
                  protocol: Protocol, *, batch_size: int = 1, num_workers: int = 0, device=None,
                  progress: bool = False) -> Dict[str, EvaluationResult]:
    """:func:`evaluate` of several predictions on the same episodes in one pass.

    ``predict_fn(batch)`` returns ``{label: logits Tensor[B, 2, H, W]}`` with the same labels for every
    batch (e.g. the K-shot fusion strategies of one model, which can share its 1-shot forwards); the
    result is ``{label: EvaluationResult}``, each exactly what :func:`evaluate` gives for that output.
    """
    per_seed: Dict[str, list] = {}
    class_names: Dict[int, str] = {}
    labels = None
    for seed in protocol.seeds:
        t0 = time.perf_counter()
        datasets = [dataset_factory(protocol, seed, s) for s in protocol.scales]
        ref = datasets[0]
        if getattr(ref, "training", False):
            raise ValueError("evaluate: the dataset_factory built a training-split dataset; use split 'val'/'test'")
        for d in datasets[1:]:
            if len(d) != len(ref) or list(d.class_ids) != list(ref.class_ids):
                raise ValueError("evaluate: the datasets of the different scales differ in length or classes")
        class_names = {c: ref.class_names.get(c, str(c)) for c in ref.class_ids}
        meters: Dict[str, FewShotIoU] = {}
        loaders = [DataLoader(d, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                              collate_fn=collate_episodes) for d in datasets]
        it = zip(*loaders)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(loaders[0]), desc=f"eval seed {seed}", leave=False)
        with torch.no_grad():
            for batches in it:
                b0 = batches[0]
                for b in batches[1:]:
                    if b["query_name"] != b0["query_name"] or not torch.equal(b["class_id"], b0["class_id"]):
                        raise ValueError("evaluate: the scales' datasets produced different episodes; the "
                                         "dataset_factory must give the same episodes for every size")
                base_hw = tuple(b0["query_img"].shape[-2:])
                outs = [_outputs_of(predict_fn(_to_device(b, device))) for b in batches]
                if labels is None:
                    labels = list(outs[0])
                if any(list(o) != labels for o in outs):
                    raise ValueError(f"evaluate_many: predict_fn must return the same labels for every batch "
                                     f"({labels}), got {[list(o) for o in outs]}")
                logits = {k: [_logits_of(o[k], b).detach().cpu() for o, b in zip(outs, batches)] for k in labels}
                B = b0["query_img"].shape[0]
                for k in labels:
                    meter = meters.setdefault(k, FewShotIoU(ref.class_ids, protocol.ignore_index, protocol.episode_iou))
                    for i in range(B):
                        prob = None
                        for lg, b in zip(logits[k], batches):
                            p = _scored_probs(lg, b, i, protocol, base_hw)
                            prob = p if prob is None else prob + p
                        meter.update(prob.argmax(0), _scored_target(b0, i, protocol), int(b0["class_index"][i]),
                                     query=str(b0["query_name"][i]))
        seconds = time.perf_counter() - t0
        if not meters:
            raise ValueError(f"evaluate: seed {seed} produced no episode")
        for k in labels:
            r = meters[k].compute()
            rec = meters[k].episode_records()
            images = {c: len({q for cc, q in zip(rec["class"], rec["query"]) if cc == c}) for c in ref.class_ids}
            res = {"seed": seed, "miou": 100 * r["miou"], "fbiou": 100 * r["fbiou"],
                   "class_iou": {c: 100 * v for c, v in r["class_iou"].items()}, "episodes": r["episodes"],
                   "episodes_per_class": r["episodes_per_class"], "images_per_class": images,
                   "episode_records": rec, "seconds": seconds}
            if protocol.episode_iou:
                res["episode_miou"] = 100 * r["episode_miou"]
            per_seed.setdefault(k, []).append(res)
            log.info("%sseed %d: mIoU %.2f FB-IoU %.2f (%d episodes, %.1fs)", f"{k}: " if k else "", seed,
                     res["miou"], res["fbiou"], res["episodes"], res["seconds"])
    return {k: EvaluationResult(protocol, per_seed[k], class_names) for k in labels}


def _outputs_of(out) -> Dict[str, torch.Tensor]:
    if not isinstance(out, dict) or not out:
        raise ValueError(f"evaluate_many: predict_fn must return a non-empty dict {{label: logits}}, got "
                         f"{type(out).__name__}")
    return out
