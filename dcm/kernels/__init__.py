"""Optional accelerated CUDA paths (Triton). Imported lazily; never needed on CPU.

Each kernel has a pure-PyTorch twin in :mod:`dcm.functional` that is both the CPU path and the
oracle it is tested against. :func:`available` says whether this machine can use them;
:func:`interpreted` whether Triton's CPU interpreter runs them (for tests without a GPU).
"""
from __future__ import annotations

import functools
import os

__all__ = ["available", "interpreted", "tuning"]

#: Compile options every dcm kernel launch passes. ``enable_fp_fusion=True`` (a·b + c contracted to
#: FMA, as nvcc does by default) pins the numerics the kernels were tested with: Triton 3.9 warns that
#: its default turns to False in 3.10, and the foreground selection kernel reproduces PyTorch's CUDA
#: bilinear resize, which nvcc compiles with FMA contraction.
LAUNCH_OPTS = {"enable_fp_fusion": True}


def tuning(name: str, default: int, lo: int = 1, hi: int = 1 << 30) -> int:
    """A launch-configuration knob: the integer in the environment variable ``DCM_<name>``, or ``default``.

    For timing configurations on a GPU without editing code (``benchmarks/speed.py --sweep`` sets them
    per run); the defaults are the configurations the speed table was measured with. A value that is
    not an integer in ``[lo, hi]`` raises ``ValueError`` naming the variable."""
    v = os.environ.get(f"DCM_{name}", "").strip()
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise ValueError(f"environment variable DCM_{name}={v!r}: expected an integer in [{lo}, {hi}]")
    return n


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
