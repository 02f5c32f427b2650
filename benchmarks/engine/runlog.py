"""What a run writes besides checkpoints: the ``log.jsonl`` event log (+ TensorBoard) of
:class:`RunLogger`, the JSON encoding of its values (:func:`json_default`, :func:`finite_json`: a NaN or
infinite number, e.g. the IoU of a class no episode sampled, is written as ``null`` so that every file is
valid JSON) and the result table (:func:`format_table`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..scoring.protocols import EvaluationResult

__all__ = ["RunLogger", "format_table", "finite_json", "json_default"]


class RunLogger:
    """JSON-lines log file (+ TensorBoard when importable), rank 0 only."""

    def __init__(self, run_dir: Optional[Path], enabled: bool = True, tensorboard="auto"):
        self.enabled = enabled and run_dir is not None
        self.path = Path(run_dir) / "log.jsonl" if self.enabled else None
        self.tb = None
        if self.enabled and tensorboard not in (False, "false", "off", None):
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception as e:  # ImportError, or tensorboard broken
                if tensorboard is True or tensorboard == "true":
                    raise ImportError(f"run.tensorboard=true but TensorBoard is not usable: {e}") from e

    def log(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_json(rec), default=json_default) + "\n")
        if self.tb is not None:
            step = fields.get("step")
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "iter"):
                    self.tb.add_scalar(f"{event}/{k}", v, step if step is not None else fields.get("epoch", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def finite_json(o):
    """A copy of ``o`` (dicts, lists, tuples, numbers, arrays) whose non-finite floats are ``None``: what
    :func:`json.dumps` writes as ``null`` instead of the invalid bare ``NaN`` / ``Infinity``. Readers of
    these files take ``None`` as "no value" (e.g. a class IoU that no episode sampled).

    Example:
        >>> finite_json({"a": [1.0, float("nan")], 2: (float("inf"), "x")})
        {'a': [1.0, None], 2: [None, 'x']}
    """
    if isinstance(o, dict):
        return {k: finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_json(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.ndarray):
        return finite_json(o.tolist())
    if isinstance(o, torch.Tensor):
        return finite_json(o.detach().cpu().tolist())
    return o


def json_default(o):
    """``json.dumps(..., default=json_default)``: numpy scalars as numbers, tensors as lists, anything else as
    its ``str``."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def format_table(rows: Sequence[Tuple[str, EvaluationResult]], *, paper: Optional[Tuple[float, float]] = None) -> str:
    """A fixed-width table: one row per (label, result) with mIoU, FB-IoU and per-class IoU."""
    if not rows:
        return ""
    names = rows[0][1].class_names
    cls = list(rows[0][1].class_iou)
    w = max(len(r[0]) for r in rows + [("paper",)] if r) + 2
    head = f"{'':{w}}{'mIoU':>8}{'FB-IoU':>8}  " + " ".join(f"{str(names.get(c, c))[:10]:>10}" for c in cls)
    lines = [head]
    for label, r in rows:
        lines.append(f"{label:{w}}{r.miou:8.2f}{r.fbiou:8.2f}  " + " ".join(f"{r.class_iou.get(c, math.nan):10.2f}" for c in cls))
    if paper:
        lines.append(f"{'paper':{w}}{paper[0]:8.2f}{paper[1]:8.2f}")
    return "\n".join(lines)
