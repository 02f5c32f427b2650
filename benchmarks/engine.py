"""The train/evaluate engine behind ``examples/train_dpcn.py``, ``benchmarks/plug_in.py`` and ``benchmarks/evaluate.py``.

One :func:`train` call runs a whole recipe (:mod:`benchmarks.config`): it builds the model with
:func:`models.build_model`, the episode datasets with :func:`benchmarks.datasets.build_dataset`, trains
with SGD (or AdamW) + the poly schedule (updated every iteration, PFENet's ``(1 - it/max_it)^0.9`` with ``it``
counted from 1), validates with :func:`benchmarks.evaluation.evaluate`, keeps the best checkpoint by
validation class mIoU and finally evaluates it (and a no-training reference) under the recipe's
:class:`~benchmarks.evaluation.Protocol`.

Run folder (``run.out_dir/run.name``)::

    config.yaml     the resolved config (every default filled in)
    log.jsonl       one JSON object per line: "start", "train" (every log_every iterations), "epoch",
                    "eval", "end" events (append-only; a resumed run continues the file)
    last.pth        written atomically (tmp + os.replace) at the end of every epoch and every
                    ``train.checkpoint_every_iters`` iterations: model, optimizer, scheduler, sampler
                    position, RNG states, history
    best.pth        the checkpoint with the best validation mIoU
    results.json    the final evaluation (trained model and references) with its protocol
    tb/             TensorBoard events (only when ``tensorboard`` is importable)

Determinism / resume: every epoch starts with ``seed_everything(seed + epoch + 100000·rank)``; the
training episodes of an epoch are a pure function of ``(seed, epoch)`` and their augmentation of
``(seed, epoch, index)`` (the datasets' contract), so the data never depends on workers or on the
process history. A checkpoint taken inside an epoch also stores the RNG states *after* the step, which
a resumed run restores once the epoch's DataLoader iterator exists; on CPU a resumed run therefore
finishes with bit-identical weights (tested). On CUDA bilinear-upsampling backward is not
deterministic, so resumed and uninterrupted GPU runs agree only up to float noise.

Distributed: launched by ``torchrun --nproc_per_node N``, every process trains on its share of the
episodes (:class:`ResumableDistributedSampler`, a ``DistributedSampler`` without shuffling: the
dataset already shuffles per epoch) with ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU);
``train.batch_size`` is per process. Validation, logging and checkpoints happen on rank 0 while the
other ranks wait at a barrier.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import signal
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .config import apply_overrides, save_config
from .config import _validate as validate_config
from .datasets import build_dataset, collate_episodes
from .evaluation import EvaluationResult, Protocol, dataset_factory, evaluate_many

__all__ = [
    "train", "Trainer", "TrainingInterrupted", "ValidationFailed", "PolyLR", "ResumableDistributedSampler", "DistInfo",
    "init_distributed", "exit_process", "teardown", "all_ranks_finite", "seed_everything", "atomic_save", "resolve_device", "build_model_from_config",
    "build_train_dataset", "eval_protocol", "make_predict_fn", "make_fusions_predict_fn", "evaluate_model",
    "evaluate_fusions", "evaluate_reference",
    "load_checkpoint_model", "format_table", "amp_context", "unwrap",
]

log = logging.getLogger("benchmarks.engine")

_PRIOR_KEYS = ("initial_pseudo_mask", "prior_mask")


# =============================================================================== small utilities
def resolve_device(spec: Union[str, torch.device, None] = "auto", local_rank: int = 0) -> torch.device:
    """``'auto'`` → ``cuda:<local_rank>`` if available else ``cpu``; otherwise ``torch.device(spec)``."""
    if spec in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: '{spec}' requested but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices)."""
    seed = int(seed) % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The RNG states of ``random``, ``numpy``, ``torch`` CPU and (if initialised) CUDA."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):  # fewer GPUs than when saved
            pass


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to ``path.tmp`` then ``os.replace``: a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (or the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def strip_module_prefix(state: dict) -> dict:
    """Remove the ``module.`` prefix that (Distributed)DataParallel adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def amp_context(device: torch.device, amp: Union[str, bool, None]):
    """Autocast for the configured ``train.amp``: ``auto`` = bf16 on CUDA, off on CPU."""
    if amp in (None, False, "off"):
        return contextlib.nullcontext()
    if amp == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        amp = "bf16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# =============================================================================== distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def init_distributed(device_spec="auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    use_cuda = torch.cuda.is_available() and str(device_spec) != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    global _GROUP_OWNED
    _GROUP_OWNED = True
    return DistInfo(rank, world, local, True)


_GROUP_OWNED = False  # init_distributed created the process group (teardown destroys it)


def exit_process(code: int) -> None:
    """End a script: ``sys.exit`` for one process; under ``torchrun`` flush and ``os._exit`` so that no
    communication thread left by a process group is torn down during interpreter shutdown (which can
    abort with "terminate called without an active exception")."""
    import sys
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    sys.exit(code)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` without shuffling (the dataset shuffles its episodes per epoch) that can
    start inside an epoch: :meth:`set_start` skips the first ``n`` samples of this process's share.

    Works without a process group for one process (``num_replicas=1, rank=0``).

    Example:
        >>> s = ResumableDistributedSampler(list(range(10)), num_replicas=2, rank=1)
        >>> list(s)
        [1, 3, 5, 7, 9]
        >>> s.set_start(3); list(s)
        [7, 9]
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        it = list(super().__iter__())
        return iter(it[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


# =============================================================================== schedule
class PolyLR:
    """Poly learning rate, set before every step: ``lr_g = base_g · (1 - it/max_it)^power`` with ``it``
    counted from 1 (PFENet's ``poly_learning_rate``), after an optional linear warmup.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
        >>> s = PolyLR(opt, max_iters=10, power=1.0)
        >>> s.step(); round(opt.param_groups[0]["lr"], 6)
        0.009
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9, warmup_iters: int = 0):
        self.optimizer = optimizer
        self.max_iters = max(1, int(max_iters))
        self.power = float(power)
        self.warmup_iters = int(warmup_iters)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, b in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = b
        self.last_iter = 0

    def factor(self, it: int) -> float:
        f = max(0.0, 1.0 - min(it, self.max_iters) / self.max_iters) ** self.power
        if self.warmup_iters and it <= self.warmup_iters:
            f *= it / self.warmup_iters
        return f

    def step(self) -> None:
        self.last_iter += 1
        f = self.factor(self.last_iter)
        for g, b in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = b * f

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"max_iters": self.max_iters, "power": self.power, "warmup_iters": self.warmup_iters,
                "base_lrs": list(self.base_lrs), "last_iter": self.last_iter}

    def load_state_dict(self, st: dict) -> None:
        self.max_iters, self.power, self.warmup_iters = st["max_iters"], st["power"], st["warmup_iters"]
        self.base_lrs, self.last_iter = list(st["base_lrs"]), int(st["last_iter"])


# =============================================================================== model / data from a config
def build_model_from_config(cfg: dict, *, backbone_weights=...) -> nn.Module:
    """``models.build_model(cfg.model.name, backbone=..., shot=..., backbone_weights=..., **cfg.model.flags)``.

    ``backbone_weights`` overrides the config (``"random"`` when a checkpoint will overwrite them).
    """
    from models.registry import build_model
    m = cfg["model"]
    weights = m["backbone_weights"] if backbone_weights is ... else backbone_weights
    if isinstance(weights, str) and weights.startswith("~"):
        weights = os.path.expanduser(weights)
    flags = dict(m["flags"] or {})
    if "layer4_trainable" in flags:
        raise ValueError("model.flags.layer4_trainable: set train.finetune_layer4 / train.layer4_start_epoch "
                         "instead (the trainer unfreezes layer4 on schedule)")
    for k, v in list(flags.items()):  # YAML lists -> tuples for window/variant flags
        if isinstance(v, list):
            flags[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return build_model(m["name"], backbone=m["backbone"], shot=int(m["shot"]), backbone_weights=weights, **flags)


def _dataset_kwargs(cfg: dict, split: str) -> dict:
    d = cfg["data"]
    kw = dict(d["args"] or {})
    kw.update((d["train_args"] if split == "train" else d["val_args"]) or {})
    if d["dataset"] != "synthetic" and d["root"] is not None:
        kw["root"] = d["root"]
    return kw


def test_size(cfg: dict) -> int:
    """The evaluation input size: ``data.test_size``, else the synthetic image size, else 473."""
    d = cfg["data"]
    if d["test_size"]:
        return int(d["test_size"])
    if d["dataset"] == "synthetic":
        return int({**(d["args"] or {}), **(d["val_args"] or {})}.get("image_size", 96))
    return 473


def build_train_dataset(cfg: dict):
    """The training-split episode dataset of the recipe (PFENet augmentation when ``data.train_size`` is set)."""
    d = cfg["data"]
    kw = _dataset_kwargs(cfg, "train")
    kw.update(shot=int(cfg["model"]["shot"]), split="train", episodes=d["train_episodes"],
              seed=int(cfg["train"]["seed"]))
    if d["dataset"] not in ("fss", "fss1000"):
        kw["fold"] = d["fold"]
    if d["train_size"]:
        from .transforms import flip_transform, train_transform
        if d["augment"] == "flip":
            kw["transform"] = flip_transform(int(d["train_size"]), d["test_resize"])
        else:
            kw["transform"] = train_transform(int(d["train_size"]), tuple(d["scale"]), tuple(d["rotate"]))
    elif d["augment"] != "pfenet":
        raise ValueError("data.augment=flip needs data.train_size (the size training inputs are resized to)")
    return build_dataset(d["dataset"], **kw)


def eval_protocol(cfg: dict, *, validation: bool = False, shot: Optional[int] = None) -> Protocol:
    """The :class:`Protocol` of the final test (``eval.*``) or of the per-epoch validation (``train.val_*``)."""
    d, e, t = cfg["data"], cfg["eval"], cfg["train"]
    size = test_size(cfg)
    split = t["val_split"] if validation else e["split"]
    kw = dict(dataset=d["dataset"], fold=None if d["dataset"] in ("fss", "fss1000") else d["fold"],
              shot=int(shot or cfg["model"]["shot"]), resize=d["test_resize"],
              split="test" if d["dataset"] in ("fss", "fss1000") else split,
              images=_image_split_text(cfg))
    if validation:
        kw.update(episodes=int(t["val_episodes"]), seeds=(int(t["val_seed"]),), scales=(size,),
                  resolution=e["resolution"])
    else:
        scales = tuple(int(s) for s in (e["scales"] or [size]))
        kw.update(episodes=e["episodes"], seeds=tuple(int(s) for s in e["seeds"]), scales=scales,
                  resolution=e["resolution"], episode_iou=bool(e.get("episode_iou", False)))
        if e.get("preset"):
            return Protocol.preset(e["preset"], **{k: v for k, v in kw.items() if k in ("dataset", "fold", "shot", "split",
                                                                                          "images")})
    return Protocol(**kw)


def _image_split_text(cfg: dict) -> str:
    """How the images were split (``data.args.image_split``), for the protocol line; '' when not split."""
    spec = (cfg["data"]["args"] or {}).get("image_split")
    if not spec:
        return ""
    from .datasets.pascal import describe_image_split
    return describe_image_split(spec)


def _memo_factory(factory: Callable) -> Callable:
    cache: dict = {}

    def make(protocol, seed, size):
        key = (protocol.dataset, protocol.fold, protocol.shot, protocol.split, protocol.episodes, protocol.resize,
               protocol.images,
               protocol.fold_scheme, seed, size)
        if key not in cache:
            cache[key] = factory(protocol, seed, size)
        return cache[key]

    return make


def eval_factory(cfg: dict) -> Callable:
    """``dataset_factory`` with the recipe's root and extra dataset arguments."""
    kw = _dataset_kwargs(cfg, "val")
    root = kw.pop("root", None)
    return _memo_factory(dataset_factory(root, **kw))


# =============================================================================== prediction
def _fuse(probs: torch.Tensor, fusion: str) -> torch.Tensor:
    """``probs`` ``[K, B, H, W]`` foreground probabilities of K 1-shot runs → fused fg probability ``[B, H, W]``.

    ``average``: mean probability; ``vote``: fraction of shots whose argmax is foreground (a strict
    majority wins; a tie is background); ``or``: foreground where any shot says foreground.
    """
    if fusion == "average":
        return probs.mean(0)
    fg = (probs > 0.5).float()
    if fusion == "vote":
        return fg.mean(0)
    if fusion == "or":
        return fg.amax(0)
    raise ValueError(f"fusion: expected native, vote, average or or, got {fusion!r}")


def _prob_to_logits(fg: torch.Tensor) -> torch.Tensor:
    """fg probability ``[B, H, W]`` → log-probabilities ``[B, 2, H, W]`` (softmax gives back ``(1-fg, fg)``)."""
    p = torch.stack([1.0 - fg, fg], 1).clamp_min(1e-6)
    return p.log()


def _fg_prob(model: nn.Module, q, s, sm, *, amp, output: str, threshold: float) -> torch.Tensor:
    """Foreground probability ``[B, H, W]`` of one forward (``output='prior'``: the thresholded prior)."""
    with amp_context(q.device, amp):
        out = model(q, s, sm)
    if output == "logits":
        return torch.softmax(out["logits"].float(), 1)[:, 1]
    prior = next((out[k] for k in _PRIOR_KEYS if out.get(k) is not None), None)
    if prior is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no training-free prior output ({_PRIOR_KEYS})")
    p = F.interpolate(prior.float(), size=q.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
    return (p > threshold).float()


def make_fusions_predict_fn(model: nn.Module, fusions: Sequence[str], *, amp="auto", output: str = "logits",
                            threshold: float = 0.5) -> Callable[[dict], Dict[str, torch.Tensor]]:
    """``predict_fn(batch) -> {fusion: logits [B, 2, H, W]}`` for :func:`benchmarks.evaluation.evaluate_many`.

    K-shot strategies (paper Table 7): ``native`` is the model's own K-shot (DPCN's foreground
    concatenation); ``vote``, ``average`` (mask average) and ``or`` run the model 1-shot once per support
    and fuse the K masks -- the K 1-shot forwards are run once and shared by those three. With one shot
    every strategy is the native prediction. ``output='prior'``: the training-free prior thresholded at
    ``threshold`` instead of the prediction.
    """
    fusions = list(fusions)
    for f in fusions:
        if f not in ("native", "vote", "average", "or"):
            raise ValueError(f"fusion: expected native, vote, average or or, got {f!r}")
    if not fusions:
        raise ValueError("fusions: expected at least one of native, vote, average, or")
    if output not in ("logits", "prior"):
        raise ValueError(f"output: expected 'logits' or 'prior', got {output!r}")

    def predict_fn(batch: dict) -> Dict[str, torch.Tensor]:
        q, s, sm = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        K = s.shape[1]
        kw = dict(amp=amp, output=output, threshold=threshold)
        native = per_shot = None
        out = {}
        for f in fusions:
            if f == "native" or K == 1:
                if native is None:
                    native = _prob_to_logits(_fg_prob(model, q, s, sm, **kw))
                out[f] = native
            else:
                if per_shot is None:
                    per_shot = torch.stack([_fg_prob(model, q, s[:, k:k + 1], sm[:, k:k + 1], **kw) for k in range(K)])
                out[f] = _prob_to_logits(_fuse(per_shot, f))
        return out

    return predict_fn


def make_predict_fn(model: nn.Module, *, fusion: str = "native", amp="auto", output: str = "logits",
                    threshold: float = 0.5) -> Callable[[dict], torch.Tensor]:
    """A ``predict_fn(batch) -> logits [B, 2, H, W]`` for :func:`benchmarks.evaluation.evaluate`: one
    strategy of :func:`make_fusions_predict_fn` (``native``, ``vote``, ``average`` or ``or``)."""
    fn = make_fusions_predict_fn(model, [fusion], amp=amp, output=output, threshold=threshold)
    return lambda batch: fn(batch)[fusion]


def evaluate_model(model: nn.Module, protocol: Protocol, factory: Callable, *, device=None, fusion="native",
                   output="logits", amp="auto", batch_size: int = 1, num_workers: int = 0,
                   progress: bool = False) -> EvaluationResult:
    """:func:`benchmarks.evaluation.evaluate` of ``model`` (put in ``eval()`` mode here, restored after)."""
    return evaluate_fusions(model, protocol, factory, [fusion], device=device, output=output, amp=amp,
                            batch_size=batch_size, num_workers=num_workers, progress=progress)[fusion]


def evaluate_fusions(model: nn.Module, protocol: Protocol, factory: Callable, fusions: Sequence[str], *,
                     device=None, output="logits", amp="auto", batch_size: int = 1, num_workers: int = 0,
                     progress: bool = False) -> Dict[str, EvaluationResult]:
    """Several K-shot strategies of ``model`` on the same episodes in one pass (shared 1-shot forwards)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = device if device is not None else next(net.parameters()).device
    try:
        return evaluate_many(make_fusions_predict_fn(net, fusions, amp=amp, output=output), factory, protocol,
                             batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    finally:
        net.train(was_training)


def has_prior(model: nn.Module) -> bool:
    """Whether the network outputs a training-free prior (DPCN's ``initial_pseudo_mask``, PFENet's ``prior_mask``)."""
    net = unwrap(model)
    name = type(net).__name__
    if name == "PFENet":
        return True
    return name == "DPCN" and bool(getattr(net, "use_prior", False))


def evaluate_reference(model: nn.Module, kind: str, protocol: Protocol, factory: Callable, **kw) -> Tuple[str, EvaluationResult]:
    """The no-training reference: ``prior`` (thresholded training-free prior) or ``untrained`` (the model as built)."""
    if kind == "prior":
        return "no training: prior mask > 0.5", evaluate_model(model, protocol, factory, output="prior", **kw)
    return f"no training: untrained {_model_label(model)}", evaluate_model(model, protocol, factory, **kw)


def _model_label(model) -> str:
    return getattr(unwrap(model), "_registry_name", type(unwrap(model)).__name__.lower())


# =============================================================================== logging
class RunLogger:
    """JSON-lines log file (+ TensorBoard when importable), rank 0 only."""

    def __init__(self, run_dir: Optional[Path], enabled: bool = True, tensorboard="auto"):
        self.enabled = enabled and run_dir is not None
        self.path = Path(run_dir) / "log.jsonl" if self.enabled else None
        self.tb = None
        if self.enabled and tensorboard not in (False, "false", "off", None):
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception as e:  # ImportError, or tensorboard broken
                if tensorboard is True or tensorboard == "true":
                    raise ImportError(f"run.tensorboard=true but TensorBoard is not usable: {e}") from e

    def log(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=_json_default) + "\n")
        if self.tb is not None:
            step = fields.get("step")
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "iter"):
                    self.tb.add_scalar(f"{event}/{k}", v, step if step is not None else fields.get("epoch", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# =============================================================================== training
class TrainingInterrupted(RuntimeError):
    """Raised by :meth:`Trainer.fit` when told to stop early (``stop_after_iters``, SIGINT/SIGTERM)."""


class ValidationFailed(RuntimeError):
    """The per-epoch validation raised; the epoch's ``last.pth`` is already written (resume validates first)."""


def default_run_name(cfg: dict) -> str:
    m, d = cfg["model"], cfg["data"]
    fold = f"_f{d['fold']}" if d["dataset"] not in ("fss", "fss1000") else ""
    return f"{m['name'].replace('+', '_')}_{d['dataset']}{fold}_{m['backbone']}_{m['shot']}shot"


class Trainer:
    """Training of one recipe. Use :func:`train` unless you need the pieces.

    Args:
        cfg: a resolved config (:func:`benchmarks.config.load_config`).
        run_dir: output folder (default ``run.out_dir / (run.name or default_run_name(cfg))``).
        resume: ``None``, ``True`` (``run_dir/last.pth``) or a checkpoint path.
        model: an already built network to train instead of :func:`build_model_from_config` (tests).
        stop_after_iters: raise :class:`TrainingInterrupted` after this many iterations of this process
            (simulates a kill in tests; checkpoints are only those already written).
        echo: print progress lines (rank 0).
    """

    def __init__(self, cfg: dict, run_dir=None, *, resume=None, model: Optional[nn.Module] = None,
                 stop_after_iters: Optional[int] = None, echo: Callable[[str], None] = print):
        self.cfg = copy.deepcopy(cfg)
        self.dist = init_distributed(cfg["run"]["device"])
        self.device = resolve_device(cfg["run"]["device"], self.dist.local_rank)
        if cfg["run"].get("threads"):
            torch.set_num_threads(int(cfg["run"]["threads"]))
        t = self.cfg["train"]
        self._deterministic_before = None
        if t["deterministic"]:
            # cuBLAS needs its workspace configured before the first GEMM for deterministic results
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            self._deterministic_before = (torch.are_deterministic_algorithms_enabled(),
                                          torch.is_deterministic_algorithms_warn_only_enabled())
            # warn_only: an op without a deterministic implementation warns instead of failing the run
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(cfg["run"]["out_dir"]) / (
            cfg["run"]["name"] or default_run_name(cfg))
        self.main = self.dist.is_main
        self.echo = echo if self.main else (lambda *_: None)
        self.stop_after_iters = stop_after_iters
        self.progress = bool(cfg["run"]["progress"]) and self.main

        # ---- data
        self.train_set = build_train_dataset(self.cfg)
        self.sampler = ResumableDistributedSampler(self.train_set, self.dist.world_size, self.dist.rank,
                                                   drop_last=self.dist.distributed)
        self.batch_size = int(t["batch_size"])
        self.iters_per_epoch = len(self.sampler) // self.batch_size  # drop_last, like PFENet
        if self.iters_per_epoch < 1:
            raise ValueError(f"train.batch_size={self.batch_size} is larger than the {len(self.sampler)} training "
                             f"episodes per process and epoch; lower the batch size or raise data.train_episodes")
        self.epochs = int(t["epochs"])
        self.max_iters = self.epochs * self.iters_per_epoch
        self.val_protocol = eval_protocol(self.cfg, validation=True)
        self.factory = eval_factory(self.cfg)

        # ---- model (seeded, so every process and every resumed run builds the same initial weights)
        seed_everything(int(t["seed"]))
        self.model = model if model is not None else build_model_from_config(self.cfg)
        self.model._registry_name = self.cfg["model"]["name"]
        self.model.to(self.device)
        self.feature_cache = None
        if t["cache_backbone"]:
            from .feature_cache import attach_feature_cache
            self.feature_cache = attach_feature_cache(self.model, int(float(t["cache_backbone_gb"]) * 2 ** 30))
        self.net = self.model  # possibly DDP-wrapped
        self.layer4_on = False

        # ---- optimiser: head at lr·lr_multiplier, layer4 (frozen until its start epoch) at × layer4_lr_scale
        lr = float(t["lr"]) * float(t["lr_multiplier"])
        groups = self._param_groups(lr)
        if not any(g["params"] for g in groups):
            raise ValueError("the model has no trainable parameter")
        if t["optimizer"] == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=float(t["weight_decay"]))
        else:
            self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=float(t["momentum"]),
                                             weight_decay=float(t["weight_decay"]))
        self.scheduler = PolyLR(self.optimizer, self.max_iters, float(t["power"]), int(t["warmup_iters"]))
        self.scaler = torch.amp.GradScaler("cuda") if (t["amp"] == "fp16" and self.device.type == "cuda") else None

        # ---- state
        self.epoch = 0            # current (0-based) epoch
        self.iter_in_epoch = 0    # iterations of the current epoch already done
        self.global_step = 0
        self.best = {"miou": -math.inf, "fbiou": None, "epoch": None}
        self.history: List[dict] = []
        self._resume_rng = None
        self._epoch_loss = (0.0, 0)  # (sum, count) of finite losses of the current epoch so far
        self._pending_val = False    # an epoch ended, its checkpoint is written, its validation not done yet
        self.resumed_from = None
        if resume:
            self._load(self.run_dir / "last.pth" if resume is True else Path(resume))
        self._wrap()
        self.logger = RunLogger(self.run_dir, self.main, cfg["run"]["tensorboard"])
        self._stop_signal = None

    # ------------------------------------------------------------------ pieces
    def _param_groups(self, lr: float) -> List[dict]:
        """The networks' own groups (``head``, and ``layer4`` when fine-tuned); any other module: one group."""
        t = self.cfg["train"]
        net = self.model
        if hasattr(net, "param_groups"):
            return net.param_groups(lr, float(t["layer4_lr_scale"]), bool(t["finetune_layer4"]))
        if t["finetune_layer4"]:
            raise ValueError("train.finetune_layer4: the model has no param_groups() with a layer4 group")
        return [{"params": [p for p in net.parameters() if p.requires_grad], "lr": lr, "name": "head"}]

    def _layer4_due(self, epoch: int) -> bool:
        t = self.cfg["train"]
        return bool(t["finetune_layer4"]) and epoch >= int(t["layer4_start_epoch"])

    def _set_layer4(self, on: bool) -> None:
        if on == self.layer4_on:
            return
        bb = getattr(self.model, "backbone", None)
        if bb is None or not hasattr(bb, "set_layer4_trainable"):
            raise ValueError("train.finetune_layer4: the model has no backbone with set_layer4_trainable()")
        bb.set_layer4_trainable(on)
        self.layer4_on = on
        self._wrap()

    def _wrap(self) -> None:
        """(Re-)wrap in DDP: the set of parameters that require grad is fixed at wrap time."""
        self._set_layer4_state_only()
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        else:
            self.net = self.model

    def _set_layer4_state_only(self) -> None:
        bb = getattr(self.model, "backbone", None)
        if bb is not None and hasattr(bb, "set_layer4_trainable") and self.cfg["train"]["finetune_layer4"]:
            bb.set_layer4_trainable(self.layer4_on)

    def _loader(self, epoch: int, start_iter: int) -> DataLoader:
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_iter * self.batch_size)
        nw = int(self.cfg["data"]["num_workers"])
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler, num_workers=nw,
                          collate_fn=collate_episodes, drop_last=True, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "iter_in_epoch": self.iter_in_epoch, "global_step": self.global_step,
            "layer4_on": self.layer4_on, "best": dict(self.best), "history": list(self.history),
            "rng": rng_state(), "config": self.cfg, "world_size": self.dist.world_size,
            "torch_version": torch.__version__, "epoch_loss": list(self._epoch_loss),
            "pending_val": self._pending_val,
        }

    def save(self, name: str = "last.pth") -> Optional[Path]:
        if not self.main:
            return None
        return atomic_save(self._state(), self.run_dir / name)

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint '{path}' not found (a run writes last.pth at the end of "
                                    f"every epoch)")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"--resume: '{path}' cannot be read as a checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'truncated or not a torch file'}); delete it "
                             f"to start the run again") from None
        if not isinstance(ck, dict):
            raise ValueError(f"--resume: '{path}' is not a training checkpoint (a {type(ck).__name__})")
        for k in ("model", "optimizer", "scheduler", "epoch", "iter_in_epoch"):
            if k not in ck:
                raise ValueError(f"--resume: '{path}' is not a training checkpoint (no '{k}')")
        if ck.get("world_size", 1) != self.dist.world_size:
            warnings.warn(f"resuming a {ck.get('world_size')}-process run with {self.dist.world_size} process(es): "
                          "the episode split across processes changes", RuntimeWarning)
        self.layer4_on = bool(ck.get("layer4_on", False))
        self._set_layer4_state_only()
        try:
            self.model.load_state_dict(strip_module_prefix(ck["model"]))
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            saved = (ck.get("config") or {}).get("model", {})
            raise ValueError(f"--resume: '{path}' holds a different network than this run's config "
                             f"(checkpoint: {saved.get('name')} / {saved.get('backbone')} {saved.get('flags')}; "
                             f"config: {self.cfg['model']['name']} / {self.cfg['model']['backbone']} "
                             f"{self.cfg['model']['flags']}): {_first_line(e)}") from None
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.iter_in_epoch, self.global_step = int(ck["epoch"]), int(ck["iter_in_epoch"]), int(ck["global_step"])
        self.best = dict(ck.get("best") or self.best)
        self.history = list(ck.get("history") or [])
        self._resume_rng = ck.get("rng") if self.iter_in_epoch > 0 else None
        self._epoch_loss = tuple(ck.get("epoch_loss") or (0.0, 0)) if self.iter_in_epoch > 0 else (0.0, 0)
        self._pending_val = bool(ck.get("pending_val", False))
        self.resumed_from = str(path)

    def _epoch_seed(self, epoch: int) -> int:
        return int(self.cfg["train"]["seed"]) + epoch + 100000 * self.dist.rank

    def validate(self) -> EvaluationResult:
        return evaluate_model(self.model, self.val_protocol, self.factory, device=self.device,
                              amp=self.cfg["train"]["amp"], batch_size=int(self.cfg["train"]["val_batch_size"]),
                              num_workers=int(self.cfg["data"]["num_workers"]), progress=self.progress)

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self):
        old = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.echo(f"\nsignal {signum}: writing a checkpoint after this iteration (again to stop at once)")

        if threading_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    old[s] = signal.signal(s, handler)
                except (ValueError, OSError):
                    pass
        return old

    def fit(self) -> dict:
        """Train until ``train.epochs``; returns ``{'best': {...}, 'history': [...], 'run_dir': ...}``."""
        t = self.cfg["train"]
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.logger.log("start", resumed_from=self.resumed_from, epoch=self.epoch, iter=self.iter_in_epoch,
                            world_size=self.dist.world_size, device=str(self.device), host=socket.gethostname(),
                            iters_per_epoch=self.iters_per_epoch, max_iters=self.max_iters,
                            train_episodes=len(self.train_set), val_protocol=self.val_protocol.describe())
        if self.resumed_from:
            self.echo(f"resumed from {self.resumed_from}: epoch {self.epoch + 1}, iteration {self.iter_in_epoch}")
        if self._pending_val and self.history:  # the run stopped between an epoch's checkpoint and its validation
            if self.main:
                self.echo(f"validating epoch {self.epoch} (its validation did not finish before the run stopped)")
                self._validate_epoch(self.history[-1])
                self._report_epoch(self.history[-1], self.history[-1].get("seconds", 0.0))
            self._pending_val = False
            self.dist.barrier()
        old_handlers = self._install_signal_handlers()
        done_iters = 0
        ckpt_every = int(t["checkpoint_every_iters"])
        val_every = int(t["val_every"])
        try:
            while self.epoch < self.epochs:
                epoch = self.epoch
                self._set_layer4(self._layer4_due(epoch))
                seed_everything(self._epoch_seed(epoch))
                loader = self._loader(epoch, self.iter_in_epoch)
                it = iter(loader)  # draws the loader's base seed from the torch RNG
                if self._resume_rng is not None:
                    set_rng_state(self._resume_rng)
                    self._resume_rng = None
                self.net.train()
                t0 = time.perf_counter()
                loss_sum, loss_n = self._epoch_loss
                bar = None
                if self.progress:
                    from tqdm import tqdm
                    bar = tqdm(total=self.iters_per_epoch, initial=self.iter_in_epoch, dynamic_ncols=True,
                               desc=f"epoch {epoch + 1}/{self.epochs}", unit="it", leave=False)
                for batch in it:
                    loss = self._step(batch)
                    self.iter_in_epoch += 1
                    self.global_step += 1
                    done_iters += 1
                    if math.isfinite(loss):
                        loss_sum += loss
                        loss_n += 1
                    self._epoch_loss = (loss_sum, loss_n)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                        bar.update(1)
                    if self.main and (self.global_step % int(self.cfg["run"]["log_every"]) == 0):
                        self.logger.log("train", epoch=epoch, iter=self.iter_in_epoch, step=self.global_step,
                                        loss=loss, lr=lr, layer4=self.layer4_on,
                                        it_per_s=self.iter_in_epoch / max(1e-9, time.perf_counter() - t0))
                    if ckpt_every and self.iter_in_epoch % ckpt_every == 0 and self.iter_in_epoch < self.iters_per_epoch:
                        self.save("last.pth")
                    if self.stop_after_iters is not None and done_iters >= self.stop_after_iters:
                        raise TrainingInterrupted(f"stopped after {done_iters} iterations (stop_after_iters)")
                    if self._stop_signal is not None:
                        self.save("last.pth")
                        raise TrainingInterrupted(f"signal {self._stop_signal}: checkpoint written to "
                                                  f"{self.run_dir / 'last.pth'}; continue with --resume")
                if bar is not None:
                    bar.close()
                secs = time.perf_counter() - t0
                rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, loss_n), "seconds": round(secs, 2),
                       "lr": self.optimizer.param_groups[0]["lr"], "layer4": self.layer4_on}
                if self.dist.distributed:
                    v = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64)
                    torch.distributed.all_reduce(v)
                    rec["train_loss"] = float(v[0] / max(1.0, float(v[1])))
                self.epoch += 1
                self.iter_in_epoch = 0
                self._epoch_loss = (0.0, 0)
                last = self.epoch == self.epochs
                self.history.append(rec)
                self._pending_val = self.epoch % val_every == 0 or last
                if self.main:
                    self.save("last.pth")  # the epoch's weights are safe before the validation can fail
                    if self._pending_val:
                        self._validate_epoch(rec)
                    self._report_epoch(rec, secs)
                self.dist.barrier()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.logger.close()
        return {"best": dict(self.best), "history": list(self.history), "run_dir": str(self.run_dir)}

    def _validate_epoch(self, rec: dict) -> None:
        """Validate the epoch just finished (``rec`` is its history record), update the best checkpoint."""
        try:
            r = self.validate()
        except Exception as e:
            raise ValidationFailed(f"validation after epoch {self.epoch} failed: {short_error(e)} -- the epoch's checkpoint "
                                   f"{self.run_dir / 'last.pth'} is saved; fix the problem and continue with --resume "
                                   f"(the validation runs first)") from e
        rec.update(val_miou=r.miou, val_fbiou=r.fbiou, val_seconds=round(r.per_seed[0]["seconds"], 2))
        if r.miou > self.best["miou"]:
            self.best = {"miou": r.miou, "fbiou": r.fbiou, "epoch": self.epoch}
            rec["best"] = True
        self._pending_val = False
        self.save("last.pth")
        if rec.get("best"):
            atomic_save(self._state(), self.run_dir / "best.pth")

    def _report_epoch(self, rec: dict, secs: float) -> None:
        self.logger.log("epoch", step=self.global_step, **rec)
        val = (f"  val mIoU {rec['val_miou']:.2f} FB-IoU {rec['val_fbiou']:.2f}"
               f" (best {self.best['miou']:.2f} @ epoch {self.best['epoch']})" if "val_miou" in rec else "")
        cache = f"  [feature cache: {self.feature_cache.stats()}]" if self.feature_cache is not None else ""
        self.echo(f"epoch {rec['epoch']}/{self.epochs}  loss {rec['train_loss']:.4f}  lr {rec['lr']:.2e}"
                  f"{val}  [{secs:.0f}s train]{cache}")

    def _step(self, batch: dict) -> float:
        t = self.cfg["train"]
        q = batch["query_img"].to(self.device, non_blocking=True)
        s = batch["support_imgs"].to(self.device, non_blocking=True)
        sm = batch["support_masks"].to(self.device, non_blocking=True)
        qm = batch["query_mask"].to(self.device, non_blocking=True)
        self.scheduler.step()  # lr of this iteration (PFENet: set before the step, it counted from 1)
        with amp_context(self.device, t["amp"]):
            out = self.net(q, s, sm, query_mask=qm)
        loss = out["loss"].float()
        self.optimizer.zero_grad(set_to_none=True)
        if not all_ranks_finite(loss, self.dist):
            log.warning("non-finite loss at step %d (this process: %s): step skipped on every process",
                        self.global_step + 1, float(loss))
            return float("nan")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           float(t["grad_clip"]))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss.detach())


def all_ranks_finite(loss: torch.Tensor, dist: DistInfo) -> bool:
    """Whether the loss is finite on *every* process (one all-reduce under DDP), so that all processes
    skip a step together instead of some waiting forever in the gradient all-reduce."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0])
    if dist.distributed:
        if torch.distributed.get_backend() == "nccl":
            bad = bad.to(loss.device)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return float(bad) == 0.0


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# =============================================================================== whole runs
def load_checkpoint_model(path: Union[str, os.PathLike], *, device="cpu", cfg: Optional[dict] = None,
                          overrides: Sequence[str] = ()) -> Tuple[nn.Module, dict]:
    """Rebuild the network of a training checkpoint (its saved config) and load its weights.

    ``cfg`` replaces the saved config (for a bare ``state_dict`` file it is required); ``overrides``
    are ``key=value`` strings (:func:`benchmarks.config.apply_overrides`) applied to it and validated.
    Returns ``(model.eval(), cfg)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint '{path}' cannot be read by torch.load ({type(e).__name__}: "
                         f"{_first_line(e) or 'truncated or not a torch file'})") from None
    state = ck.get("model") if isinstance(ck, dict) and "model" in ck else ck
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint '{path}' holds no state dict (a {type(state).__name__})")
    if cfg is None:
        cfg = ck.get("config") if isinstance(ck, dict) else None
        if cfg is None:
            raise ValueError(f"checkpoint '{path}' holds no config (a bare state dict); load it with "
                             f"benchmarks.engine.load_checkpoint_model(path, cfg=...) and the config it was trained with")
    cfg = copy.deepcopy(cfg)
    if overrides:
        new_ds = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "data.dataset"]
        if new_ds and new_ds[-1] != cfg["data"]["dataset"]:
            # the saved dataset arguments (e.g. the synthetic set's image_size) belong to the old dataset
            cfg["data"]["args"], cfg["data"]["train_args"], cfg["data"]["val_args"] = {}, {}, {}
        cfg = validate_config(apply_overrides(cfg, overrides))
    model = build_model_from_config(cfg, backbone_weights="random")
    if isinstance(ck, dict) and ck.get("layer4_on"):
        model.backbone.set_layer4_trainable(True)
    state = strip_module_prefix(state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch: the overrides / config describe another network
        raise ValueError(f"checkpoint '{path}' does not fit model '{cfg['model']['name']}' "
                         f"({cfg['model']['backbone']}, flags {cfg['model']['flags']}): {_first_line(e, 1)}; "
                         f"leave the architecture as the checkpoint's config has it") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint '{path}' does not match model '{cfg['model']['name']}' "
                         f"({cfg['model']['backbone']}): {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    model.to(device).eval()
    model._registry_name = cfg["model"]["name"]
    return model, cfg


def format_table(rows: Sequence[Tuple[str, EvaluationResult]], *, paper: Optional[Tuple[float, float]] = None) -> str:
    """A fixed-width table: one row per (label, result) with mIoU, FB-IoU and per-class IoU."""
    if not rows:
        return ""
    names = rows[0][1].class_names
    cls = list(rows[0][1].class_iou)
    w = max(len(r[0]) for r in rows + [("paper",)] if r) + 2
    head = f"{'':{w}}{'mIoU':>8}{'FB-IoU':>8}  " + " ".join(f"{str(names.get(c, c))[:10]:>10}" for c in cls)
    lines = [head]
    for label, r in rows:
        lines.append(f"{label:{w}}{r.miou:8.2f}{r.fbiou:8.2f}  " + " ".join(f"{r.class_iou.get(c, math.nan):10.2f}" for c in cls))
    if paper:
        lines.append(f"{'paper':{w}}{paper[0]:8.2f}{paper[1]:8.2f}")
    return "\n".join(lines)


def train(cfg: dict, run_dir=None, *, resume=None, model: Optional[nn.Module] = None, evaluate_after: Optional[bool] = None,
          stop_after_iters: Optional[int] = None, echo: Callable[[str], None] = print) -> dict:
    """Train a recipe, then (rank 0) evaluate the best checkpoint and the no-training reference.

    Returns ``{'run_dir', 'best', 'history', 'results'?: {'protocol', 'rows': [{label, miou, fbiou, ...}]},
    'seconds'}`` and writes ``results.json`` in the run folder.
    """
    t_start = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, resume=resume, model=model, stop_after_iters=stop_after_iters, echo=echo)
        return _train(trainer, t_start, echo, evaluate_after)
    finally:
        teardown(trainer)


def teardown(trainer: Optional["Trainer"]) -> None:
    """Release what a run holds, whatever ended it: the DDP wrapper (its communication threads), the
    process group this run created, and the process-wide deterministic-algorithms setting."""
    global _GROUP_OWNED
    if trainer is None:
        dist = DistInfo(initialized_here=_GROUP_OWNED)
    else:
        dist = trainer.dist
        trainer.net = trainer.model  # drop the DDP wrapper before its process group goes
        if trainer._deterministic_before is not None:
            on, warn = trainer._deterministic_before
            torch.use_deterministic_algorithms(on, warn_only=warn)
    if dist.initialized_here and torch.distributed.is_initialized():
        import gc
        gc.collect()
        torch.distributed.destroy_process_group()
        _GROUP_OWNED = False


def _train(trainer: "Trainer", t_start: float, echo, evaluate_after: Optional[bool]) -> dict:
    e = trainer.cfg["eval"]
    evaluate_after = e["enabled"] if evaluate_after is None else evaluate_after
    ref_kinds = []
    for k in (e["reference"] if isinstance(e["reference"], list) else [e["reference"]]):
        if k == "auto":
            k = "prior" if has_prior(trainer.model) else "untrained"
        if k not in (None, False, "none") and k not in ref_kinds:
            ref_kinds.append(k)
    protocol = eval_protocol(trainer.cfg)
    ekw = dict(device=trainer.device, fusion=e["fusion"], amp=trainer.cfg["train"]["amp"],
               batch_size=int(e["batch_size"]), num_workers=int(trainer.cfg["data"]["num_workers"]),
               progress=trainer.progress)
    refs: List[Tuple[str, EvaluationResult]] = []
    ref_path = trainer.run_dir / "reference.json"
    if trainer.main:
        echo(f"run folder: {trainer.run_dir}")
        echo(f"model {trainer.cfg['model']['name']} ({trainer.cfg['model']['backbone']}, "
             f"{sum(p.numel() for g in trainer.optimizer.param_groups for p in g['params']):,} trainable parameters), "
             f"{len(trainer.train_set)} training episodes/epoch, {trainer.iters_per_epoch} iterations/epoch × "
             f"{trainer.epochs} epochs, batch {trainer.batch_size}×{trainer.dist.world_size}, device {trainer.device}")
        echo(f"validation: {trainer.val_protocol.describe()}")
    if evaluate_after and trainer.main and ref_kinds:
        if trainer.resumed_from and ref_path.is_file():
            refs = [(d["label"], _result_from_dict(d)) for d in json.loads(ref_path.read_text())]
        else:  # before any training step, on the freshly built model
            snap = rng_state()
            for k in ref_kinds:
                label, r = evaluate_reference(trainer.model, k, protocol, trainer.factory, **ekw)
                refs.append((label, r))
                echo(f"{label}: mIoU {r.miou:.2f}  FB-IoU {r.fbiou:.2f}")
            set_rng_state(snap)
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            ref_path.write_text(json.dumps([{"label": l, **r.as_dict()} for l, r in refs], default=_json_default))
    trainer.dist.barrier()
    fit = trainer.fit()
    out = {"run_dir": str(trainer.run_dir), **fit}
    if evaluate_after and trainer.main:
        best_path = trainer.run_dir / "best.pth"
        model_eval = trainer.model
        best_epoch = trainer.best.get("epoch")
        if best_path.is_file():
            ck = torch.load(best_path, map_location="cpu", weights_only=False)
            model_eval = copy.deepcopy(trainer.model)
            model_eval.load_state_dict(strip_module_prefix(ck["model"]))
        label = f"trained {trainer.cfg['model']['name']} (best epoch {best_epoch})"
        r = evaluate_model(model_eval, protocol, trainer.factory, **ekw)
        rows = refs + [(label, r)]
        echo("")
        echo(f"Test: {protocol.describe()}" + (f", K-shot fusion: {e['fusion']}" if protocol.shot > 1 else ""))
        echo(format_table(rows))
        results = {"protocol": protocol.as_dict(), "protocol_text": protocol.describe(), "fusion": e["fusion"],
                   "rows": [{"label": l, **x.as_dict()} for l, x in rows], "best": trainer.best,
                   "train_seconds": sum(h.get("seconds", 0) for h in trainer.history)}
        (trainer.run_dir / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
        trainer.logger = RunLogger(trainer.run_dir, True, False)
        trainer.logger.log("eval", miou=r.miou, fbiou=r.fbiou, protocol=protocol.describe(),
                           references={l: {"miou": x.miou, "fbiou": x.fbiou} for l, x in refs})
        out["results"] = results
    out["seconds"] = time.perf_counter() - t_start
    if trainer.main:
        RunLogger(trainer.run_dir, True, False).log("end", seconds=round(out["seconds"], 1))
    trainer.dist.barrier()
    return out


def _first_line(e: BaseException, index: int = 0) -> str:
    """One line of an exception's message (``index``: which non-empty line), for one-line errors."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[min(index, len(lines) - 1)] if lines else ""


def short_error(e: BaseException) -> str:
    """An exception as one line; for an error re-raised from a DataLoader worker, the worker's own message
    (the file it names) instead of the worker traceback."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
    return _first_line(e) or type(e).__name__


def _result_from_dict(d: dict) -> EvaluationResult:
    p = d["protocol"]
    prot = Protocol(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items()})
    per_seed = []
    for s in d["per_seed"]:
        s = dict(s)
        s["class_iou"] = {int(k): v for k, v in s["class_iou"].items()}
        per_seed.append(s)
    return EvaluationResult(prot, per_seed, {int(k): v for k, v in d.get("class_names", {}).items()})
