"""Optional accelerated CUDA paths (Triton). Imported lazily; never needed on CPU.

Each kernel has a pure-PyTorch twin in :mod:`dcm.functional` that is both the CPU path and the
oracle it is tested against. :func:`available` says whether this machine can use them;
:func:`interpreted` whether Triton's CPU interpreter runs them (for tests without a GPU).
"""
from __future__ import annotations

import functools
import os

__all__ = ["KNOBS", "available", "interpreted", "tuning"]

#: Compile options every dcm kernel launch passes. ``enable_fp_fusion=True`` (a·b + c contracted to
#: FMA, as nvcc does by default) pins the numerics the kernels were tested with: Triton 3.9 warns that
#: its default turns to False in 3.10, and the foreground selection kernel reproduces PyTorch's CUDA
#: bilinear resize, which nvcc compiles with FMA contraction.
LAUNCH_OPTS = {"enable_fp_fusion": True}


#: Launch-configuration knobs: name -> (default, smallest, largest, power of two only, what it sets).
#: Each is read from the environment variable ``DCM_<name>`` (:func:`tuning`) when the kernel modules
#: are imported, to time configurations on a GPU without editing code (``python benchmarks/speed.py
#: --sweep DW_ROWS=1,2,4``). The defaults are the configurations dcm ships; docs/SPEED.md says which
#: of them each measured number used.
KNOBS = {
    "DW_ROWS": (4, 1, 4, False, "input rows the rolling dynamic-conv forward / dx kernels load per loop step"),
    "DW_PROGRAMS": (132 * 24, 1, 1 << 30, False, "programs the rolling dynamic-conv kernels aim for (row chunks)"),
    "SAM_BP": (32, 16, 256, True, "support positions per program of the SAM window kernel"),
    "SAM_BR": (64, 16, 256, True, "query positions per program of the SAM window kernel"),
    "SAM_WARPS": (4, 1, 16, True, "warps per program of the SAM window kernel"),
    "SAM_PROGS": (4 * 132, 1, 1 << 30, False, "programs the SAM window kernel aims for (support splits)"),
    "FG_SM_PROGRAMS": (2, 1, 64, False, "programs per SM the foreground pooling kernel aims for (position chunks)"),
}


def tuning(name: str) -> int:
    """The value of knob ``name`` of :data:`KNOBS`: the integer in ``DCM_<name>``, or the default.

    A value that is not an integer in the knob's range (or not a power of two where one is needed)
    raises ``ValueError`` naming the variable."""
    default, lo, hi, pow2, _ = KNOBS[name]
    v = os.environ.get(f"DCM_{name}", "").strip()
    if not v:
        return default
    try:
        n = int(v)
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi or (pow2 and n & (n - 1)):
        need = f"an integer in [{lo}, {hi}]" + (", a power of two" if pow2 else "")
        raise ValueError(f"environment variable DCM_{name}={v!r}: expected {need}")
    return n


def _check_knobs() -> None:
    for name in KNOBS:
        tuning(name)


@functools.lru_cache(maxsize=None)
def _importable() -> bool:
    """Triton and the three kernel modules import. A bad ``DCM_<knob>`` value raises (not a silent
    fall back to the PyTorch path)."""
    _check_knobs()
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

    _check_knobs()
    return torch.cuda.is_available() and _importable()


@functools.lru_cache(maxsize=None)
def interpreted() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` before Triton is imported) and the
    kernels import: then ``dcm.set_backend("triton")`` runs them on CPU tensors, slowly -- a way to test
    the kernels without a GPU (``tests/test_kernels_interpreter.py``), never a fast path."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _importable()
