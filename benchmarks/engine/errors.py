"""The engine's exceptions and its one-line error messages.

:class:`TrainingInterrupted` and :class:`ValidationFailed` are what :meth:`~benchmarks.engine.trainer.Trainer.fit`
raises when a run stops before its end with its checkpoint on disk; :func:`short_error` turns any exception
(also one re-raised from a DataLoader worker) into the one line the command-line scripts print.
"""
from __future__ import annotations

__all__ = ["TrainingInterrupted", "ValidationFailed", "short_error"]


class TrainingInterrupted(RuntimeError):
    """Raised by :meth:`Trainer.fit` when told to stop early (``stop_after_iters``, SIGINT/SIGTERM)."""


class ValidationFailed(RuntimeError):
    """The per-epoch validation raised; the epoch's ``last.pth`` is already written (resume validates first)."""


def _first_line(e: BaseException, index: int = 0) -> str:
    """One line of an exception's message (``index``: which non-empty line), for one-line errors."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[min(index, len(lines) - 1)] if lines else ""


def short_error(e: BaseException) -> str:
    """An exception as one line; for an error re-raised from a DataLoader worker, the worker's own message
    (the file it names) instead of the worker traceback."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
    return _first_line(e) or type(e).__name__
