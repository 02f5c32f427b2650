"""Input validation with messages that name the argument and show expected vs actual shape.

Every check of a tensor here looks at shapes, dtypes and devices only (static under
``torch.compile``); the few checks that look at tensor values live in :func:`check_mask_values` and
:func:`warn_if_empty` and respect :func:`dcm.config.data_checks_enabled`. Each argument is checked
once per call: a functional op checks at its entry and a module before it calls the implementation;
a module's options are checked when they are set (:func:`option`).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch

from . import config

__all__ = ["EmptyForegroundWarning"]


class EmptyForegroundWarning(UserWarning):
    """A support mask had no foreground at feature resolution; the documented fallback was used."""


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(int(s)) for s in x.shape) + ")"


def tensor(name: str, x, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def rank(name: str, x: torch.Tensor, ranks: Sequence[int], expected: str) -> None:
    if x.dim() not in ranks:
        raise ValueError(f"{name}: expected shape {expected}, got {_shape(x)} (rank {x.dim()})")


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {x.device}")


def query(name: str, x, channels: int | None = None) -> torch.Tensor:
    """A query feature map ``Tensor[B, C, H, W]`` (with ``C = channels`` when given)."""
    x = tensor(name, x)
    rank(name, x, (4,), "(B, C, H, W)")
    if x.shape[-1] == 0 or x.shape[-2] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected non-empty C, H, W in (B, C, H, W), got {_shape(x)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected C={channels} channels in (B, C, H, W), got {_shape(x)}")
    return x


def support(name: str, x, batch: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Support features ``Tensor[B, K, C, H, W]`` or ``Tensor[B, C, H, W]`` (K = 1) -> 5-D."""
    x = tensor(name, x)
    rank(name, x, (4, 5), "(B, K, C, H, W) or (B, C, H, W)")
    if x.dim() == 4:
        x = x.unsqueeze(1)
    B, K, C, H, W = x.shape
    if K == 0 or C == 0 or H == 0 or W == 0:
        raise ValueError(f"{name}: expected non-empty K, C, H, W in (B, K, C, H, W), got {_shape(x)}")
    if batch is not None and B != batch:
        raise ValueError(f"{name}: expected batch size B={batch} (the query's), got shape {_shape(x)}")
    if channels is not None and C != channels:
        raise ValueError(f"{name}: expected C={channels} channels in (B, K, C, H, W), got {_shape(x)}")
    return x


def mask(name: str, m, batch: int, shots: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Support masks ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]`` (K = 1), any resolution -> 4-D."""
    m = tensor(name, m, floating=False)
    if m.is_complex():
        raise TypeError(f"{name}: expected a real (bool, integer or floating) tensor, got dtype {m.dtype}")
    rank(name, m, (3, 4), f"(B={batch}, K={shots}, h, w) or (B={batch}, h, w)")
    if m.dim() == 3:
        if shots != 1:
            raise ValueError(f"{name}: expected shape (B={batch}, K={shots}, h, w) for {shots} shots, got {_shape(m)}")
        m = m.unsqueeze(1)
    if m.shape[0] != batch or m.shape[1] != shots:
        raise ValueError(f"{name}: expected shape (B={batch}, K={shots}, h, w), got {_shape(m)}")
    if m.shape[-1] == 0 or m.shape[-2] == 0:
        raise ValueError(f"{name}: expected non-empty h, w in (B, K, h, w), got {_shape(m)}")
    same_device(name, m, ref_name, ref)
    return m


def support_and_mask(name: str, x, mask_name: str, m, batch: int | None = None, channels: int | None = None,
                     ref_name: str | None = None, ref: torch.Tensor | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Support features and their masks -> ``(Tensor[B, K, C, H, W], Tensor[B, K, h, w])``: :func:`support`,
    the device of ``ref`` (when given), :func:`mask`, then the mask values (:func:`check_mask_values`)."""
    x = support(name, x, batch=batch, channels=channels)
    if ref is not None:
        same_device(name, x, ref_name, ref)
    m = mask(mask_name, m, x.shape[0], x.shape[1], name, x)
    check_mask_values(mask_name, m)
    return x, m


def episode(q, s, m, channels: int | None = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arguments ``query``, ``support``, ``support_mask`` of the three ops: ``query[B, C, H, W]``
    (``C = channels`` when given), the support with the query's ``B``, ``C`` and device, and its masks
    -> ``(query, support[B, K, C, Hs, Ws], support_mask[B, K, h, w])``."""
    q = query("query", q, channels)
    s, m = support_and_mask("support", s, "support_mask", m, q.shape[0], q.shape[1], "query", q)
    return q, s, m


def check_mask_values(name: str, m: torch.Tensor) -> None:
    """Masks hold finite values in [0, 1] or the ignore label 255 (value check; may synchronise).

    Runs on the mask as given, before any dtype conversion: NaN is an error (not an empty mask), and
    in a dtype that cannot hold 255 (int8) no value is the ignore label (-1 is not 255).
    """
    if not config.data_checks_enabled(m) or m.numel() == 0 or m.dtype == torch.bool:
        return
    if m.is_floating_point() or torch.iinfo(m.dtype).max >= 255:
        ignore = m == 255
    else:
        ignore = torch.zeros_like(m, dtype=torch.bool)
    bad = ~(((m >= 0) & (m <= 1)) | ignore)  # NaN fails every comparison: bad
    if bool(bad.any()):
        if m.is_floating_point() and not bool(m.isfinite().all()):
            raise ValueError(
                f"{name}: expected values in [0, 1] or the ignore label 255, got non-finite values (NaN/Inf); "
                "a NaN mask is not an empty mask: fix or drop the sample upstream"
            )
        vals = torch.unique(m[bad])[:5].tolist()
        raise ValueError(
            f"{name}: expected values in [0, 1] or the ignore label 255, got e.g. {vals}; "
            "convert class-id labels to a binary mask of the episode's class first"
        )


def fg_threshold(name: str, v) -> float:
    """A foreground threshold in the open interval (0, 1) -> float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float in the open interval (0, 1), got {v!r}")
    if not 0.0 < float(v) < 1.0:
        raise ValueError(
            f"{name}: expected a float in the open interval (0, 1), got {v!r} (at <= 0 every support position "
            "is foreground and the mask is ignored; at >= 1 only the mask's peak is); use e.g. 0.5"
        )
    return float(v)


def nonneg_eps(name: str, v) -> float:
    """A finite epsilon >= 0 -> float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) < 0:
        raise ValueError(f"{name}: expected a finite float >= 0 (added to the mask area), got {v!r}")
    return float(v)


def param_dtype(name: str, x: torch.Tensor, dtype: torch.dtype, owner: str) -> None:
    """``x`` has the dtype of ``owner``'s parameters, unless autocast is on for its device."""
    if x.dtype == dtype:
        return
    try:
        if torch.is_autocast_enabled(x.device.type):
            return
    except RuntimeError:  # a device type autocast does not know (meta)
        pass
    raise TypeError(
        f"{name}: expected dtype {dtype} (the dtype of the {owner}'s parameters), got {x.dtype}; "
        f"cast the input (.to({dtype})), convert the module (.to({x.dtype})) or run under torch.autocast"
    )


def _is_positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v > 0


def positive_int(name: str, v, or_none: bool = False) -> Optional[int]:
    """A positive ``int`` (not a ``bool``) -> ``int``; with ``or_none``, ``None`` passes as ``None``."""
    if or_none and v is None:
        return None
    if not _is_positive_int(v):
        raise ValueError(f"{name}: expected {'None or ' if or_none else ''}a positive int, got {v!r}")
    return int(v)


def positive_ints(name: str, vs) -> Tuple[int, ...]:
    """A sequence of positive ``int`` -> tuple (the message shows the whole sequence)."""
    vs = tuple(vs)
    if not all(_is_positive_int(v) for v in vs):
        raise ValueError(f"{name}: expected positive ints, got {vs}")
    return tuple(int(v) for v in vs)


def one_of(name: str, v, options: Sequence):
    """``v`` if it is one of ``options``, else ``ValueError`` listing them (``'a', 'b' or 'c'``)."""
    if v not in options:
        shown = [repr(o) for o in options]
        raise ValueError(f"{name}: expected {', '.join(shown[:-1])} or {shown[-1]}, got {v!r}")
    return v


def odd_size(name: str, k) -> Tuple[int, int]:
    """A positive odd kernel or window size, ``int`` or pair -> ``(kh, kw)``."""
    if isinstance(k, bool):
        raise TypeError(f"{name}: expected a positive odd int or a pair of them, got {k!r}")
    if isinstance(k, int):
        k = (k, k)
    try:
        kh, kw = k
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive odd int or a pair (h, w) of them, got {k!r}") from None
    for v in (kh, kw):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected ints, got {k!r}")
        if v <= 0 or v % 2 == 0:
            raise ValueError(f"{name}: expected positive odd sizes (centred windows), got {tuple(k)}")
    return int(kh), int(kw)


def odd_int(name: str, k) -> int:
    """A positive odd ``int`` (no pair)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: expected a positive odd int, got {k!r}")
    return odd_size(name, k)[0]


def windows(name: str, ws) -> Tuple[Tuple[int, int], ...]:
    try:
        items = list(ws)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of (h, w) windows, got {ws!r}") from None
    if not items:
        raise ValueError(f"{name}: expected at least one (h, w) window, got {ws!r}")
    return tuple(odd_size(f"{name}[{i}]", w) for i, w in enumerate(items))


def option(name: str, check: Callable[[str, object], object]) -> property:
    """A module attribute that is checked when it is set (in ``__init__`` or later) with
    ``check(name, value)``, which returns the value to store: ``forward`` then uses it unchecked."""
    attr = "_" + name

    def get(self):
        return getattr(self, attr)

    def set_(self, value):
        setattr(self, attr, check(name, value))

    return property(get, set_, doc=f"``{name}``, checked when set.")


_warned = {"empty": False}


def warn_if_empty(empty: torch.Tensor, what: str) -> None:
    """Warn once per process when any support sample has an empty foreground (value check)."""
    if _warned["empty"] or not config.data_checks_enabled(empty):
        return
    if bool(empty.any()):
        _warned["empty"] = True
        warnings.warn(
            f"{what}: a support mask has no foreground at feature resolution; using the fallback "
            "(the whole support image is treated as foreground; see 'Empty foreground' in dcm.functional.masks "
            "and docs/CONVENTIONS.md#empty-foreground). "
            "This warning is shown once.",
            EmptyForegroundWarning,
            stacklevel=3,
        )


def reset_warnings() -> None:
    """Let the once-per-process warnings fire again (for tests)."""
    _warned["empty"] = False
