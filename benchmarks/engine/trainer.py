"""Training: :class:`Trainer` (one recipe: data, model, optimiser, schedule, the fit loop with its
checkpoints, resume, signals and validation) and :func:`train` (a whole run: the no-training references,
:meth:`Trainer.fit`, the final test of the best checkpoint, ``results.json``).

The loop: every epoch reseeds with ``seed_everything(seed + epoch + 100000·rank)`` and builds the epoch's
DataLoader over :class:`~benchmarks.engine.distributed.ResumableDistributedSampler` (started after the
iterations a resumed checkpoint already did); every iteration sets the poly lr of that iteration
(:class:`~benchmarks.engine.schedule.PolyLR`) before the optimizer step, skips the step on every process
when the loss is not finite on one of them, and writes ``last.pth`` every
``train.checkpoint_every_iters`` iterations; at the end of an epoch ``last.pth`` is written *before* the
validation, so a failed validation (:class:`~benchmarks.engine.errors.ValidationFailed`) loses no
training; ``best.pth`` follows the validation class mIoU. SIGINT/SIGTERM writes ``last.pth`` after the
current iteration and raises :class:`~benchmarks.engine.errors.TrainingInterrupted` (a second signal stops
at once).

A run folder belongs to one run: the Trainer locks it (``<run>/.lock``) and a new run refuses a folder
that holds another one (:mod:`benchmarks.engine.runfolder`).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import save_config
from ..datasets import collate_episodes
from ..scoring.protocols import EvaluationResult, Protocol
from . import checkpoints
from .checkpoints import rng_state, seed_everything, set_rng_state, strip_module_prefix
from .device import amp_context, resolve_device
from .distributed import (ResumableDistributedSampler, _any_rank, all_ranks_finite, ddp_find_unused_parameters,
                          init_distributed, teardown)
from .errors import RunFolderError, TrainingInterrupted, ValidationFailed, first_line, layout_help, short_error
from .from_config import build_model_from_config, build_train_dataset, eval_factory, eval_protocol
from .final_eval import eval_kwargs, final_evaluation
from .fusion import evaluate_model, evaluate_reference, has_prior
from .runfolder import RunLock, claim_run_folder
from .runlog import RunLogger, finite_json, format_table, json_default
from .schedule import PolyLR

__all__ = ["train", "Trainer", "default_run_name"]

log = logging.getLogger(__name__)


def default_run_name(cfg: dict) -> str:
    m, d = cfg["model"], cfg["data"]
    fold = f"_f{d['fold']}" if d["dataset"] not in ("fss", "fss1000") else ""
    return f"{m['name'].replace('+', '_')}_{d['dataset']}{fold}_{m['backbone']}_{m['shot']}shot"


class Trainer:
    """Training of one recipe. Use :func:`train` unless you need the pieces.

    Args:
        cfg: a resolved config (:func:`benchmarks.engine.config.load_config`).
        run_dir: output folder (default ``run.out_dir / (run.name or default_run_name(cfg))``).
        resume: ``None``, ``True`` (``run_dir/last.pth``) or a checkpoint path.
        model: an already built network to train instead of :func:`build_model_from_config` (tests).
        stop_after_iters: raise :class:`TrainingInterrupted` after this many iterations of this process
            (simulates a kill in tests; checkpoints are only those already written).
        echo: print progress lines (rank 0).

    Rank 0 takes the run folder's lock and checks that the run may use the folder before anything is
    written (:func:`~benchmarks.engine.runfolder.claim_run_folder`): without ``resume`` a folder that holds
    another run raises :class:`~benchmarks.engine.errors.RunFolderTaken` (or, with ``run.move_aside``, is
    renamed to a fresh sibling), a folder locked by another process raises
    :class:`~benchmarks.engine.errors.RunFolderLocked`. The lock is held until :meth:`release`
    (:func:`train` releases it after the final evaluation).
    """

    def __init__(self, cfg: dict, run_dir=None, *, resume=None, model: Optional[nn.Module] = None,
                 stop_after_iters: Optional[int] = None, echo: Callable[[str], None] = print):
        self._lock: Optional[RunLock] = None
        try:
            self._setup(cfg, run_dir, resume=resume, model=model, stop_after_iters=stop_after_iters, echo=echo)
        except BaseException:
            self.release()
            raise

    def _setup(self, cfg: dict, run_dir, *, resume, model: Optional[nn.Module], stop_after_iters: Optional[int],
               echo: Callable[[str], None]) -> None:
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
        self.moved_aside = self._claim_run_dir(resume)
        self.stop_after_iters = stop_after_iters
        # tqdm bars only on a terminal: in a log file they are noise (one line per epoch is echoed instead)
        self.progress = bool(cfg["run"]["progress"]) and self.main and _stderr_is_tty()

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
        # the validation part is built (its masks read) now, not after the first epoch: a bad mask in it
        # stops the run before any training (the factory keeps the dataset for the validations)
        self.factory(self.val_protocol, self.val_protocol.seeds[0], self.val_protocol.scales[0])

        # ---- model (seeded, so every process and every resumed run builds the same initial weights)
        seed_everything(int(t["seed"]))
        self.model = model if model is not None else build_model_from_config(self.cfg)
        self.model._registry_name = self.cfg["model"]["name"]
        self.model.to(self.device)
        self.feature_cache = None
        if t["cache_backbone"]:
            from .feature_cache import attach_from_config
            self.feature_cache = attach_from_config(self.model, self.cfg)
        self.net = self.model  # possibly DDP-wrapped
        self.ddp_find_unused: Optional[bool] = None  # the find_unused_parameters of the DDP wrapper (None: no DDP)
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

    # ------------------------------------------------------------------ the run folder
    def _claim_run_dir(self, resume) -> Optional[str]:
        """Rank 0 locks the run folder and checks that this run may use it
        (:func:`~benchmarks.engine.runfolder.claim_run_folder`); every process raises when rank 0 refused.
        Returns where an earlier run in the folder was moved (``run.move_aside``), else ``None``."""
        failure = None
        if self.main:
            try:
                self._lock = claim_run_folder(self.run_dir, resume=bool(resume), cfg=self.cfg,
                                              move=bool(self.cfg["run"].get("move_aside")), echo=self.echo)
            except RunFolderError as e:
                failure = e
        if self.dist.distributed:
            if _any_rank(torch.tensor([float(failure is not None)]), self.dist, self.device) and failure is None:
                raise RunFolderError(f"run folder '{self.run_dir}': rank 0 refused it (its error names the reason)",
                                     self.run_dir)
        if failure is not None:
            raise failure
        moved = getattr(self._lock, "moved_aside", None)
        return str(moved) if moved is not None else None

    def release(self) -> None:
        """Release the run folder's lock (held from the construction on; :func:`train` releases it at its end)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass

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
        """(Re-)wrap in DDP: the set of parameters that require grad is fixed at wrap time, and so is
        ``find_unused_parameters`` (decided here for that set, see :mod:`benchmarks.engine.distributed`)."""
        self._set_layer4_state_only()
        self.net = self.model  # the previous wrapper (if any) goes before the probe
        if self.dist.distributed:
            find_unused = ddp_find_unused_parameters(self.model, self._probe_loss, self.dist, self.device)
            if find_unused != self.ddp_find_unused:
                log.info("DistributedDataParallel(find_unused_parameters=%s)%s", find_unused,
                         " (layer4 trainable)" if self.layer4_on else "")
            self.ddp_find_unused = find_unused
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=find_unused)

    def _probe_loss(self, model: nn.Module) -> torch.Tensor:
        """The training loss of ``model`` on this process's first batch of training episodes (of the epoch
        the dataset was last set to), as :meth:`_step` computes it (for the DDP probe,
        :func:`~benchmarks.engine.distributed.unused_parameters`)."""
        idx = range(self.dist.rank, len(self.train_set), self.dist.world_size)[:self.batch_size]
        batch = collate_episodes([self.train_set[i] for i in idx])
        q, s, sm, qm = (batch[k].to(self.device) for k in ("query_img", "support_imgs", "support_masks", "query_mask"))
        with amp_context(self.device, self.cfg["train"]["amp"]):
            out = model(q, s, sm, query_mask=qm)
        return out["loss"].float()

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
        return checkpoints.atomic_save(self._state(), self.run_dir / name)

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
                             f"{self.cfg['model']['flags']}): {first_line(e)}") from None
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
            ddp = {} if self.ddp_find_unused is None else {"ddp_find_unused_parameters": self.ddp_find_unused}
            self.logger.log("start", resumed_from=self.resumed_from, epoch=self.epoch, iter=self.iter_in_epoch,
                            world_size=self.dist.world_size, device=str(self.device), host=socket.gethostname(),
                            iters_per_epoch=self.iters_per_epoch, max_iters=self.max_iters,
                            train_episodes=len(self.train_set), val_protocol=self.val_protocol.describe(), **ddp,
                            **({"moved_aside": self.moved_aside} if self.moved_aside else {}))
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
                gates = dcm_gates(self.model)
                rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, loss_n), "seconds": round(secs, 2),
                       **({"dcm_gamma": gates} if gates else {}),
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
            help_ = layout_help(e)
            raise ValidationFailed(f"validation after epoch {self.epoch} failed: {short_error(e, layout=False)} -- the "
                                   f"epoch's checkpoint {self.run_dir / 'last.pth'} is saved; fix the problem and "
                                   f"continue with --resume (the validation runs first)"
                                   + (f"\nExpected layout:\n{help_}" if help_ else "")) from e
        rec.update(val_miou=r.miou, val_fbiou=r.fbiou, val_seconds=round(r.per_seed[0]["seconds"], 2))
        if r.miou > self.best["miou"]:
            self.best = {"miou": r.miou, "fbiou": r.fbiou, "epoch": self.epoch}
            rec["best"] = True
        self._pending_val = False
        self.save("last.pth")
        if rec.get("best"):
            checkpoints.atomic_save(self._state(), self.run_dir / "best.pth")

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


def dcm_gates(model: nn.Module) -> Dict[str, float]:
    """Mean |γ| of every residual :class:`dcm.DCMFusion` of ``model`` (``{module name: value}``), the size of
    the DCM's contribution logged with each epoch."""
    from dcm import DCMFusion
    net = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    return {name: round(float(m.gamma.detach().abs().mean()), 6) for name, m in net.named_modules()
            if isinstance(m, DCMFusion) and getattr(m, "gamma", None) is not None}


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()

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
        if trainer is not None:
            if trainer.feature_cache is not None:
                trainer.feature_cache.flush()  # this run's new features, as a shard of the on-disk store
            trainer.release()
        teardown(trainer)

def _train(trainer: "Trainer", t_start: float, echo, evaluate_after: Optional[bool]) -> dict:
    e = trainer.cfg["eval"]
    evaluate_after = e["enabled"] if evaluate_after is None else evaluate_after
    ref_kinds = []
    for k in (e["reference"] if isinstance(e["reference"], list) else [e["reference"]]):
        if k == "auto":
            k = "prior" if has_prior(trainer.model) else "untrained"
        if k not in (None, False, "none") and k not in ref_kinds:
            ref_kinds.append(k)
    if evaluate_after and "prior" in ref_kinds and not has_prior(trainer.model):
        others = [k for k in ref_kinds if k != "prior"]
        raise ValueError(f"eval.reference: model '{trainer.cfg['model']['name']}' has no training-free prior, so the "
                         f"'prior' reference cannot be evaluated; set --set eval.reference="
                         f"{others[0] if len(others) == 1 else ('[' + ','.join(others) + ']') if others else 'none'} "
                         f"(or eval.reference=auto: the prior where the model has one), or pass --no-eval")
    protocol = eval_protocol(trainer.cfg)
    ekw = eval_kwargs(trainer.cfg, trainer.device, trainer.progress)
    refs: List[Tuple[str, EvaluationResult]] = []
    ref_path = trainer.run_dir / "reference.json"
    if trainer.main:
        echo(f"run folder: {trainer.run_dir}")
        echo(f"model {trainer.cfg['model']['name']} ({trainer.cfg['model']['backbone']}, "
             f"{sum(p.numel() for g in trainer.optimizer.param_groups for p in g['params']):,} trainable parameters), "
             f"{len(trainer.train_set)} training episodes/epoch, {trainer.iters_per_epoch} iterations/epoch × "
             f"{trainer.epochs} epochs, batch {trainer.batch_size}×{trainer.dist.world_size}, device {trainer.device}")
        echo(f"validation: {trainer.val_protocol.describe()}")
    if evaluate_after and trainer.main and protocol.split != trainer.val_protocol.split:
        # a test part other than the validation part is built (its masks read) before any training too
        trainer.factory(protocol, protocol.seeds[0], protocol.scales[0])
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
            ref_path.write_text(json.dumps(finite_json([{"label": l, **r.as_dict()} for l, r in refs]),
                                           default=json_default))
    trainer.dist.barrier()
    fit = trainer.fit()
    out = {"run_dir": str(trainer.run_dir), **fit}
    if evaluate_after and trainer.main:
        best_path = trainer.run_dir / "best.pth"
        model_eval = trainer.model
        if best_path.is_file():
            ck = torch.load(best_path, map_location="cpu", weights_only=False)
            model_eval = copy.deepcopy(trainer.model)
            model_eval.load_state_dict(strip_module_prefix(ck["model"]))
        rows, results = final_evaluation(model_eval, trainer.cfg, protocol, trainer.factory, best=trainer.best,
                                         train_seconds=sum(h.get("seconds", 0) for h in trainer.history),
                                         device=trainer.device, refs=refs, progress=trainer.progress)
        r = rows[-1][1]
        echo("")
        echo(f"Test: {protocol.describe()}" + (f", K-shot fusion: {e['fusion']}" if protocol.shot > 1 else ""))
        echo(format_table(rows))
        results = finite_json(results)
        (trainer.run_dir / "results.json").write_text(json.dumps(results, indent=1, default=json_default))
        trainer.logger = RunLogger(trainer.run_dir, True, False)
        trainer.logger.log("eval", miou=r.miou, fbiou=r.fbiou, protocol=protocol.describe(),
                           references={l: {"miou": x.miou, "fbiou": x.fbiou} for l, x in refs})
        out["results"] = results
    out["seconds"] = time.perf_counter() - t_start
    if trainer.main:
        RunLogger(trainer.run_dir, True, False).log("end", seconds=round(out["seconds"], 1))
    trainer.dist.barrier()
    return out

def _result_from_dict(d: dict) -> EvaluationResult:
    p = d["protocol"]
    prot = Protocol(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items()})
    per_seed = []
    for s in d["per_seed"]:  # null (a NaN when written) -> NaN
        s = {k: (math.nan if v is None and k in ("miou", "fbiou", "episode_miou") else v) for k, v in s.items()}
        s["class_iou"] = {int(k): (math.nan if v is None else v) for k, v in s["class_iou"].items()}
        per_seed.append(s)
    return EvaluationResult(prot, per_seed, {int(k): v for k, v in d.get("class_names", {}).items()})
