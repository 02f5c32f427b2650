"""Where and in which precision the engine computes: ``run.device`` → a ``torch.device``
(:func:`resolve_device`), ``train.amp`` → autocast (:func:`amp_context`).
"""
from __future__ import annotations

import contextlib
from typing import Union

import torch

__all__ = ["resolve_device", "amp_context"]


def resolve_device(spec: Union[str, torch.device, None] = "auto", local_rank: int = 0) -> torch.device:
    """``'auto'`` → ``cuda:<local_rank>`` if available else ``cpu``; otherwise ``torch.device(spec)``."""
    if spec in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: '{spec}' requested but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def amp_context(device: torch.device, amp: Union[str, bool, None]):
    """Autocast for the configured ``train.amp``: ``auto`` = bf16 on CUDA, off on CPU."""
    if amp in (None, False, "off"):
        return contextlib.nullcontext()
    if amp == "auto":
        if device.type != "cuda":
            return contextlib.nullcontext()
        amp = "bf16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
