"""DCMFusion: how a host network takes in the Dynamic Convolution Module's maps."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["DCMFusion", "DCM_FUSIONS"]

#: the fusion modes of :class:`DCMFusion`
DCM_FUSIONS = ("replace", "residual")


class DCMFusion(nn.Module):
    r"""Merge a host's query feature ``q [B, C, h, w]`` with the DCM maps (``n`` tensors ``[B, C, h, w]``).

    * ``"residual"`` (default): ``q' = q + γ ⊙ ReLU(Conv1x1([q, maps]))`` with a per-channel ``γ``
      initialised to ``gamma_init`` (default 0, as timm's ``LayerScale`` with zero init / ControlNet's
      zero convolutions): at initialisation host+DCM computes exactly the host, and the DCM branch
      enters as ``γ`` learns. The form that raised PFENet on real images (docs/REAL_IMAGES.md).
    * ``"replace"`` (DPCN's description for PFENet): ``q' = ReLU(Conv1x1([q, maps]))``; the host loses
      its own ``q`` at initialisation (a random projection takes its place).

    Example:
        >>> f = DCMFusion(4, 3, "residual")
        >>> q = torch.randn(2, 4, 5, 5)
        >>> torch.equal(f(q, [torch.randn(2, 4, 5, 5)] * 3), q)
        True
    """

    def __init__(self, channels: int, n_maps: int, mode: str = "residual", gamma_init: float = 0.0):
        super().__init__()
        if mode not in DCM_FUSIONS:
            raise ValueError(f"mode: expected one of {DCM_FUSIONS}, got {mode!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels: expected a positive int, got {channels!r}")
        if isinstance(n_maps, bool) or not isinstance(n_maps, int) or n_maps < 1:
            raise ValueError(f"n_maps: expected a positive int, got {n_maps!r}")
        self.mode, self.channels, self.n_maps = mode, int(channels), int(n_maps)
        self.proj = nn.Sequential(nn.Conv2d((1 + n_maps) * channels, channels, 1, bias=False), nn.ReLU(inplace=True))
        if mode == "residual":
            self.gamma = nn.Parameter(torch.full((channels,), float(gamma_init)))

    def forward(self, q: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        y = self.proj(torch.cat([q, *maps], 1))
        if self.mode == "replace":
            return y
        return q + self.gamma.view(1, -1, 1, 1).to(y.dtype) * y

    def extra_repr(self) -> str:
        return f"channels={self.channels}, n_maps={self.n_maps}, mode={self.mode!r}"
