"""Backend selection and run-time switches for dcm.

Backends
--------
``"torch"``  pure PyTorch (grouped convolutions, batched matmuls). Runs everywhere; it is the oracle
             every accelerated path is tested against.
``"triton"`` fused Triton kernels from :mod:`dcm.kernels` (CUDA tensors only).
``"auto"``   (default) per op: ``"triton"`` for CUDA tensors when Triton and the kernels import *and*
             the op's kernels, in their current source, passed their CUDA tests on a GPU of the
             same compute-capability major (the record ``dcm/kernels/verified.json``, see
             :mod:`dcm.verification`); else ``"torch"``. One ``logging`` line (logger ``"dcm"``,
             INFO) says once per process which ops run where and why; :func:`dcm.backend_report`
             lists it for any device.

The backend is read from ``DCM_BACKEND`` at import time and can be changed with
:func:`set_backend` or, for a block, the :func:`use_backend` context manager.

Data checks
-----------
Some checks look at tensor *values* (mask values outside ``[0, 1] ∪ {255}``, empty support
foregrounds for the one-time warning). On a GPU they synchronise the device, so they can be turned
off with :func:`set_data_checks` or ``DCM_DATA_CHECKS=0``; they are always skipped while
``torch.compile`` traces and while a CUDA graph is captured. Shape checks are always on.

Example:
    >>> import dcm
    >>> dcm.get_backend()
    'auto'
    >>> with dcm.use_backend("torch"):
    ...     dcm.get_backend()
    'torch'
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

__all__ = [
    "BACKENDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "resolve_backend",
    "set_data_checks",
    "data_checks_enabled",
]

BACKENDS = ("auto", "torch", "triton")


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


_state = {
    "backend": _validate(os.environ.get("DCM_BACKEND", "auto").strip().lower() or "auto"),
    "data_checks": os.environ.get("DCM_DATA_CHECKS", "1").strip() not in ("0", "false", "no", "off"),
}


def get_backend() -> str:
    """The configured backend name (``"auto"``, ``"torch"`` or ``"triton"``)."""
    return _state["backend"]


def set_backend(name: str) -> None:
    """Set the backend for all dcm ops (see the module docstring)."""
    _state["backend"] = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that sets the backend for the enclosed block and restores it afterwards."""
    old = _state["backend"]
    _state["backend"] = _validate(name)
    try:
        yield
    finally:
        _state["backend"] = old


def _triton_ready() -> bool:
    from . import kernels  # lazy: importing Triton is slow and never needed on CPU

    return kernels.available()


def _triton_interpreted() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False  # cheap exit: no Triton import on the CPU path
    from . import kernels

    return kernels.interpreted()


def resolve_backend(x: torch.Tensor, op: str | None = None) -> str:
    """The backend op ``op`` (a name of :data:`dcm.verification.OPS`) will use for tensor ``x``:
    ``"torch"`` or ``"triton"``.

    ``"triton"`` is only returned for CUDA tensors (and, for an explicit ``"triton"``, for CPU tensors
    when Triton's interpreter is on: ``TRITON_INTERPRET=1``, used to test the kernels without a GPU). Asking for ``"triton"`` explicitly on a
    machine where it cannot run raises ``RuntimeError`` instead of silently falling back. Under
    ``"auto"`` a CUDA op runs its kernels only when they are verified on this device's architecture
    (``op=None``: only when every op's are).
    """
    name = _state["backend"]
    if name == "torch":
        return "torch"
    if x.device.type != "cuda":
        # CPU tensors: only an explicit "triton" under Triton's interpreter (kernel tests without a GPU)
        return "triton" if name == "triton" and _triton_interpreted() else "torch"
    if name == "triton":
        if not _triton_ready():
            raise RuntimeError("dcm backend 'triton' was requested but Triton or dcm.kernels is unavailable")
        return "triton"
    if not _triton_ready():
        return "torch"
    return "triton" if _auto_verified(op, x.device.index if x.device.index is not None else torch.cuda.current_device()) else "torch"


def _auto_verified(op: str | None, index: int) -> bool:
    from .verification import _auto_triton  # a constant of the trace under torch.compile

    return _auto_triton(op, index)


def set_data_checks(enabled: bool) -> None:
    """Turn the value checks (mask values, empty-foreground warning) on or off."""
    _state["data_checks"] = bool(enabled)


def data_checks_enabled(x: torch.Tensor | None = None) -> bool:
    """Whether value checks run now: enabled, not tracing, not capturing a CUDA graph."""
    if not _state["data_checks"]:
        return False
    if torch.compiler.is_compiling():
        return False
    if x is not None and x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True
