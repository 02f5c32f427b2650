"""Dilated ResNet-50/101 backbones, output stride 8.

Two layouts, both with torchvision's Bottleneck (stride on the 3x3 conv, "v1.5"):

``ResNetBackbone`` (names ``resnet50`` / ``resnet101``)
    torchvision's own network, ``torchvision.models.resnet50/101(replace_stride_with_dilation=
    [False, True, True])``: 7x7 stem, ``layer3`` dilation 2 and ``layer4`` dilation 4 (torchvision
    convention: the first block of a dilated stage keeps the previous dilation -- 1 in
    ``layer3.0``, 2 in ``layer4.0`` -- the other blocks use the new one). Loads torchvision-format
    state dicts (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...; ``fc.*`` ignored).

``ResNetV2Backbone`` (names ``resnet50_v2`` / ``resnet101_v2``)
    The deep-stem PSPNet/semseg ResNet that PFENet loads from ``initmodel/resnet50_v2.pth``
    (docs/CONVENTIONS.md#backbones). Stem ``conv1`` 3x3 3->64 stride 2, ``bn1``, ReLU, ``conv2`` 3x3 64->64,
    ``bn2``, ReLU, ``conv3`` 3x3 64->128, ``bn3``, ReLU, 3x3 max-pool stride 2 pad 1; ``inplanes``
    128, so ``layer1.0.conv1`` is 128->64 and ``layer1.0.downsample.0`` is 128->256. PFENet's
    dilation: in ``layer3`` *every* ``conv2`` has dilation 2 / padding 2 / stride 1 and
    ``downsample.0`` stride 1; in ``layer4`` dilation/padding 4. Checkpoint keys::

        conv1.weight  bn1.{weight,bias,running_mean,running_var}   (64)
        conv2.weight  bn2.*  (64)        conv3.weight  bn3.*  (128)
        layer{1..4}.{i}.conv1.weight  .bn1.*  .conv2.weight  .bn2.*  .conv3.weight  .bn3.*
        layer{1..4}.0.downsample.0.weight  layer{1..4}.0.downsample.1.*
        fc.weight (1000, 2048)  fc.bias        <- ignored (classifier)

    (``*.num_batches_tracked`` may be absent in old checkpoints; that is not reported.)

Both: ``channels = {"layer2": 512, "layer3": 1024, "layer4": 2048}``, strides 8/8/8; a 473x473
input gives 60x60 at ``layer2``, ``layer3`` and ``layer4`` (237 -> 119 -> 119 -> 60). Weights were
trained with ImageNet mean/std (PFENet: ``mean=[0.485, 0.456, 0.406]*255``, ``std=[0.229,
0.224, 0.225]*255``).
"""
from __future__ import annotations

from typing import List, Tuple

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from .base import Backbone

__all__ = ["ResNetBackbone", "ResNetV2Backbone"]

_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_CHANNELS = {"layer2": 512, "layer3": 1024, "layer4": 2048}
_STRIDES = {"layer2": 8, "layer3": 8, "layer4": 8}


def _check_depth(depth: int) -> None:
    if depth not in _DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(_DEPTHS)}, got {depth}")


class _ResNetCommon(Backbone):
    channels = _CHANNELS
    strides = _STRIDES
    ignored_checkpoint_prefixes = ("fc.",)

    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def _stem(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_mid(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.layer1(self._stem(x))
        layer2 = self.layer2(x)
        return layer2, self.layer3(layer2)

    def _forward_high(self, layer3: Tensor) -> Tensor:
        return self.layer4(layer3)

    def _high_modules(self) -> List[nn.Module]:
        return [self.layer4]


class ResNetBackbone(_ResNetCommon):
    """torchvision ResNet-50/101 with ``replace_stride_with_dilation=[False, True, True]``.

    Args:
        depth: 50 or 101.
        freeze_bn, input_norm: see :class:`~models.backbones.base.Backbone`.

    Shapes: ``Tensor[B, 3, H, W]`` -> layer2/3/4 ``Tensor[B, 512/1024/2048, ceil(H/8), ceil(W/8)]``.
    """

    def __init__(self, depth: int = 50, *, freeze_bn: bool = True, input_norm: str = "imagenet") -> None:
        _check_depth(depth)
        super().__init__(freeze_bn=freeze_bn, input_norm=input_norm)
        self.name = f"resnet{depth}"
        builder = tv_resnet.resnet50 if depth == 50 else tv_resnet.resnet101
        net = builder(weights=None, replace_stride_with_dilation=[False, True, True])
        # register torchvision's modules at the top level so the state-dict keys are torchvision's
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self._finish_init()

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNetV2Backbone(_ResNetCommon):
    """Deep-stem ResNet-50/101 of PSPNet/PFENet (``initmodel/resnet{50,101}_v2.pth`` key names).

    Args:
        depth: 50 or 101.
        freeze_bn, input_norm: see :class:`~models.backbones.base.Backbone`.

    Shapes: ``Tensor[B, 3, H, W]`` -> layer2/3/4 ``Tensor[B, 512/1024/2048, ceil(H/8), ceil(W/8)]``.
    """

    def __init__(self, depth: int = 50, *, freeze_bn: bool = True, input_norm: str = "imagenet") -> None:
        _check_depth(depth)
        super().__init__(freeze_bn=freeze_bn, input_norm=input_norm)
        self.name = f"resnet{depth}_v2"
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        blocks = _DEPTHS[depth]
        self._inplanes = 128
        self.layer1 = self._make_layer(64, blocks[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(128, blocks[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(256, blocks[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(512, blocks[3], stride=1, dilation=4)
        del self._inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._finish_init()

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        """A stage of torchvision Bottlenecks; every block's 3x3 conv gets ``dilation`` (PFENet)."""
        expansion = tv_resnet.Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        layers: List[nn.Module] = [
            tv_resnet.Bottleneck(self._inplanes, planes, stride=stride, downsample=downsample, dilation=dilation)
        ]
        self._inplanes = planes * expansion
        layers += [tv_resnet.Bottleneck(self._inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.maxpool(x)
