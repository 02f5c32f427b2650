"""The common interface of every backbone: mid/high split, freezing policy, frozen BatchNorm.

A backbone maps images ``Tensor[B, 3, H, W]`` to three feature maps:

* ``layer2`` and ``layer3`` -- the *mid-level* features (PFENet/DPCN concatenate
  ``[layer3, layer2]`` and reduce them with a 1x1 conv to C = 256; resizing ``layer2`` to the
  size of ``layer3`` when they differ, as for VGG, is the model's job);
* ``layer4`` -- the *high-level* features (prior / SAM similarity, computed from ``layer3``).

The split into :meth:`Backbone.forward_mid` and :meth:`Backbone.forward_high` exists because
PFENet (and DPCN with ``sam_mask_before_layer4``) multiply the support's ``layer3`` by the
support mask *before* running ``layer4``::

    l2, l3 = backbone.forward_mid(support_img)          # frozen, no autograd graph
    l4 = backbone.forward_high(l3 * mask_at_l3)          # trainable when layer4 is

Freezing policy (docs/CONVENTIONS.md#layer4-fine-tuning and docs/CONVENTIONS.md#frozen-bn):

* every parameter is frozen (``requires_grad=False``) at construction;
  :meth:`Backbone.set_layer4_trainable` unfreezes the high-level stage only (conv *and* BN
  affine parameters of that stage);
* every BatchNorm layer of the backbone stays in eval mode (running statistics used, never
  updated) even after ``model.train()`` -- unless the backbone was built with
  ``freeze_bn=False`` (PFENet's released behaviour, train-mode BN in a frozen backbone);
* the frozen part runs under ``torch.no_grad()`` (no graph, less memory, faster); the
  high-level stage records a graph only when one of its parameters requires grad or its input
  does. Gradients therefore never reach a frozen parameter.

Input normalisation: ``backbone.input_mean`` / ``backbone.input_std`` (per RGB channel, in
units of [0, 1] pixel values) are what :meth:`Backbone.forward` expects. By default
(``input_norm="imagenet"``) every backbone takes ImageNet-normalised images -- the project's
data pipeline -- and a backbone whose weights were trained with another normalisation
(``weights_mean`` / ``weights_std``, e.g. EfficientNet-Lite's 127/128 scaling) converts
internally with a per-channel affine map. ``input_norm="native"`` skips that conversion and
expects the weights' own normalisation.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "Backbone",
    "BackboneFeatures",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "freeze_batchnorm",
]

#: torchvision / PFENet ImageNet statistics, in units of [0, 1] pixel values (RGB).
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

_BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


class BackboneFeatures(NamedTuple):
    """Features of one forward pass.

    Attributes:
        layer2: ``Tensor[B, channels["layer2"], H2, W2]`` mid-level (shallower).
        layer3: ``Tensor[B, channels["layer3"], H3, W3]`` mid-level (deeper).
        layer4: ``Tensor[B, channels["layer4"], H4, W4]`` high-level; ``H4 == H3`` for
            every backbone here (dilated ResNets / Lite0 at stride 8, VGG at 1/16).
    """

    layer2: Tensor
    layer3: Tensor
    layer4: Tensor


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer inside ``module`` into eval mode (in place) and return it."""
    for m in module.modules():
        if isinstance(m, _BN_TYPES):
            m.eval()
    return module


class Backbone(nn.Module):
    """Base class: subclasses build their layers, then call :meth:`_finish_init`.

    Subclasses implement

    * ``_forward_mid(x) -> (layer2, layer3)`` (the frozen part, stem included),
    * ``_forward_high(layer3) -> layer4``,
    * ``_high_modules() -> list[nn.Module]`` (the modules of the high-level stage),

    and set the class/instance attributes ``name``, ``channels``, ``strides``,
    ``weights_mean``, ``weights_std`` and ``ignored_checkpoint_prefixes`` (checkpoint keys of
    the ImageNet classifier that the backbone deliberately does not build; the weight loader
    lists them as *ignored*, not *unexpected*).

    Attributes:
        channels: ``{"layer2": int, "layer3": int, "layer4": int}``.
        strides: output stride of each level, e.g. ``{"layer2": 8, "layer3": 8, "layer4": 8}``
            (for odd inputs the sizes are ``ceil(H / stride)``: 473 -> 60 at stride 8).
        output_stride: ``strides["layer4"]``.
        input_mean, input_std: the normalisation ``forward`` expects (see module docstring).
        weights_mean, weights_std: the normalisation the pretrained weights were trained with.
        freeze_bn: whether BN layers stay in eval mode under ``train()``.
        load_report: the :class:`~models.backbones.loading.LoadReport` of the last weight load
            (``None`` before any).
    """

    name: str = "backbone"
    channels: Dict[str, int]
    strides: Dict[str, int]
    weights_mean: Tuple[float, float, float] = IMAGENET_MEAN
    weights_std: Tuple[float, float, float] = IMAGENET_STD
    ignored_checkpoint_prefixes: Tuple[str, ...] = ()

    def __init__(self, *, freeze_bn: bool = True, input_norm: str = "imagenet") -> None:
        super().__init__()
        if input_norm not in ("imagenet", "native"):
            raise ValueError(f"input_norm must be 'imagenet' or 'native', got {input_norm!r}")
        self.freeze_bn = bool(freeze_bn)
        self.input_norm = input_norm
        self.load_report = None
        #: optional memo of the frozen stages (``benchmarks.engine.feature_cache.FeatureCache``): an object with
        #: ``lookup(kind, x, compute) -> output of compute(x)``; ``None`` computes every call
        self.feature_cache = None

    # ------------------------------------------------------------------ subclass hooks
    def _forward_mid(self, x: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_high(self, layer3: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _high_modules(self) -> List[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish_init(self) -> None:
        """Freeze every parameter, set up input conversion, put BN in eval mode if frozen."""
        self.channels = dict(self.channels)  # per-instance copies of the class-level tables
        self.strides = dict(self.strides)
        for p in self.parameters():
            p.requires_grad_(False)
        if self.input_norm == "imagenet":
            self.input_mean, self.input_std = IMAGENET_MEAN, IMAGENET_STD
        else:
            self.input_mean, self.input_std = tuple(self.weights_mean), tuple(self.weights_std)
        self._convert_input = tuple(self.input_mean) != tuple(self.weights_mean) or tuple(
            self.input_std
        ) != tuple(self.weights_std)
        if self._convert_input:
            # x_weights = (x_in * s_in + m_in - m_w) / s_w = x_in * scale + shift
            m_in, s_in = torch.tensor(self.input_mean), torch.tensor(self.input_std)
            m_w, s_w = torch.tensor(self.weights_mean), torch.tensor(self.weights_std)
            self.register_buffer("_in_scale", (s_in / s_w).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("_in_shift", ((m_in - m_w) / s_w).view(1, 3, 1, 1), persistent=False)
        self.train(self.training)

    # ------------------------------------------------------------------ properties
    @property
    def output_stride(self) -> int:
        """Output stride of the high-level features (``strides["layer4"]``)."""
        return self.strides["layer4"]

    @property
    def layer4_trainable(self) -> bool:
        """True when every parameter of the high-level stage requires grad."""
        params = list(self.high_level_parameters())
        return bool(params) and all(p.requires_grad for p in params)

    def layer4_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the high-level stage (``layer4``), trainable or not (optimiser group)."""
        for m in self._high_modules():
            yield from m.parameters()

    high_level_parameters = layer4_parameters  # alias

    def mid_level_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the stem and stages up to ``layer3`` (always frozen by default)."""
        high = {id(p) for p in self.high_level_parameters()}
        for p in self.parameters():
            if id(p) not in high:
                yield p

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters that currently require grad (empty when the backbone is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ freezing policy
    def set_layer4_trainable(self, trainable: bool = True) -> "Backbone":
        """Unfreeze (``True``) or freeze (``False``) the high-level stage; returns ``self``.

        Only ``layer4`` (and its BN affine parameters) change; the stem and ``layer1..3`` stay
        frozen. BN running statistics stay frozen whenever ``freeze_bn`` is set.
        """
        for p in self.high_level_parameters():
            p.requires_grad_(bool(trainable))
        return self

    def train(self, mode: bool = True) -> "Backbone":
        """Set train/eval mode; with ``freeze_bn`` every BN layer nevertheless stays in eval."""
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self)
        return self

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _grad_context(params: Sequence[nn.Parameter] | Iterator[nn.Parameter], x: Tensor):
        if torch.is_grad_enabled() and not x.requires_grad and not any(p.requires_grad for p in params):
            return torch.no_grad()
        return contextlib.nullcontext()

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: x must be a Tensor[B, 3, H, W], got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: x must be Tensor[B, 3, H, W], got shape {tuple(x.shape)}")

    def prepare_input(self, x: Tensor) -> Tensor:
        """Map ``x`` (normalised with ``input_mean/std``) to the weights' normalisation."""
        if self._convert_input:
            return x * self._in_scale.to(x.dtype) + self._in_shift.to(x.dtype)
        return x

    def forward_mid(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Stem + stages up to ``layer3``.

        Args:
            x: ``Tensor[B, 3, H, W]`` normalised with ``input_mean`` / ``input_std``.

        Returns:
            ``(layer2[B, C2, H2, W2], layer3[B, C3, H3, W3])``; no autograd graph unless a
            parameter of this part (or ``x``) requires grad.
        """
        self._check_images(x)
        params = list(self.mid_level_parameters())
        if self.feature_cache is not None and self._cacheable(params, x):
            return self.feature_cache.lookup("mid", x, self._forward_mid_frozen)
        with self._grad_context(params, x):
            return self._forward_mid(self.prepare_input(x))

    def _forward_mid_frozen(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self._forward_mid(self.prepare_input(x))

    def _forward_high_frozen(self, layer3: Tensor) -> Tensor:
        with torch.no_grad():
            return self._forward_high(layer3)

    def _cacheable(self, params, x: Tensor) -> bool:
        """Whether a stage is a pure function of its input: no trainable parameter, no input
        gradient and no BatchNorm in training mode (the cache is bypassed otherwise)."""
        if x.requires_grad or any(p.requires_grad for p in params):
            return False
        return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.modules())

    def forward_high(self, layer3: Tensor) -> Tensor:
        """High-level stage: ``Tensor[B, C3, H3, W3] -> Tensor[B, C4, H3, W3]``.

        Records a graph only when a ``layer4`` parameter or ``layer3`` requires grad.
        """
        if layer3.dim() != 4 or layer3.shape[1] != self.channels["layer3"]:
            raise ValueError(
                f"{self.name}.forward_high: layer3 must be Tensor[B, {self.channels['layer3']}, H, W], "
                f"got shape {tuple(layer3.shape)}"
            )
        params = list(self.high_level_parameters())
        if self.feature_cache is not None and self._cacheable(params, layer3):
            return self.feature_cache.lookup("high", layer3, self._forward_high_frozen)
        with self._grad_context(params, layer3):
            return self._forward_high(layer3)

    def forward(self, x: Tensor) -> BackboneFeatures:
        """``Tensor[B, 3, H, W] -> BackboneFeatures(layer2, layer3, layer4)``."""
        layer2, layer3 = self.forward_mid(x)
        return BackboneFeatures(layer2, layer3, self.forward_high(layer3))

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, channels={self.channels}, strides={self.strides}, "
            f"freeze_bn={self.freeze_bn}, input_norm={self.input_norm!r}"
        )
