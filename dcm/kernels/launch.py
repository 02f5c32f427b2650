"""Launch settings of the dcm Triton kernels: the compile options of every launch and the
launch-configuration knobs.

A leaf module: it imports nothing from dcm (nor Triton or torch), so that the kernel modules of
:mod:`dcm.kernels` take their settings from below rather than from their package, and
:mod:`dcm.verification` can put these definitions in each op's source key.
"""
from __future__ import annotations

import os

__all__ = ["LAUNCH_OPTS", "KNOBS", "tuning", "check_knobs", "interpreter_on"]

#: Compile options every dcm kernel launch passes. ``enable_fp_fusion=True`` (a·b + c contracted to
#: FMA, as nvcc does by default) pins the numerics the kernels were tested with: Triton 3.9 warns that
#: its default turns to False in 3.10. One launch overrides it: the foreground selection kernel
#: (``dcm.kernels.foreground.SELECT_OPTS``), whose threshold comparison must not see contracted
#: rounding.
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


def check_knobs() -> None:
    """Read every knob (``ValueError`` on a bad ``DCM_<name>``)."""
    for name in KNOBS:
        tuning(name)


def interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (it must be set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
