"""Backbones for few-shot segmentation: one interface, frozen by default (GitHub issue 3).

``build_backbone(name, weights=None | "random" | "imagenet" | path, layer4_trainable=False)``
returns a :class:`Backbone`; ``backbone(x)`` maps ``Tensor[B, 3, H, W]`` to
``BackboneFeatures(layer2, layer3, layer4)``; ``forward_mid(x) -> (layer2, layer3)`` and
``forward_high(layer3) -> layer4`` expose the two halves (PFENet masks the support's
``layer3`` before ``layer4``).

name                         layer2  layer3  layer4  strides l2/l3/l4  sizes for a 473 input
resnet50, resnet101             512    1024    2048   8 / 8 / 8         60 / 60 / 60
resnet50_v2, resnet101_v2       512    1024    2048   8 / 8 / 8         60 / 60 / 60
vgg16_bn                        256     512     512   8 / 16 / 16       60 / 30 / 30
efficientnet_lite0               40     112     320   8 / 8 / 8         60 / 60 / 60

VGG's ``layer2`` must be resized to ``layer3``'s size by the model before concatenation.
All backbones take ImageNet-normalised input by default (``backbone.input_mean/input_std``);
EfficientNet-Lite0's weights expect 127/128 scaling and the backbone converts internally.
See ``base.py`` (interface, freezing), ``loading.py`` (weights), and each architecture's module.
"""
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneFeatures, freeze_batchnorm
from .efficientnet_lite import EfficientNetLite0Backbone, lite0_checkpoint_path
from .loading import BackboneWeightsWarning, LoadReport, load_backbone_weights, read_state_dict
from .registry import BACKBONES, available_backbones, build_backbone, register_backbone
from .resnet import ResNetBackbone, ResNetV2Backbone
from .vgg import VGG16BNBackbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneFeatures",
    "BackboneWeightsWarning",
    "EfficientNetLite0Backbone",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadReport",
    "ResNetBackbone",
    "ResNetV2Backbone",
    "VGG16BNBackbone",
    "available_backbones",
    "build_backbone",
    "freeze_batchnorm",
    "lite0_checkpoint_path",
    "load_backbone_weights",
    "read_state_dict",
    "register_backbone",
]
