"""Optional accelerated CUDA paths (Triton). Imported lazily; never needed on CPU.

Each kernel has a pure-PyTorch twin in :mod:`dcm.functional` that is both the CPU path and the
oracle it is tested against. :func:`available` says whether this machine can use them;
:func:`interpreted` whether Triton's CPU interpreter runs them (for tests without a GPU).
"""
from __future__ import annotations

import functools

from .launch import KNOBS, check_knobs, interpreter_on, tuning

__all__ = ["KNOBS", "available", "interpreted", "tuning"]


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
    """Triton and the three kernel modules import. A bad ``DCM_<knob>`` value raises (not a silent
    fall back to the PyTorch path)."""
    check_knobs()
    try:
        import triton  # noqa: F401

        from . import dynamic_conv, foreground, support_activation  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when CUDA, Triton and the dcm Triton kernels are usable here (``ValueError`` on a bad
    ``DCM_<knob>`` environment variable, even without a GPU)."""
    import torch

    check_knobs()
    return torch.cuda.is_available() and _importable()


@functools.lru_cache(maxsize=None)
def interpreted() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` before Triton is imported) and the
    kernels import: then ``dcm.set_backend("triton")`` runs them on CPU tensors, slowly -- a way to test
    the kernels without a GPU (``tests/test_kernels_interpreter.py``), never a fast path."""
    return interpreter_on() and _importable()
