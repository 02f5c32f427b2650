"""Decoder pieces of the PFENet / BAM / DPCN family: ASPP without BN, residual block, classifier.

DPCN's decoder (paper Eq. 10, docs/CONVENTIONS.md#decoder) is
``M̂_q = F_cls(F_ASPP(F_conv(x_out)))`` with

* ``F_conv``: 1×1 conv (``in_channels -> D``, no bias) + ReLU + Dropout2d(0.5);
* ``F_ASPP``: image pooling, 1×1 and three 3×3 dilated (rates 6/12/18) branches, ``D`` channels
  each, ReLU, no BN; concat ``5·D`` -> 1×1 (``5·D -> D``) + ReLU; then a residual block
  ``x + ReLU(conv3×3(ReLU(conv3×3(x))))``;
* ``F_cls``: 3×3 conv + ReLU + Dropout2d(0.1) + 1×1 (``D -> 2``, with bias).

All convolutions have no bias except the final 1×1 classifier (PFENet's convention for head
layers). ``D`` = 256 by default.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .common import upsample

__all__ = ["ASPP", "ResidualBlock", "ClassifierHead", "DPCNDecoder", "decoder_parameter_count"]


def _conv_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling without BatchNorm, followed by a 1×1 projection.

    Branches (each ``channels -> channels`` + ReLU): global average pooling + 1×1 conv (broadcast
    back to ``H×W``), 1×1 conv, and one 3×3 conv per dilation rate. The ``(2 + len(rates))·channels``
    concatenation is projected back to ``channels`` by a 1×1 conv + ReLU.

    Args:
        channels: input and output channels ``D``.
        rates: dilation rates of the 3×3 branches (default ``(6, 12, 18)``).

    Shape:
        ``Tensor[B, D, H, W] -> Tensor[B, D, H, W]`` (any ``H, W ≥ 1``).

    Example:
        >>> ASPP(8)(torch.randn(2, 8, 9, 9)).shape
        torch.Size([2, 8, 9, 9])
    """

    def __init__(self, channels: int = 256, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_relu(channels, channels, 1))
        self.branches = nn.ModuleList(
            [_conv_relu(channels, channels, 1)] + [_conv_relu(channels, channels, 3, r) for r in self.rates]
        )
        self.project = _conv_relu((2 + len(self.rates)) * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([pooled] + [b(x) for b in self.branches], dim=1))


class ResidualBlock(nn.Module):
    """``x + ReLU(conv3×3(ReLU(conv3×3(x))))`` (PFENet's ``res2`` / BAM's ``res2_meta``).

    Example:
        >>> ResidualBlock(8)(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(self, channels: int = 256):
        super().__init__()
        self.body = nn.Sequential(*_conv_relu(channels, channels, 3), *_conv_relu(channels, channels, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class ClassifierHead(nn.Sequential):
    """``F_cls``: 3×3 conv + ReLU + Dropout2d(p) + 1×1 conv (with bias) to ``num_classes``.

    Example:
        >>> ClassifierHead(8)(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 2, 5, 5])
    """

    def __init__(self, channels: int = 256, num_classes: int = 2, dropout: float = 0.1):
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
            nn.Conv2d(channels, num_classes, 1),
        )


class DPCNDecoder(nn.Module):
    """DPCN decoder ``F_cls(F_ASPP(F_conv(x_out)))`` (paper Eq. 10, docs/CONVENTIONS.md#decoder).

    Args:
        in_channels: channels of ``x_out`` (``4C + 4`` for the full DPCN with three SAM windows).
        channels: decoder width ``D`` (256).
        rates: ASPP dilation rates.
        conv_dropout: Dropout2d after ``F_conv`` (0.5).
        cls_dropout: Dropout2d inside ``F_cls`` (0.1).
        num_classes: 2 (background, foreground).

    Shape:
        ``x_out: Tensor[B, in_channels, h, w] -> logits Tensor[B, num_classes, h, w]``; pass
        ``size=(H, W)`` to get the logits upsampled bilinearly (``align_corners=True``).

    Example:
        >>> DPCNDecoder(20, channels=8)(torch.randn(2, 20, 9, 9), size=(65, 65)).shape
        torch.Size([2, 2, 65, 65])
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        conv_dropout: float = 0.5,
        cls_dropout: float = 0.1,
        num_classes: int = 2,
    ):
        super().__init__()
        self.in_channels, self.channels = int(in_channels), int(channels)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=conv_dropout),
        )
        self.aspp = ASPP(channels, rates)
        self.res = ResidualBlock(channels)
        self.cls = ClassifierHead(channels, num_classes, cls_dropout)

    def forward(self, x: Tensor, size=None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DPCNDecoder: expected x_out of shape (B, {self.in_channels}, h, w), got {tuple(x.shape)}"
            )
        logits = self.cls(self.res(self.aspp(self.conv(x))))
        return logits if size is None else upsample(logits, size)


def decoder_parameter_count(in_channels: int, channels: int = 256, n_rates: int = 3, num_classes: int = 2) -> int:
    """Number of parameters of :class:`DPCNDecoder` computed from the layer shapes (no bias
    except the classifier's final 1×1).

    Example:
        >>> decoder_parameter_count(20, 8) == sum(p.numel() for p in DPCNDecoder(20, 8).parameters())
        True
    """
    D = channels
    f_conv = in_channels * D
    aspp = D * D + D * D + n_rates * 9 * D * D + (2 + n_rates) * D * D
    res = 2 * 9 * D * D
    cls = 9 * D * D + D * num_classes + num_classes
    return f_conv + aspp + res + cls
