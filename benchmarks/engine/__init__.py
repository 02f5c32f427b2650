"""The train/evaluate engine behind ``examples/train_dpcn.py``, ``examples/predict.py`` and the commands of ``benchmarks/``.

One :func:`train` call runs a whole recipe (:mod:`benchmarks.engine.config`): it builds the model with
:func:`models.build_model`, the episode datasets with :func:`benchmarks.datasets.build_dataset`, trains
with SGD (or AdamW) + the poly schedule (updated every iteration, PFENet's ``(1 - it/max_it)^0.9`` with ``it``
counted from 1), validates with :func:`benchmarks.scoring.protocols.evaluate`, keeps the best checkpoint by
validation class mIoU and finally evaluates it (and a no-training reference) under the recipe's
:class:`~benchmarks.scoring.protocols.Protocol`. :func:`evaluate_run` evaluates a finished run folder's best
checkpoint again (e.g. on another split) without training.

Layout (one concern per module). The names listed for the modules down to ``errors.py`` are importable
from ``benchmarks.engine`` itself; the modules after it are imported by their own path::

    trainer.py      Trainer (data, model, optimiser, the fit loop, resume, signals, validation), train(),
                    default_run_name
    final_eval.py   evaluate_run (a finished run's best checkpoint on a split), final_evaluation (what
                    train() runs after training), eval_kwargs
    checkpoints.py  atomic_save, load_checkpoint_model, strip_module_prefix, rng_state / set_rng_state,
                    seed_everything (does not import the trainer)
    distributed.py  DistInfo, init_distributed, teardown, exit_process, all_ranks_finite,
                    ResumableDistributedSampler, unwrap, DDP's find_unused_parameters decision
    schedule.py     PolyLR (the poly schedule as a LambdaLR; reads checkpoints of the older hand-written class)
    from_config.py  config -> network / training dataset / evaluation protocol and dataset factory
                    (build_model_from_config, build_train_dataset, eval_protocol, eval_factory, test_size,
                    check_model_config, recipe_hint)
    fusion.py       K-shot fusion and predict functions, evaluate_model / evaluate_fusions /
                    evaluate_reference, has_prior
    runlog.py       RunLogger (log.jsonl + TensorBoard), format_table, finite_json / json_default (the JSON
                    encoding of logged values)
    device.py       resolve_device, amp_context
    runfolder.py    claim_run_folder (one run per folder: the check, --move-aside), RunLock (the folder's
                    flock), move_aside, atomic_write (unique temporary name, optional fsync, os.replace: every
                    atomic write of the harness); imports only errors.py
    errors.py       TrainingInterrupted, ValidationFailed, RunFolderError / RunFolderTaken / RunFolderLocked,
                    short_error, first_line, layout_help

    config.py       recipes: DEFAULTS, load_config (YAML + _base_ + overrides, validated), save_config,
                    choose_recipe (the recipe without --config), the command-line flags of the commands
    feature_cache.py  the memoised frozen-backbone features and their on-disk store (train.cache_backbone)
    inference.py    predict on your own images (examples/predict.py), load_image / load_mask / load_support
    output_paths.py the commands' check of --out / --json / --md before their work

The names are resolved lazily (PEP 562), so ``from benchmarks.engine import load_checkpoint_model`` imports
:mod:`~benchmarks.engine.checkpoints` and what it needs, not the trainer. Private (underscore) names are
not exported: a caller that needs one imports it from its module.

Run folder (``run.out_dir/run.name``)::

    config.yaml     the resolved config (every default filled in)
    log.jsonl       one JSON object per line: "start", "train" (every log_every iterations), "epoch",
                    "eval", "end" events (append-only; a resumed run continues the file)
    last.pth        written atomically (unique tmp + os.replace) at the end of every epoch and every
                    ``train.checkpoint_every_iters`` iterations: model, optimizer, scheduler, sampler
                    position, RNG states, history
    best.pth        the checkpoint with the best validation mIoU
    results.json    the final evaluation (trained model and references) with its protocol
    tb/             TensorBoard events (only when ``tensorboard`` is importable)
    .lock           the lock file: rank 0 holds an exclusive flock on it while the run trains and evaluates

A run folder belongs to one run: a new run (not ``--resume``) refuses a folder that holds another run, or
with ``run.move_aside=true`` (``--move-aside``) renames it to ``<name>.old-<time>`` first; a second process
cannot use a folder whose lock is held (:mod:`benchmarks.engine.runfolder`).

Determinism / resume: every epoch starts with ``seed_everything(seed + epoch + 100000·rank)``; the
training episodes of an epoch are a pure function of ``(seed, epoch)`` and their augmentation of
``(seed, epoch, index)`` (the datasets' contract), so the data never depends on workers or on the
process history. A checkpoint taken inside an epoch also stores the RNG states *after* the step, which
a resumed run restores once the epoch's DataLoader iterator exists; on CPU a resumed run therefore
finishes with bit-identical weights (tested). On CUDA bilinear-upsampling backward is not
deterministic, so resumed and uninterrupted GPU runs agree only up to float noise.

Distributed: launched by ``torchrun --nproc_per_node N``, every process trains on its share of the
episodes (:class:`ResumableDistributedSampler`, a ``DistributedSampler`` without shuffling: the
dataset already shuffles per epoch) with ``DistributedDataParallel`` (NCCL on CUDA, gloo on CPU;
``find_unused_parameters`` only when some trainable parameter gets no gradient, see
:mod:`benchmarks.engine.distributed`); ``train.batch_size`` is per process. Validation, logging and
checkpoints happen on rank 0 while the other ranks wait at a barrier. See ``docs/TRAINING.md``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

#: every name importable from ``benchmarks.engine`` -> the module that defines it (public names only)
_EXPORTS: Dict[str, str] = {
    **dict.fromkeys(["train", "Trainer", "default_run_name", "threading_main"], "trainer"),
    **dict.fromkeys(["evaluate_run", "final_evaluation", "eval_kwargs"], "final_eval"),
    **dict.fromkeys(["atomic_save", "load_checkpoint_model", "strip_module_prefix", "rng_state", "set_rng_state",
                     "seed_everything"], "checkpoints"),
    **dict.fromkeys(["DistInfo", "init_distributed", "teardown", "exit_process", "all_ranks_finite",
                     "ResumableDistributedSampler", "unwrap", "unused_parameters", "ddp_find_unused_parameters"],
                    "distributed"),
    **dict.fromkeys(["PolyLR", "PolyFactor"], "schedule"),
    **dict.fromkeys(["build_model_from_config", "build_train_dataset", "eval_protocol", "eval_factory", "test_size",
                     "check_model_config", "recipe_hint"], "from_config"),
    **dict.fromkeys(["make_predict_fn", "make_fusions_predict_fn", "evaluate_model", "evaluate_fusions",
                     "evaluate_reference", "has_prior"], "fusion"),
    **dict.fromkeys(["RunLogger", "format_table", "json_default", "finite_json"], "runlog"),
    **dict.fromkeys(["resolve_device", "amp_context"], "device"),
    **dict.fromkeys(["TrainingInterrupted", "ValidationFailed", "RunFolderError", "RunFolderTaken", "RunFolderLocked",
                     "short_error", "first_line", "layout_help"], "errors"),
    **dict.fromkeys(["claim_run_folder", "RunLock", "move_aside", "atomic_write", "run_files", "RUN_FILES"],
                    "runfolder"),
}

__all__ = [
    "train", "Trainer", "TrainingInterrupted", "ValidationFailed", "PolyLR", "ResumableDistributedSampler", "DistInfo",
    "init_distributed", "exit_process", "teardown", "all_ranks_finite", "seed_everything", "atomic_save",
    "resolve_device", "build_model_from_config", "build_train_dataset", "eval_protocol", "eval_factory", "test_size",
    "make_predict_fn", "make_fusions_predict_fn", "evaluate_model", "evaluate_fusions", "evaluate_reference",
    "has_prior", "load_checkpoint_model", "strip_module_prefix", "rng_state", "set_rng_state", "format_table",
    "RunLogger", "amp_context", "unwrap", "default_run_name", "short_error",
    "RunFolderError", "RunFolderTaken", "RunFolderLocked", "claim_run_folder", "RunLock", "move_aside", "atomic_write",
    "evaluate_run",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # the same names for type checkers and IDEs
    from .checkpoints import (atomic_save, load_checkpoint_model, rng_state, seed_everything, set_rng_state,
                              strip_module_prefix)
    from .device import amp_context, resolve_device
    from .distributed import (DistInfo, ResumableDistributedSampler, all_ranks_finite, ddp_find_unused_parameters,
                              exit_process, init_distributed, teardown, unused_parameters, unwrap)
    from .errors import (RunFolderError, RunFolderLocked, RunFolderTaken, TrainingInterrupted, ValidationFailed,
                         first_line, layout_help, short_error)
    from .final_eval import eval_kwargs, evaluate_run, final_evaluation
    from .from_config import (build_model_from_config, build_train_dataset, check_model_config, eval_factory,
                              eval_protocol, recipe_hint, test_size)
    from .fusion import (evaluate_fusions, evaluate_model, evaluate_reference, has_prior, make_fusions_predict_fn,
                         make_predict_fn)
    from .runfolder import RUN_FILES, RunLock, atomic_write, claim_run_folder, move_aside, run_files
    from .runlog import RunLogger, finite_json, format_table, json_default
    from .schedule import PolyFactor, PolyLR
    from .trainer import Trainer, default_run_name, threading_main, train
