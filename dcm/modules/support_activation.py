"""SupportActivation: window-based region matching of high-level features (DPCN §3.3)."""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
from torch import nn

from .. import _check
from ..functional.support_activation import _chunk_size, _support_activation

__all__ = ["ActivationOutput", "SupportActivation"]


class ActivationOutput(NamedTuple):
    """Outputs of :class:`SupportActivation`."""

    maps: torch.Tensor  #: ``Tensor[B, nW, Hq, Wq]``, one activation map per window, in ``[0, 1]``
    pseudo_mask: torch.Tensor  #: ``Tensor[B, 1, Hq, Wq]``, their mean (the initial pseudo mask ``M^0``)


class SupportActivation(nn.Module):
    r"""Support Activation Module (SAM) of DPCN: activation maps and the initial pseudo mask.

    No parameters. See :func:`dcm.functional.support_activation` for the exact definition and the
    efficient, exact computation (one Gram matrix shared by all windows, diagonal shifts).

    Args:
        windows: odd ``(dh, dw)`` windows (paper: ``(5, 1), (3, 3), (1, 5)``; ``((1, 1),)`` is
            PFENet's prior mask, the paper's COCO setting).
        eps: cosine / normalisation epsilon.
        chunk_size: query rows per chunk to bound memory (``None``: all at once).

    ``windows`` and ``chunk_size`` are checked when they are set (here or as attributes later), not at
    every call.

    Shape:
        - query: ``Tensor[B, C, Hq, Wq]``; support: ``Tensor[B, K, C, Hs, Ws]`` or ``Tensor[B, C, Hs, Ws]``
        - support_mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``, any resolution
        - output: :class:`ActivationOutput` ``(maps[B, nW, Hq, Wq], pseudo_mask[B, 1, Hq, Wq])``

    Example:
        >>> sam = SupportActivation()
        >>> out = sam(torch.rand(2, 32, 12, 12), torch.rand(2, 32, 12, 12), torch.ones(2, 48, 48))
        >>> tuple(out.maps.shape), tuple(out.pseudo_mask.shape)
        ((2, 3, 12, 12), (2, 1, 12, 12))
        >>> SupportActivation(windows=((1, 1),), chunk_size=8)
        SupportActivation(windows=((1, 1),), eps=1e-07, chunk_size=8)
    """

    def __init__(self, windows: Sequence[Tuple[int, int]] = ((5, 1), (3, 3), (1, 5)), eps: float = 1e-7, chunk_size: int | None = None):
        super().__init__()
        self.windows, self.eps, self.chunk_size = windows, float(eps), chunk_size

    windows = _check.option("windows", _check.windows)
    chunk_size = _check.option("chunk_size", _chunk_size)

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor) -> ActivationOutput:
        query, support, support_mask = _check.episode(query, support, support_mask)
        maps = _support_activation(query, support, support_mask, self.windows, self.eps, self.chunk_size)
        return ActivationOutput(maps, maps.mean(1, keepdim=True))

    def extra_repr(self) -> str:
        return f"windows={self.windows}, eps={self.eps}, chunk_size={self.chunk_size}"
