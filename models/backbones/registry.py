"""``build_backbone(name, weights=..., layer4_trainable=...)``: the one way models get a backbone."""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Union

from .base import Backbone
from .efficientnet_lite import EfficientNetLite0Backbone, lite0_checkpoint_path
from .loading import BackboneWeightsWarning, load_backbone_weights
from .resnet import ResNetBackbone, ResNetV2Backbone
from .vgg import VGG16BNBackbone

__all__ = ["BACKBONES", "available_backbones", "build_backbone", "register_backbone"]

#: name -> factory(**kwargs) returning a randomly initialised, frozen :class:`Backbone`
BACKBONES: Dict[str, Callable[..., Backbone]] = {
    "resnet50": lambda **kw: ResNetBackbone(50, **kw),
    "resnet101": lambda **kw: ResNetBackbone(101, **kw),
    "resnet50_v2": lambda **kw: ResNetV2Backbone(50, **kw),
    "resnet101_v2": lambda **kw: ResNetV2Backbone(101, **kw),
    "vgg16_bn": lambda **kw: VGG16BNBackbone(**kw),
    "efficientnet_lite0": lambda **kw: EfficientNetLite0Backbone(**kw),
}

# where to get ImageNet weights for the backbones without an offline copy
_WEIGHT_HINTS = {
    "resnet50": "torchvision's resnet50 ImageNet file, e.g. ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth "
                "(ResNet50_Weights.IMAGENET1K_V1) or resnet50-11ad3fa6.pth (IMAGENET1K_V2)",
    "resnet101": "torchvision's resnet101 ImageNet file, e.g. ~/.cache/torch/hub/checkpoints/resnet101-63fe2227.pth",
    "resnet50_v2": "PFENet's initmodel/resnet50_v2.pth (the PSPNet/semseg deep-stem ImageNet weights)",
    "resnet101_v2": "PFENet's initmodel/resnet101_v2.pth (the PSPNet/semseg deep-stem ImageNet weights)",
    "vgg16_bn": "PFENet's initmodel/vgg16_bn.pth (= torchvision's vgg16_bn-6c64b313.pth)",
}


def available_backbones() -> List[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(BACKBONES)


def register_backbone(name: str, factory: Callable[..., Backbone], *, overwrite: bool = False) -> None:
    """Add a backbone factory (called with the extra keyword arguments of :func:`build_backbone`)."""
    if name in BACKBONES and not overwrite:
        raise ValueError(f"backbone {name!r} is already registered")
    BACKBONES[name] = factory


def build_backbone(
    name: str,
    weights: Union[None, str, os.PathLike] = None,
    layer4_trainable: bool = False,
    *,
    strict: bool = False,
    **kwargs,
) -> Backbone:
    """Build a frozen backbone by name and load its weights.

    Args:
        name: one of ``resnet50, resnet101, resnet50_v2, resnet101_v2, vgg16_bn, efficientnet_lite0``.
        weights: ``None`` -> random initialisation and exactly one :class:`BackboneWeightsWarning`
            saying so; ``"random"`` -> random initialisation on purpose, no warning (tests);
            ``"imagenet"`` -> the offline ImageNet weights (only ``efficientnet_lite0`` has them;
            for the others a ``ValueError`` says which local file to pass); any other string or
            path -> a local ``torch.save``-d state dict (``module.`` prefixes stripped; a
            :class:`~models.backbones.loading.LoadReport` is kept in ``backbone.load_report`` and
            a warning lists missing/unexpected keys).
        layer4_trainable: unfreeze the high-level stage (``set_layer4_trainable(True)``).
        strict: raise unless every backbone key is loaded from the file.
        **kwargs: passed to the backbone class (``freeze_bn``, ``input_norm``; for
            ``efficientnet_lite0`` also ``output_stride``, ``keep_classifier``).

    Returns:
        a :class:`~models.backbones.base.Backbone`; call it on ``Tensor[B, 3, H, W]`` to get
        ``BackboneFeatures(layer2, layer3, layer4)``.

    Raises:
        ValueError: unknown name, ``"imagenet"`` without an offline copy, unreadable weights or
            no matching key.

    Example:
        >>> import torch
        >>> bb = build_backbone("resnet50_v2", weights="random")
        >>> bb.channels, bb.output_stride
        ({'layer2': 512, 'layer3': 1024, 'layer4': 2048}, 8)
        >>> f = bb(torch.zeros(1, 3, 65, 65))
        >>> tuple(f.layer4.shape), f.layer4.requires_grad
        ((1, 2048, 9, 9), False)
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    backbone = BACKBONES[name](**kwargs)
    if weights is None:
        warnings.warn(
            f"backbone {name!r} is randomly initialised (weights=None): pass a local weights file "
            f"(or weights='random' to silence this warning)",
            BackboneWeightsWarning,
            stacklevel=2,
        )
    elif isinstance(weights, str) and weights == "random":
        pass
    elif isinstance(weights, str) and weights == "imagenet":
        if name != "efficientnet_lite0":
            raise ValueError(
                f"no offline ImageNet weights for {name!r} (nothing is downloaded at run time); "
                f"pass weights=<local path>, e.g. {_WEIGHT_HINTS.get(name, 'a torch.save-d state dict')}"
            )
        load_backbone_weights(backbone, lite0_checkpoint_path(), strict=strict)
    else:
        load_backbone_weights(backbone, weights, strict=strict)
    if layer4_trainable:
        backbone.set_layer4_trainable(True)
    return backbone
