"""Pieces shared by every few-shot network in models/: the base class, losses, small layers.

Every network takes ``(query_img[B,3,H,W], support_imgs[B,K,3,H,W], support_masks[B,K,H,W],
query_mask=None)`` and returns a dict with ``logits`` (``[B, 2, H, W]``, input resolution) and,
when ``query_mask`` is given, ``loss``. Masks follow the label convention {0, 1, 255}.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dcm import DCMFusion
from dcm import DCM_FUSIONS as _DCM_FUSIONS

__all__ = [
    "FewShotSegmenter",
    "segmentation_loss",
    "upsample",
    "foreground_mask",
    "reduce_block",
    "check_episode",
    "check_mask_labels",
    "resolve_backbone",
    "DCMFusion",
    "DCM_FUSIONS",
    "kernel_fit",
    "gated_fusion",
    "drop_maps",
]


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (the PFENet family's convention); no-op if equal."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def foreground_mask(mask: torch.Tensor, size=None) -> torch.Tensor:
    """Label mask {0,1,255} -> float foreground ``(mask == 1)``, optionally resized (PFENet ``s_y == 1``)."""
    m = (mask == 1).to(torch.float32)
    if size is not None:
        lead = m.shape[:-2]
        m = upsample(m.reshape(-1, 1, *m.shape[-2:]), size).reshape(*lead, *size)
    return m


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """2-class cross-entropy ignoring 255, on logits upsampled to the label size.

    A batch whose labels are all 255 gives a zero loss (connected to the graph), never NaN.
    """
    logits = upsample(logits, target.shape[-2:]).float()
    valid = (target != ignore_index).sum()
    loss = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    return loss / valid.clamp_min(1)


def reduce_block(in_channels: int, out_channels: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """1×1 conv (no bias) + ReLU + Dropout2d: PFENet's ``down_query`` / ``down_supp``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
    )


def check_episode(query_img, support_imgs, support_masks, query_mask=None, shot: Optional[int] = None):
    """Validate the common forward signature (shapes, and mask values with :func:`check_mask_labels`);
    returns ``support_masks`` as ``[B, K, H, W]``."""
    if not isinstance(query_img, torch.Tensor) or query_img.dim() != 4 or query_img.shape[1] != 3:
        got = tuple(query_img.shape) if isinstance(query_img, torch.Tensor) else type(query_img).__name__
        raise ValueError(f"query_img: expected shape (B, 3, H, W), got {got}")
    B, _, H, W = query_img.shape
    if not isinstance(support_imgs, torch.Tensor) or support_imgs.dim() != 5 or support_imgs.shape[0] != B or support_imgs.shape[2] != 3:
        got = tuple(support_imgs.shape) if isinstance(support_imgs, torch.Tensor) else type(support_imgs).__name__
        raise ValueError(f"support_imgs: expected shape (B={B}, K, 3, H, W), got {got}")
    K = support_imgs.shape[1]
    if shot is not None and K < 1:
        raise ValueError(f"support_imgs: expected at least one shot, got K={K}")
    if support_masks.dim() == 3 and K == 1:
        support_masks = support_masks[:, None]
    if support_masks.dim() != 4 or tuple(support_masks.shape) != (B, K, *support_imgs.shape[-2:]):
        raise ValueError(
            f"support_masks: expected shape (B={B}, K={K}, {support_imgs.shape[-2]}, {support_imgs.shape[-1]}), "
            f"got {tuple(support_masks.shape)}"
        )
    if query_mask is not None and tuple(query_mask.shape) != (B, H, W):
        raise ValueError(f"query_mask: expected shape (B={B}, {H}, {W}), got {tuple(query_mask.shape)}")
    check_mask_labels("support_masks", support_masks, soft=True)
    if query_mask is not None:
        check_mask_labels("query_mask", query_mask, soft=False)
    return support_masks


class FewShotSegmenter(nn.Module):
    """Base class: owns the backbone, gives optimiser groups, keeps the frozen parts frozen.

    Subclasses set ``self.backbone`` (a models.backbones backbone) and build their head; all
    parameters outside ``self.backbone`` are "head" parameters and train at the base lr; layer4
    (when made trainable, docs/CONVENTIONS.md#layer4-fine-tuning) trains at ``layer4_lr_scale × lr``.
    """

    backbone: nn.Module
    #: how the DCM (``self.dcm``) sits in the network (:class:`models.dcm_spec.DCMSpec`; ``None``: no DCM)
    dcm_spec = None

    def head_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]

    def backbone_trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def trainable_parameters(self) -> List[nn.Parameter]:
        return self.head_parameters() + self.backbone_trainable_parameters()

    def param_groups(self, lr: float, layer4_lr_scale: float = 1.0, include_layer4: bool = False) -> List[Dict]:
        """Optimiser groups: ``head`` at ``lr``; with ``include_layer4`` also ``layer4`` at
        ``lr * layer4_lr_scale`` (its parameters are listed even while frozen, so a schedule can
        unfreeze layer4 later without rebuilding the optimiser). With the spec's ``lr_scale != 1`` or a
        ``weight_decay``, the DCM's parameters form a ``dcm`` group at ``lr * lr_scale``."""
        head = self.head_parameters()
        groups = [{"params": head, "lr": lr, "name": "head"}]
        dcm_mod, spec = getattr(self, "dcm", None), self.dcm_spec
        if isinstance(dcm_mod, nn.Module) and spec is not None and (spec.lr_scale != 1.0 or spec.weight_decay is not None):
            ids = {id(p) for p in dcm_mod.parameters()}
            groups[0]["params"] = [p for p in head if id(p) not in ids]
            g = {"params": [p for p in head if id(p) in ids], "lr": lr * spec.lr_scale, "name": "dcm"}
            if spec.weight_decay is not None:
                g["weight_decay"] = float(spec.weight_decay)
            groups.append(g)
        if include_layer4:
            l4 = list(self.backbone.layer4_parameters())
            if l4:
                groups.append({"params": l4, "lr": lr * layer4_lr_scale, "name": "layer4"})
        return groups


def check_mask_labels(name: str, mask: torch.Tensor, soft: bool = True) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``mask`` holds label values.

    ``soft=True`` (support masks): values in ``[0, 1]`` or the ignore label 255.
    ``soft=False`` (query labels for the loss): exactly ``{0, 1, 255}``, any integer or float dtype.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name}: expected a real tensor, got dtype {mask.dtype}")
    if mask.numel() == 0 or mask.dtype == torch.bool:
        return
    if soft:
        bad = ((mask < 0) | (mask > 1)) & (mask != 255)
        expected = "values in [0, 1] or the ignore label 255"
    else:
        bad = (mask != 0) & (mask != 1) & (mask != 255)
        expected = "labels in {0, 1, 255}"
    if bool(bad.any()):
        vals = torch.unique(mask[bad])[:5].tolist()
        raise ValueError(f"{name}: expected {expected}, got e.g. {vals}")


def resolve_backbone(backbone, weights=None, layer4_trainable: bool = False, **kwargs) -> nn.Module:
    """A backbone by name (``models.backbones.build_backbone``) or an already built instance.

    An instance (anything with ``forward_mid``, ``forward_high`` and ``channels``) is used as is
    (``weights``/``kwargs`` must then be left empty; ``layer4_trainable=True`` unfreezes it).
    """
    if isinstance(backbone, str):
        from .backbones import build_backbone

        return build_backbone(backbone, weights=weights, layer4_trainable=layer4_trainable, **kwargs)
    if isinstance(backbone, nn.Module) and all(hasattr(backbone, a) for a in ("forward_mid", "forward_high", "channels")):
        if weights is not None or kwargs:
            raise ValueError("backbone: weights / backbone options apply only when the backbone is given by name")
        if layer4_trainable:
            backbone.set_layer4_trainable(True)
        return backbone
    raise TypeError(
        f"backbone: expected a backbone name (str) or a models.backbones.Backbone, got {type(backbone).__name__}"
    )


#: how a host network takes in the DCM maps (see :class:`dcm.DCMFusion`)
DCM_FUSIONS = _DCM_FUSIONS


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError("name: expected 'a', 'b' or 'c', got ...")`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        quoted = [repr(c) for c in choices]
        text = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ValueError(f"{name}: expected {text}, got {value!r}")


def check_positive_int(name: str, value, or_none: bool = False) -> None:
    """Raise ``ValueError("name: expected a positive int, got ...")`` unless ``value`` is an ``int`` >= 1 (not a
    ``bool``); with ``or_none``, ``None`` passes."""
    if or_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected {'None or ' if or_none else ''}a positive int, got {value!r}")


def kernel_fit(query: torch.Tensor, support: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
    """How well the support foreground the DCM's kernels come from matches each query position.

    ``max(0, cos(query[:, :, y, x], p))`` with ``p`` the support's foreground prototype (masked average
    pooling, mean over shots) of the same feature the kernels are generated from.

    Args:
        query: ``Tensor[B, C, h, w]``, the DCM's query input.
        support: ``Tensor[B, K, C, h', w']``, the DCM's support input.
        support_masks: ``Tensor[B, K, H, W]`` in ``{0, 1, 255}`` or ``[0, 1]`` (255 is background here).
    Returns:
        ``Tensor[B, 1, h, w]`` in ``[0, 1]``; 0 where the support has no foreground (zero prototype).

    Example:
        >>> q = torch.zeros(1, 2, 1, 2); q[0, 0, 0, 0] = 1.0; q[0, 1, 0, 1] = 1.0
        >>> s = torch.zeros(1, 1, 2, 2, 2); s[0, 0, 0] = 3.0
        >>> kernel_fit(q, s, torch.ones(1, 1, 2, 2)).flatten().tolist()
        [1.0, 0.0]
    """
    from dcm.functional import masked_average_pool

    proto = masked_average_pool(support, support_masks).mean(1)  # [B, C]
    cos = F.cosine_similarity(query, proto[:, :, None, None].to(query.dtype), dim=1, eps=1e-8)
    return cos.clamp_min(0.0)[:, None]


def gated_fusion(fuse: nn.Module, q: torch.Tensor, maps, fit: Optional[torch.Tensor]) -> torch.Tensor:
    """``fuse(q, maps)`` (a residual :class:`dcm.DCMFusion`: ``q + γ ⊙ y``), its residual scaled by ``fit``
    (``q + fit ⊙ γ ⊙ y``) when ``fit`` is given."""
    out = fuse(q, maps)
    return out if fit is None else q + fit * (out - q)


def drop_maps(maps, p: float, training: bool) -> list:
    """Channel dropout (``F.dropout2d``) on each DCM map while training; the maps unchanged otherwise."""
    if p <= 0.0 or not training:
        return list(maps)
    return [F.dropout2d(m, p, True) for m in maps]
