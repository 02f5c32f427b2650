"""Several processes: joining and leaving the ``torchrun`` process group, the per-process episode sampler,
the cross-process finite-loss check, and whether ``DistributedDataParallel`` must look for unused parameters.

``find_unused_parameters``: DDP with ``find_unused_parameters=True`` walks the autograd graph after every
forward to mark the parameters that will get no gradient; without it, a trainable parameter that gets no
gradient makes the next iteration fail ("Expected to have finished reduction in the prior iteration").
Which networks need it depends on the configuration, not only on the class. Measured with one training
step on 64-px episodes (EfficientNet-Lite0 backbone): with the backbone frozen no registry network leaves
a trainable parameter without gradient (``dpcn`` with or without its support branch, ``baseline``,
``pfenet(+dcm)``, ``canet(+dcm)``); with layer4 trainable, ``baseline``, ``canet`` and ``canet+dcm`` leave
all of layer4 without gradient (they never use layer4's features), ``dpcn`` and ``pfenet(+dcm)`` do not.
:func:`ddp_find_unused_parameters` therefore decides at every (re-)wrap: a network may say so itself
with a ``ddp_find_unused_parameters`` attribute (``True`` / ``False``); otherwise one training forward
of a real batch is probed for parameters without gradient (RNG and buffers such as BatchNorm
statistics restored afterwards, no ``.grad`` written), and the answer is the logical OR over processes.
It costs one extra forward/backward per wrap (at the start, and when layer4 is unfrozen) and runs only
with more than one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
from torch import nn
from torch.utils.data import DistributedSampler

__all__ = ["DistInfo", "init_distributed", "teardown", "exit_process", "all_ranks_finite",
           "ResumableDistributedSampler", "unwrap", "unused_parameters", "ddp_find_unused_parameters"]


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


_GROUP_OWNED = False  # init_distributed created the process group (teardown destroys it)


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


def teardown(trainer) -> None:
    """Release what a run holds, whatever ended it: the DDP wrapper (its communication threads), the
    process group this run created, and the process-wide deterministic-algorithms setting.

    ``trainer``: the :class:`~benchmarks.engine.trainer.Trainer` of the run, or ``None`` when building it failed.
    """
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


def all_ranks_finite(loss: torch.Tensor, dist: DistInfo) -> bool:
    """Whether the loss is finite on *every* process (one all-reduce under DDP), so that all processes
    skip a step together instead of some waiting forever in the gradient all-reduce."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0])
    return not _any_rank(bad, dist, loss.device)


def _any_rank(flag: torch.Tensor, dist: DistInfo, device: torch.device) -> bool:
    """``flag`` (a one-element CPU tensor, 0 or 1) OR-ed over the processes."""
    if dist.distributed:
        if torch.distributed.get_backend() == "nccl":
            flag = flag.to(device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return float(flag) != 0.0


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


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (or the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def unused_parameters(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> List[str]:
    """Names of ``model``'s trainable parameters that get no gradient from ``loss_fn(model)`` (one forward in
    training mode). Leaves no trace: the RNG states and the buffers (BatchNorm statistics) are restored and no
    ``.grad`` is written (``torch.autograd.grad``)."""
    from .checkpoints import rng_state, set_rng_state
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng, was_training = rng_state(), model.training
    model.train()
    try:
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        set_rng_state(rng)
    return [n for (n, _), g in zip(named, grads) if g is None]


def ddp_find_unused_parameters(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], dist: DistInfo,
                               device: torch.device) -> bool:
    """The ``find_unused_parameters`` to wrap ``model`` with (see the module docstring): the model's own
    ``ddp_find_unused_parameters`` attribute when it has one, else whether :func:`unused_parameters` finds
    any on some process. Call it on every process at the same point (it all-reduces)."""
    declared: Optional[bool] = getattr(model, "ddp_find_unused_parameters", None)
    if declared is not None:
        return bool(declared)
    unused = unused_parameters(model, loss_fn)
    return _any_rank(torch.tensor([1.0 if unused else 0.0]), dist, device)
