"""Deprecated spellings kept for one release: :func:`renamed_kwarg`."""
from __future__ import annotations

import functools
import warnings

__all__ = ["renamed_kwarg"]


def renamed_kwarg(old: str, new: str):
    """Decorator: accept the keyword argument ``old`` as ``new`` with a :class:`DeprecationWarning`.

    Passing both is a ``TypeError``. The wrapped function's signature (and ``help``) show ``new``.
    """

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{fn.__name__}: got both '{old}' and '{new}'; pass only '{new}'")
                warnings.warn(f"{fn.__name__}: the keyword '{old}' is deprecated and will be removed in the next "
                              f"release; use '{new}'", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return deco
