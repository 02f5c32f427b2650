"""Optional accelerated CUDA paths (Triton). Imported lazily; never needed on CPU.

Each kernel has a pure-PyTorch twin in :mod:`dcm.functional` that is both the CPU path and the
oracle it is tested against. :func:`available` says whether this machine can use them;
:func:`interpreted` whether Triton's CPU interpreter runs them (for tests without a GPU).
"""
from __future__ import annotations

import functools
import os

__all__ = ["available", "interpreted"]

#: Compile options every dcm kernel launch passes. ``enable_fp_fusion=True`` (a·b + c contracted to
#: FMA, as nvcc does by default) pins the numerics the kernels were tested with: Triton 3.9 warns that
#: its default turns to False in 3.10, and the foreground selection kernel reproduces PyTorch's CUDA
#: bilinear resize, which nvcc compiles with FMA contraction.
LAUNCH_OPTS = {"enable_fp_fusion": True}


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
    """Triton and the three kernel modules import."""
    try:
        import triton  # noqa: F401

        from . import dynamic_conv, foreground, support_activation  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when CUDA, Triton and the dcm Triton kernels are usable here."""
    import torch

    return torch.cuda.is_available() and _importable()


@functools.lru_cache(maxsize=None)
def interpreted() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` before Triton is imported) and the
    kernels import: then ``dcm.set_backend("triton")`` runs them on CPU tensors, slowly -- a way to test
    the kernels without a GPU (``tests/test_kernels_interpreter.py``), never a fast path."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _importable()
