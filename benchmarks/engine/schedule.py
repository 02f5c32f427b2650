"""The learning-rate schedule: PFENet's poly decay as a ``torch.optim.lr_scheduler.LambdaLR``.

``lr_g(it) = base_g · (1 - it/max_it)^power`` for the ``it``-th iteration, ``it`` counted from 1 and set
*before* that iteration's optimizer step (PFENet's ``poly_learning_rate``), times ``it/warmup_iters``
during an optional linear warmup. :class:`PolyLR` is a ``LambdaLR`` whose lambda is that factor;
the trainer calls ``scheduler.step()`` right before ``optimizer.step()``, so after ``n`` iterations
``last_epoch == n`` and the optimizer holds the lr iteration ``n`` used.

Checkpoints store ``scheduler.state_dict()``. Those written before the switch to ``LambdaLR`` hold
``{max_iters, power, warmup_iters, base_lrs, last_iter}``; :meth:`PolyLR.load_state_dict` reads both
forms (tested in ``tests/test_engine.py``, iteration by iteration against the formula and the old class).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["PolyLR", "PolyFactor"]

_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class PolyFactor:
    """The multiplicative factor of iteration ``it``: ``max(0, 1 - min(it, max_iters)/max_iters)^power``,
    times ``it/warmup_iters`` while ``it <= warmup_iters``; ``1`` before the first iteration (``it <= 0``,
    the base lr, which no step uses).

    A callable object rather than a lambda, so that ``LambdaLR.state_dict`` saves its three fields and a
    resumed run continues the schedule it started with.

    Example:
        >>> f = PolyFactor(10, power=1.0, warmup_iters=2)
        >>> [round(f(it), 3) for it in (0, 1, 2, 3, 10)]
        [1.0, 0.45, 0.8, 0.7, 0.0]
    """

    def __init__(self, max_iters: int, power: float = 0.9, warmup_iters: int = 0):
        self.max_iters = max(1, int(max_iters))
        self.power = float(power)
        self.warmup_iters = int(warmup_iters)

    def __call__(self, it: int) -> float:
        if it <= 0:
            return 1.0
        f = max(0.0, 1.0 - min(it, self.max_iters) / self.max_iters) ** self.power
        if self.warmup_iters and it <= self.warmup_iters:
            f *= it / self.warmup_iters
        return f


class PolyLR(LambdaLR):
    """Poly learning rate (see the module docstring), stepped once per iteration *before* the optimizer step.

    Example:
        >>> from torch import nn
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
        >>> s = PolyLR(opt, max_iters=10, power=1.0)
        >>> s.step(); round(opt.param_groups[0]["lr"], 6)
        0.009
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9, warmup_iters: int = 0,
                 last_epoch: int = -1):
        super().__init__(optimizer, PolyFactor(max_iters, power, warmup_iters), last_epoch)

    # the schedule's parameters (they live in the lambda, which the state dict saves)
    @property
    def max_iters(self) -> int:
        return self.lr_lambdas[0].max_iters

    @property
    def power(self) -> float:
        return self.lr_lambdas[0].power

    @property
    def warmup_iters(self) -> int:
        return self.lr_lambdas[0].warmup_iters

    @property
    def last_iter(self) -> int:
        """Iterations stepped so far (``last_epoch``; the name of the hand-written class)."""
        return self.last_epoch

    def factor(self, it: int) -> float:
        return self.lr_lambdas[0](it)

    def step(self, epoch: Optional[int] = None) -> None:
        # stepping before optimizer.step() is the point (the lr of iteration `it` is set before it runs);
        # LambdaLR would warn about it at the first step
        if self._step_count == 1 and epoch is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_ORDER_WARNING, category=UserWarning)
                return super().step()
        return super().step(epoch)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()`` of this class, or one of the hand-written ``PolyLR`` that preceded it
        (keys ``max_iters, power, warmup_iters, base_lrs, last_iter``)."""
        if "last_iter" in state_dict and "last_epoch" not in state_dict:
            for fn in self.lr_lambdas:
                fn.__init__(state_dict["max_iters"], state_dict["power"], state_dict["warmup_iters"])
            self.base_lrs = list(state_dict["base_lrs"])
            self.last_epoch = int(state_dict["last_iter"])
            self._step_count = self.last_epoch + 1
            self._last_lr = [b * self.factor(self.last_epoch) for b in self.base_lrs]
            return
        super().load_state_dict(state_dict)
