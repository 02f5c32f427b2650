"""VGG-16-BN backbone with PFENet's split of ``features`` (docs/CONVENTIONS.md#backbones).

torchvision's ``vgg16_bn().features`` indices (conv, BN, ReLU triplets and 2x2 max-pools)::

    layer0 = features[0:7]    conv64  x2 + pool1          1/2    64 ch
    layer1 = features[7:14]   conv128 x2 + pool2          1/4   128 ch
    layer2 = features[14:24]  conv256 x3 + pool3          1/8   256 ch   <- mid-level
    layer3 = features[24:34]  conv512 x3 + pool4          1/16  512 ch   <- mid-level
    layer4 = features[34:43]  conv512 x3 (pool5 dropped)  1/16  512 ch   <- high-level

Pools use ``ceil_mode=True`` (PFENet), so a 473 input gives 237 -> 119 -> 60 (layer2) -> 30
(layer3, layer4). ``layer2`` is therefore *twice the size* of ``layer3``: the model must
resize it (PFENet: bilinear, ``align_corners=True``) before concatenating ``[layer3, layer2]``
(768 channels); SAM, FFM and DCM then run at 1/16 (docs/CONVENTIONS.md#backbones).

Weights: torchvision's ``vgg16_bn`` state dict (PFENet's ``initmodel/vgg16_bn.pth`` is that file):
``features.{N}.weight/bias`` for convs (N = 0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40) and
``features.{N+1}.{weight,bias,running_mean,running_var}`` for their BNs; ``classifier.*`` is
ignored. ImageNet mean/std input.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import Tensor, nn

from .base import Backbone

__all__ = ["VGG16BNBackbone"]

# torchvision's configuration "D" (VGG-16); "M" = 2x2 max-pool
_CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# PFENet's split of ``features`` into layer0..layer4 (half-open index ranges)
_SPLIT = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))


class VGG16BNBackbone(Backbone):
    """VGG-16 with BatchNorm, ``features`` split as PFENet does.

    Args:
        freeze_bn, input_norm: see :class:`~models.backbones.base.Backbone`.

    Shapes: ``Tensor[B, 3, H, W]`` -> ``layer2 Tensor[B, 256, H/8, W/8]``,
    ``layer3`` and ``layer4 Tensor[B, 512, H/16, W/16]`` (each halving rounds up).
    """

    name = "vgg16_bn"
    channels = {"layer2": 256, "layer3": 512, "layer4": 512}
    strides = {"layer2": 8, "layer3": 16, "layer4": 16}
    ignored_checkpoint_prefixes = ("classifier.",)

    def __init__(self, *, freeze_bn: bool = True, input_norm: str = "imagenet") -> None:
        super().__init__(freeze_bn=freeze_bn, input_norm=input_norm)
        layers: List[nn.Module] = []
        in_ch = 3
        for v in _CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
        assert len(layers) == _SPLIT[-1][1]
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._finish_init()

    def layer(self, i: int) -> nn.Sequential:
        """PFENet's ``layer{i}`` (i = 0..4) as a view on ``features`` (shares the modules)."""
        start, stop = _SPLIT[i]
        return self.features[start:stop]

    def _forward_mid(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.features[_SPLIT[0][0] : _SPLIT[1][1]](x)
        layer2 = self.features[_SPLIT[2][0] : _SPLIT[2][1]](x)
        return layer2, self.features[_SPLIT[3][0] : _SPLIT[3][1]](layer2)

    def _forward_high(self, layer3: Tensor) -> Tensor:
        return self.features[_SPLIT[4][0] : _SPLIT[4][1]](layer3)

    def _high_modules(self) -> List[nn.Module]:
        return [self.features[_SPLIT[4][0] : _SPLIT[4][1]]]
