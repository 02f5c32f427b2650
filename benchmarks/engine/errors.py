"""The engine's exceptions and its one-line error messages.

:class:`TrainingInterrupted` and :class:`ValidationFailed` are what :meth:`~benchmarks.engine.trainer.Trainer.fit`
raises when a run stops before its end with its checkpoint on disk; :class:`RunFolderTaken` and
:class:`RunFolderLocked` (both :class:`RunFolderError`, a ``ValueError``) what a run raises before it writes
anything when its folder holds another run or is in use; :func:`short_error` turns any exception
(also one re-raised from a DataLoader worker) into the one line the command-line scripts print.
"""
from __future__ import annotations

__all__ = ["TrainingInterrupted", "ValidationFailed", "RunFolderError", "RunFolderTaken", "RunFolderLocked",
           "short_error", "first_line", "layout_help"]


class TrainingInterrupted(RuntimeError):
    """Raised by :meth:`Trainer.fit` when told to stop early (``stop_after_iters``, SIGINT/SIGTERM)."""


class ValidationFailed(RuntimeError):
    """The per-epoch validation raised; the epoch's ``last.pth`` is already written (resume validates first)."""


class RunFolderError(ValueError):
    """A run cannot use its run folder (:mod:`benchmarks.engine.runfolder`); ``run_dir`` is the folder."""

    def __init__(self, message: str, run_dir=None):
        super().__init__(message)
        self.run_dir = run_dir


class RunFolderTaken(RunFolderError):
    """A new run (not resumed) into a folder that holds another run; ``found``: the run files present."""

    def __init__(self, message: str, run_dir=None, found=()):
        super().__init__(message, run_dir)
        self.found = list(found)


class RunFolderLocked(RunFolderError):
    """Another process holds the run folder's lock; ``holder``: e.g. ``process 1234``."""

    def __init__(self, message: str, run_dir=None, holder: str = ""):
        super().__init__(message, run_dir)
        self.holder = holder


def first_line(e: BaseException, index: int = 0) -> str:
    """One line of an exception's message (``index``: which non-empty line), for one-line errors."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[min(index, len(lines) - 1)] if lines else ""


_LAYOUT = "Expected layout:"


def layout_help(e: BaseException) -> str:
    """The folder-layout help a dataset error carries after ``Expected layout:`` (its lines, indentation
    kept), or ``""``."""
    text = str(e)
    i = text.find(_LAYOUT)
    if i < 0:
        return ""
    lines = [ln.rstrip() for ln in text[i + len(_LAYOUT):].splitlines()]
    return "\n".join(ln for ln in lines if ln.strip())


def short_error(e: BaseException, *, layout: bool = True) -> str:
    """An exception as one line; for an error re-raised from a DataLoader worker, the worker's own message
    (the file it names) instead of the worker traceback. A dataset error's ``Expected layout:`` help
    follows on the next lines (``layout=False``: the first line only), so the layout is never cut."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
    first = first_line(e) or type(e).__name__
    help_ = layout_help(e) if layout else ""
    if help_:
        head = first[: first.find(_LAYOUT)].rstrip() if _LAYOUT in first else first
        return f"{head} {_LAYOUT}\n{help_}"
    return first
