"""PFENet (Tian et al., TPAMI 2020) and PFENet + DCM (DPCN Table 6): docs/MODELS_HOSTS.md#pfenet and #pfenet-dcm.

Architecture (docs/MODELS_HOSTS.md#pfenet, ResNet numbers; ``r = reduce_dim`` = 256, ``f`` = mid-level channels)::

    query  --backbone (frozen)--> layer2, layer3, layer4
    support --backbone--> layer2, layer3;  layer4 = backbone.layer4(layer3 * mask)
    x_q = down_query(cat[layer3, layer2])          1x1 f->r (no bias) + ReLU + Dropout2d(0.5)
    x_s = down_supp(cat[layer3, layer2])           same, separate weights
    proto = Weighted_GAP(x_s, mask)                Σ x·m / (Σ m + 5e-4), averaged over shots
    prior = max_p cos(q4(r), s4(p)·m(p)), min-max per image, averaged over shots
    [+DCM: x_q <- fusion(x_q, [q_v, q_h, q_s])          (docs/MODELS_HOSTS.md#pfenet-dcm)]
    FEM over the pyramid bins (fine -> coarse):
        m_b = init_merge[b](cat[pool_b(x_q), proto, prior_b])        1x1 (2r+1)->r + ReLU
        m_b += alpha_conv[b-1](cat[m_b, resize_b(m_{b-1}^up)])       1x1 2r->r + ReLU (b > 0)
        m_b += beta_conv[b](m_b)                                      2x (3x3 r->r + ReLU)
        aux_b = inner_cls[b](m_b)                                     3x3 + ReLU + Drop(0.1) + 1x1 r->2
        m_b^up = resize to the feature size
    y = res1(cat[m_b^up]);  y += res2(y);  logits = cls(y)           1x1 nr->r+ReLU; 2x(3x3+ReLU); as inner_cls

Every interpolation is bilinear with ``align_corners=True``; head convs have no bias except
the final 1x1 classifiers; the head has no BatchNorm.
"""
from __future__ import annotations

import numbers
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import dcm.functional as DF
from dcm import DynamicConvModule, SupportActivation

from .common import (
    DCMFusion,
    FewShotSegmenter,
    check_episode,
    check_positive_int,
    drop_maps,
    gated_fusion,
    kernel_fit,
    reduce_block,
    resolve_backbone,
    segmentation_loss,
    upsample,
)
from .dcm_spec import DCMSpec, host_dcm

__all__ = ["PFENet", "resolve_bins"]

#: PFENet's Weighted_GAP epsilon on the mask area
WEIGHTED_GAP_EPS = 5e-4


def resolve_bins(scales: Sequence[float], size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """Pyramid bin sizes for a feature map of ``size = (H, W)``, PFENet's rule.

    A scale ``<= 1`` is a fraction of the feature size (COCO configs ``[1.0, 0.5, 0.25, 0.125]``:
    ``int(H * s) x int(W * s)``, at least 1); a scale ``> 1`` is an absolute ``s x s`` bin
    (PASCAL ``[60, 30, 15, 8]``). As in PFENet, the integer ``1`` therefore means the *whole*
    feature size, not a 1x1 bin. Bins larger than the feature map are legal: adaptive average
    pooling then replicates feature cells (each output cell averages >= 1 input cell).

    Example:
        >>> resolve_bins([60, 30, 15, 8], (9, 9))
        [(60, 60), (30, 30), (15, 15), (8, 8)]
        >>> resolve_bins([1.0, 0.5, 0.25, 0.125], (81, 81))
        [(81, 81), (40, 40), (20, 20), (10, 10)]
    """
    H, W = int(size[0]), int(size[1])
    out = []
    for s in scales:
        if s <= 1:
            out.append((max(1, int(H * s)), max(1, int(W * s))))
        else:
            out.append((int(s), int(s)))
    return out


def _check_scales(scales) -> Tuple[float, ...]:
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"ppm_scales: expected a non-empty sequence of bin sizes, got {scales!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0:
            raise ValueError(f"ppm_scales: every entry must be a positive number, got {scales!r}")
        if s > 1 and float(s) != int(s):
            raise ValueError(f"ppm_scales: absolute bins (> 1) must be integers, got {s!r} in {scales!r}")
    return tuple(scales)


def _classifier(r: int, classes: int = 2) -> nn.Sequential:
    """PFENet ``cls`` / ``inner_cls``: 3x3 (no bias) + ReLU + Dropout2d(0.1) + 1x1 (bias) -> classes."""
    return nn.Sequential(
        nn.Conv2d(r, r, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=0.1),
        nn.Conv2d(r, classes, 1),
    )


def _double_conv(r: int) -> nn.Sequential:
    """PFENet ``beta_conv`` / ``res2``: two (3x3 conv, no bias) + ReLU."""
    return nn.Sequential(
        nn.Conv2d(r, r, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(r, r, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
    )


class PFENet(FewShotSegmenter):
    r"""PFENet, optionally with DPCN's Dynamic Convolution Module on the reduced query feature.

    Args:
        backbone: backbone name for :func:`models.backbones.build_backbone` (``resnet50``,
            ``resnet101``, ``resnet50_v2`` (PFENet's own deep-stem ResNet), ``resnet101_v2``,
            ``vgg16_bn``, ``efficientnet_lite0``) or an already built backbone instance.
        backbone_weights: passed to ``build_backbone`` (``None`` warns that the backbone is random,
            ``"random"`` does not, or a local state-dict path).
        shot: the number of shots the model is trained with (recorded; ``forward`` accepts any
            ``K >= 1``: PFENet's 5-shot results use the 1-shot model with 5 shots).
        layer4_trainable: unfreeze the backbone's ``layer4`` (PFENet keeps it frozen; then the
            prior becomes differentiable w.r.t. ``layer4``).
        freeze_backbone_bn: keep the backbone's BatchNorm layers in eval mode (default; ``False``
            reproduces PFENet's released code, which trains with batch statistics).
        backbone_kwargs: extra keyword arguments of ``build_backbone`` (e.g. ``input_norm``).
        reduce_dim: ``r`` (PFENet: 256).
        dcm: the DCM (docs/MODELS_HOSTS.md#pfenet-dcm): ``None`` (default: PFENet), a
            :class:`models.dcm_spec.DCMSpec`, a preset name (``"default"``: on the reduced query feature
            with the residual fusion, the form chosen on real images, docs/REAL_IMAGES.md; ``"paper"``:
            the fused feature replaces the query feature) or a mapping (the ``default`` preset with the
            fields it sets). Kernels from the support feature and its mask (all shots' foreground
            vectors pooled together), depthwise dynamic convolutions of the query feature
            (``dcm.input``: the reduced query feature ``q``, ``r`` channels, or the raw ``[layer3,
            layer2]``, ``fea_dim`` channels), then the maps are merged by ``dcm.fusion`` where
            ``dcm.placement`` says: ``"fem_input"`` (into ``q`` before the FEM: ``"paper"`` gives
            ``q' = ReLU(Conv1x1([q, q_v, q_h, q_s]))``, ``"residual"`` gives ``q' = q + γ ⊙ ReLU(Conv1x1(...))``
            with ``γ = 0`` at initialisation, :class:`dcm.DCMFusion`), ``"pyramid"`` (the maps pooled to
            each bin and merged into that level's pooled query feature, one fusion per level,
            ``dcm_fuse[i]``) or ``"decoder"`` (into the FEM's output feature). Every field of the spec
            applies to PFENet. The DCM's size grows with the square of its channels: with ResNet-50
            (``fea_dim`` = 1536) the raw input's kernel generators hold 42.5 M parameters against
            1.2 M for the reduced one at ``r`` = 256.
        ppm_scales: pyramid bins, see :func:`resolve_bins` (PASCAL ``[60, 30, 15, 8]``, the
            default, made for 473 inputs; COCO ``[1.0, 0.5, 0.25, 0.125]``).
        aux_weight: weight of the auxiliary (``inner_cls``) loss, mean over bins (PFENet: 1.0).
        prior_eps: epsilon of the prior's cosine and min-max normalisation (PFENet: 1e-7).
        **legacy: the deprecated flat spelling of ``dcm`` (``use_dcm``, ``dcm_<field>``, ``dcm_kwargs``;
            :func:`models.dcm_spec.spec_from_flags`): warns, removed in the next release.

    Shape:
        ``forward(query_img[B,3,H,W], support_imgs[B,K,3,H,W], support_masks[B,K,H,W] (or [B,H,W]
        for K = 1), query_mask[B,H,W] = None)`` returns a dict:

        - ``logits``: ``Tensor[B, 2, H, W]`` at the input resolution,
        - ``aux_logits``: list of ``Tensor[B, 2, b, b]``, one per bin (feature resolution),
        - ``prior_mask``: ``Tensor[B, 1, h, w]`` at the reduced-feature resolution, in ``[0, 1]``,
        - with ``query_mask``: ``main_loss``, ``aux_loss`` (mean over bins) and ``loss``
          (training: ``main + aux_weight · aux``; eval: ``main``).

    Masks are labels ``{0, 1, 255}`` (or soft values in ``[0, 1]``); 255 is background for the
    prototype, the prior and the DCM, and ignored by the loss.

    Example:
        >>> m = PFENet("resnet50", backbone_weights="random", shot=2, reduce_dim=16, ppm_scales=[1.0, 0.5],
        ...            dcm="default").eval()      # 2-shot, the residual DCM on the reduced feature
        >>> q, s, sm = torch.randn(1, 3, 65, 65), torch.randn(1, 2, 3, 65, 65), torch.ones(1, 2, 65, 65)
        >>> out = m(q, s, sm)
        >>> sorted(out), tuple(out["logits"].shape)
        (['aux_logits', 'logits', 'prior_mask'], (1, 2, 65, 65))
    """

    def __init__(
        self,
        backbone="resnet50",
        backbone_weights=None,
        shot: int = 1,
        *,
        layer4_trainable: bool = False,
        freeze_backbone_bn: bool = True,
        backbone_kwargs: Optional[Dict] = None,
        reduce_dim: int = 256,
        dcm: Union[None, str, Mapping, DCMSpec] = None,
        ppm_scales: Sequence[float] = (60, 30, 15, 8),
        aux_weight: float = 1.0,
        prior_eps: float = 1e-7,
        **legacy,
    ):
        super().__init__()
        for name, v in (("shot", shot), ("reduce_dim", reduce_dim)):
            check_positive_int(name, v)
        spec, _ = host_dcm("pfenet", dcm, None, legacy)
        self.dcm_spec = spec
        bkw = dict(backbone_kwargs or {})
        if isinstance(backbone, str):
            bkw.setdefault("freeze_bn", bool(freeze_backbone_bn))
        self.backbone = resolve_backbone(backbone, backbone_weights, layer4_trainable, **bkw)
        self.shot, self.use_dcm, self.reduce_dim = shot, spec is not None, reduce_dim
        self.ppm_scales = _check_scales(ppm_scales)
        self.aux_weight = float(aux_weight)
        r = reduce_dim
        ch = self.backbone.channels
        fea_dim = ch["layer3"] + ch["layer2"]
        self.fea_dim = fea_dim

        # support activation with one (1, 1) window is exactly PFENet's prior (see prior_mask())
        self.prior = SupportActivation(windows=((1, 1),), eps=prior_eps)

        self.down_query = reduce_block(fea_dim, r, dropout=0.5)
        self.down_supp = reduce_block(fea_dim, r, dropout=0.5)
        if self.use_dcm:
            c_dcm = r if spec.input == "reduced" else fea_dim
            self.dcm = DynamicConvModule(c_dcm, **spec.module_kwargs())
            fusion = spec.host_fusion("pfenet")
            if spec.placement == "pyramid":  # one fusion per pyramid level
                self.dcm_fuse = nn.ModuleList(DCMFusion(r, len(self.dcm.variants), fusion, map_channels=c_dcm)
                                              for _ in self.ppm_scales)
            else:
                self.dcm_fuse = DCMFusion(r, len(self.dcm.variants), fusion, map_channels=c_dcm)
            if spec.kernels == "identity":
                self.dcm.requires_grad_(False)
        n = len(self.ppm_scales)
        self.init_merge = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * r + 1, r, 1, bias=False), nn.ReLU(inplace=True)) for _ in range(n)
        )
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * r, r, 1, bias=False), nn.ReLU()) for _ in range(n - 1)
        )
        self.beta_conv = nn.ModuleList(_double_conv(r) for _ in range(n))
        self.inner_cls = nn.ModuleList(_classifier(r) for _ in range(n))
        self.res1 = nn.Sequential(nn.Conv2d(n * r, r, 1, bias=False), nn.ReLU(inplace=True))
        self.res2 = _double_conv(r)
        self.cls = _classifier(r)

    # ------------------------------------------------------------------ pieces
    def _mid_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(layer2 resized to layer3's size, layer3)``."""
        l2, l3 = self.backbone.forward_mid(x)
        return upsample(l2, l3.shape[-2:]), l3

    def prior_mask(self, query_l4: Tensor, support_l4: Tensor, support_masks: Tensor) -> Tensor:
        """PFENet's training-free prior (docs/MODELS_HOSTS.md#pfenet-prior): ``Tensor[B, 1, Hq, Wq]`` in ``[0, 1]``.

        ``support_l4``: ``Tensor[B, K, C4, Hs, Ws]`` computed on the masked ``layer3``; it is masked
        again (mask resized to ``(Hs, Ws)``). Per shot: ``max_p cos(q(r), s(p))``, min-max
        normalised per image; shots averaged.

        Differences from PFENet's code (both below 1e-6 for non-degenerate features):
        cosine is ``<s, q> / (max(|s|, eps) · max(|q|, eps))`` instead of
        ``<s, q> / (|s|·|q| + eps)``; and a shot whose resized mask is empty is left out of the
        shot average (PFENet averages its all-zero prior in), a sample with no foreground in any
        shot uses the whole support image (docs/CONVENTIONS.md#empty-foreground; :class:`dcm.EmptyForegroundWarning`).
        """
        return self.prior(query_l4, support_l4, support_masks).pseudo_mask

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        query_mask: Optional[Tensor] = None,
    ) -> Dict[str, object]:
        support_masks = check_episode(query_img, support_imgs, support_masks, query_mask, shot=self.shot)
        B, K = support_imgs.shape[:2]
        H, W = query_img.shape[-2:]
        r = self.reduce_dim

        # ---- query
        q2, q3 = self._mid_features(query_img)
        q4 = self.backbone.forward_high(q3)
        query_feat = self.down_query(torch.cat([q3, q2], 1))
        fh, fw = query_feat.shape[-2:]

        # ---- support (all shots in one batch)
        s2, s3 = self._mid_features(support_imgs.flatten(0, 1))
        h3, w3 = s3.shape[-2:]
        m3 = DF.prepare_mask(support_masks, (h3, w3), dtype=s3.dtype)  # [B, K, h3, w3], (mask==1) resized
        s4 = self.backbone.forward_high(s3 * m3.reshape(B * K, 1, h3, w3))
        supp_pre = self.down_supp[:-1](torch.cat([s3, s2], 1))  # 1x1 conv + ReLU
        supp_feat = self.down_supp[-1](supp_pre).reshape(B, K, r, h3, w3)  # + Dropout2d
        proto = DF.masked_average_pool(supp_feat, m3, eps=WEIGHTED_GAP_EPS).mean(1)  # [B, r]

        # ---- prior (masked again inside, at layer4's size)
        prior = self.prior_mask(q4, s4.reshape(B, K, *s4.shape[1:]), support_masks)
        prior = upsample(upsample(prior, q3.shape[-2:]), (fh, fw))

        # ---- DCM (option A): enhance the reduced query feature
        spec = self.dcm_spec
        if self.use_dcm:
            if spec.input == "raw":
                dcm_q, dcm_supp = torch.cat([q3, q2], 1), torch.cat([s3, s2], 1).reshape(B, K, -1, h3, w3)
            else:
                dcm_q = query_feat
                dcm_supp = supp_feat if spec.support == "dropout" else supp_pre.reshape(B, K, r, h3, w3)
            if spec.kernels == "identity":
                enhanced = [dcm_q] * len(self.dcm.variants)
            else:
                enhanced = self.dcm(dcm_q, dcm_supp, support_masks)
            enhanced = drop_maps(enhanced, spec.map_dropout, self.training)
            if spec.placement == "fem_input":
                fit = kernel_fit(dcm_q, dcm_supp, support_masks) if spec.gate == "fit" else None
                query_feat = gated_fusion(self.dcm_fuse, query_feat, enhanced, fit)

        # ---- FEM
        bins = resolve_bins(self.ppm_scales, (fh, fw))
        pyramid: List[Tensor] = []
        aux_logits: List[Tensor] = []
        for idx, b in enumerate(bins):
            q_bin = nn.functional.adaptive_avg_pool2d(query_feat, b)
            if self.use_dcm and spec.placement == "pyramid":
                q_bin = self.dcm_fuse[idx](q_bin, [nn.functional.adaptive_avg_pool2d(m, b) for m in enhanced])
            s_bin = proto[:, :, None, None].expand(-1, -1, *b)
            p_bin = upsample(prior, b)
            merge = self.init_merge[idx](torch.cat([q_bin, s_bin, p_bin], 1))
            if idx >= 1:
                prev = upsample(pyramid[idx - 1], b)
                merge = self.alpha_conv[idx - 1](torch.cat([merge, prev], 1)) + merge
            merge = self.beta_conv[idx](merge) + merge
            aux_logits.append(self.inner_cls[idx](merge))
            pyramid.append(upsample(merge, (fh, fw)))
        feat = self.res1(torch.cat(pyramid, 1))
        feat = self.res2(feat) + feat
        if self.use_dcm and spec.placement == "decoder":
            feat = self.dcm_fuse(feat, enhanced)  # the DCM maps of the reduced query feature, into the classifier input
        logits = upsample(self.cls(feat), (H, W))

        out: Dict[str, object] = {"logits": logits, "aux_logits": aux_logits, "prior_mask": prior}
        if query_mask is not None:
            main_loss = segmentation_loss(logits, query_mask)
            aux_loss = torch.stack([segmentation_loss(upsample(a, (H, W)), query_mask) for a in aux_logits]).mean()
            out["main_loss"], out["aux_loss"] = main_loss, aux_loss
            out["loss"] = main_loss + self.aux_weight * aux_loss if self.training else main_loss
        return out

    def extra_repr(self) -> str:
        return (
            f"reduce_dim={self.reduce_dim}, ppm_scales={list(self.ppm_scales)}, shot={self.shot}, "
            f"dcm={self.dcm_spec!r}, aux_weight={self.aux_weight}"
        )
