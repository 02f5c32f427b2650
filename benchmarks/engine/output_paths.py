"""Checks that the scripts run on their output paths *before* the work, so that a run never fails with
a traceback after training or evaluating because ``--out`` / ``--json`` / ``--md`` names a path under a
file, a folder where a file is wanted, or a place that cannot be written.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "f").write_text("x")
    1
    >>> output_problem(d / "f" / "sub", "folder").endswith("cannot be created under it; give a path in a folder")
    True
    >>> output_problem(d / "new" / "r.json", "file") is None
    True
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["OutputPathError", "output_problem", "check_output"]


class OutputPathError(ValueError):
    """An output path cannot be written; the message names the option and the path."""


def output_problem(path: Union[str, os.PathLike], kind: str = "folder") -> Optional[str]:
    """Why ``path`` cannot be used as an output ``kind`` (``'folder'`` or ``'file'``), or ``None``.

    A folder may exist or be created (every existing parent is a writable folder); a file may be
    created or replaced (it is not a folder, its folder can be created or is writable).
    """
    if kind not in ("folder", "file"):
        raise ValueError(f"kind: expected 'folder' or 'file', got {kind!r}")
    p = Path(os.path.abspath(Path(path).expanduser()))
    if p.exists():
        if kind == "folder" and not p.is_dir():
            return f"'{path}' is a file, not a folder"
        if kind == "file" and p.is_dir():
            return f"'{path}' is a folder, not a file; give a file name"
        target = p if kind == "folder" else p.parent
        if not os.access(target, os.W_OK | os.X_OK) or (kind == "file" and not os.access(p, os.W_OK)):
            return f"'{path}' is not writable"
        return None
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"'{parent}' is a file, so '{path}' cannot be created under it; give a path in a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"folder '{parent}' is not writable, so '{path}' cannot be created"
    return None


def check_output(path: Union[str, os.PathLike], kind: str = "folder", what: str = "--out") -> Path:
    """``Path(path)``, or :class:`OutputPathError` ``"<what>: <why>"`` (:func:`output_problem`)."""
    why = output_problem(path, kind)
    if why is not None:
        raise OutputPathError(f"{what}: {why}")
    return Path(path)
