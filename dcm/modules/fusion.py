"""DCMFusion: how a host network takes in the Dynamic Convolution Module's maps."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import _check

__all__ = ["DCMFusion", "DCM_FUSIONS"]

#: the fusion modes of :class:`DCMFusion`
DCM_FUSIONS = ("replace", "residual")


class DCMFusion(nn.Module):
    r"""Merge a host's query feature ``q [B, C, h, w]`` with the DCM maps (``n`` tensors ``[B, C_m, h, w]``).

    ``C_m`` is ``map_channels`` (default ``C``: the DCM ran on ``q`` itself); another value lets the
    DCM run on a wider feature (e.g. a host's raw backbone feature before its reduction to ``C``)
    and still merge into ``q``: the projection maps ``C + n·C_m`` channels to ``C``.

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

    def __init__(self, channels: int, n_maps: int, mode: str = "residual", gamma_init: float = 0.0,
                 map_channels: Optional[int] = None):
        super().__init__()
        if mode not in DCM_FUSIONS:
            raise ValueError(f"mode: expected one of {DCM_FUSIONS}, got {mode!r}")
        channels, n_maps = _check.positive_int("channels", channels), _check.positive_int("n_maps", n_maps)
        map_channels = _check.positive_int("map_channels", map_channels, or_none=True) or channels
        self.mode, self.channels, self.n_maps, self.map_channels = mode, channels, n_maps, map_channels
        self.proj = nn.Sequential(nn.Conv2d(channels + n_maps * map_channels, channels, 1, bias=False),
                                  nn.ReLU(inplace=True))
        if mode == "residual":
            self.gamma = nn.Parameter(torch.full((channels,), float(gamma_init)))

    def forward(self, q: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[1] != self.channels:
            raise ValueError(f"q: expected shape (B, {self.channels}, h, w), got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        if len(maps) != self.n_maps:
            raise ValueError(f"maps: expected {self.n_maps} DCM maps, got {len(maps)}")
        B, h, w = q.shape[0], q.shape[-2], q.shape[-1]
        for i, t in enumerate(maps):
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != self.map_channels or t.shape[-2:] != q.shape[-2:]:
                raise ValueError(f"maps[{i}]: expected shape ({B}, {self.map_channels}, {h}, {w}) (the batch and size of q), "
                                 f"got {tuple(t.shape)}")
        y = self.proj(torch.cat([q, *maps], 1))
        if self.mode == "replace":
            return y
        return q + self.gamma.view(1, -1, 1, 1).to(y.dtype) * y

    def extra_repr(self) -> str:
        extra = f", map_channels={self.map_channels}" if self.map_channels != self.channels else ""
        return f"channels={self.channels}, n_maps={self.n_maps}{extra}, mode={self.mode!r}"
