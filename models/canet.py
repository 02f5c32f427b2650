"""CANet (Zhang et al., CVPR 2019) and CANet + DCM (DPCN Table 6), docs/MODELS_HOSTS.md#canet.

Layout of the official ``one_shot_network.py`` (names kept; ``r = reduce_dim`` = 256,
``f`` = layer2 + layer3 channels = 1536 for ResNet-50)::

    q, s = backbone.forward_mid(img)                   layer2, layer3 (no layer4), frozen
    e = layer5(cat[layer2, layer3])                    3x3 dil-2 f->r + ReLU + Dropout2d(0.5), shared
    z = masked average pool of e_s (mask resized, Σ e·m / (Σ m + 5e-4)), tiled to the query size
    [+DCM: q_v, q_h, q_s = DCM(e_q; kernels from e_s and the mask)  (dcm.input="reduced"; "raw": of the
           backbone's feature); fusion "residual": e_q <- e_q + γ ⊙ ReLU(Conv1x1([e_q, q_v, q_h, q_s]))]
    x = layer55(cat[e_q, z (, q_v, q_h, q_s)])         3x3 dil-2 2r (+3r, fusion "paper") -> r + ReLU + Dropout2d(0.5)
    IOM (iterated):  h = history mask (2 ch, resized to the feature size; zeros by default)
        y = x + residule1(cat[x, h])                   ReLU, 3x3 (r+2)->r, ReLU, 3x3 r->r
        y = y + residule2(y);  y = y + residule3(y)    ReLU, 3x3, ReLU, 3x3 (r->r)
        ASPP: [tile(layer6_0(GAP(y))), layer6_1(y), layer6_2(y), layer6_3(y), layer6_4(y)]
              1x1 / 1x1 / 3x3 rate 6 / 12 / 18, each r + ReLU + Dropout2d(0.5)
        y = layer7(cat)                                1x1 5r->r + ReLU + Dropout2d(0.5)
        logits = layer9(y)                             1x1 r->2
        h = softmax(logits)                            (next iteration's history mask)

All convolutions have a bias (as the official code); new convolutions' weights ~ N(0, init_std),
biases keep PyTorch's default initialisation (the official code only re-initialises weights).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dcm.functional as DF
from dcm import DynamicConvModule

from .common import (
    DCMFusion,
    FewShotSegmenter,
    check_choice,
    check_episode,
    check_positive_int,
    drop_maps,
    gated_fusion,
    kernel_fit,
    resolve_backbone,
    segmentation_loss,
    upsample,
)
from .dcm_spec import DCMSpec, host_dcm

__all__ = ["CANet"]

#: CANet's masked-average-pooling epsilon on the mask area
MAP_EPS = 5e-4


def _conv_block(cin: int, cout: int, k: int = 1, dilation: int = 1, dropout: float = 0.5) -> nn.Sequential:
    """conv (bias) + ReLU + Dropout2d; ``k = 3`` uses "same" padding ``= dilation``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation),
        nn.ReLU(),
        nn.Dropout2d(p=dropout),
    )


def _residual_block(cin: int, r: int) -> nn.Sequential:
    """``residule*``: ReLU, 3x3 cin->r, ReLU, 3x3 r->r (all with bias)."""
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(cin, r, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(r, r, 3, padding=1),
    )


class CANet(FewShotSegmenter):
    r"""CANet with its Iterative Optimisation Module, optionally with DPCN's DCM (docs/MODELS_HOSTS.md#canet-dcm).

    Args:
        backbone: backbone name for :func:`models.backbones.build_backbone` or a built instance;
            only ``layer2`` and ``layer3`` are used (``forward_mid``). The official Caffe-style
            ResNet-50 (stride on the first 1x1 conv of a Bottleneck, ceil-mode max-pool) is replaced
            by the project's torchvision-layout ResNet (stride on the 3x3, output stride 8), as
            DENet does.
        backbone_weights: passed to ``build_backbone``.
        shot: the training shot count (recorded; ``forward`` accepts any ``K >= 1``).
        freeze_backbone_bn: keep the backbone's BatchNorm layers in eval mode (default).
        backbone_kwargs: extra keyword arguments of ``build_backbone`` (``layer4_trainable`` is
            refused: CANet has no layer4).
        reduce_dim: ``r`` (CANet: 256).
        dcm: the DCM (docs/MODELS_HOSTS.md#canet-dcm): ``None`` (default: CANet), a
            :class:`models.dcm_spec.DCMSpec`, a preset name (``"default"``: on the raw ``[layer2, layer3]``
            feature with the residual fusion, the form chosen on real images, docs/REAL_IMAGES.md;
            ``"paper"``: on the embeddings after ``layer5``, the maps concatenated to ``layer55``'s
            input) or a mapping (the ``default`` preset with the fields it sets). Kernels from the
            support feature and its masks (foreground vectors of all shots pooled together),
            depthwise dynamic convolutions of the query feature (``dcm.input``: ``"reduced"``, the
            embeddings after ``layer5``, ``r`` channels, or ``"raw"``, the feature before ``layer5``,
            ``fea_dim`` channels). ``dcm.fusion="paper"`` concatenates the maps to ``layer55``'s input,
            which widens from ``2r`` by ``n_variants`` times the DCM's channels (1280 for r = 256 and
            the reduced input); ``"residual"`` makes the query embedding
            ``q + γ ⊙ ReLU(Conv1x1([q, q_v, q_h, q_s]))`` with ``γ = 0`` at initialisation and
            ``layer55`` keeps its ``2r`` input, so that CANet+DCM equals CANet at initialisation
            (:class:`dcm.DCMFusion`). ``dcm.placement`` means nothing for CANet (an error). With
            ResNet-50 (``fea_dim`` = 1536) the raw input's kernel generators hold 42.5 M parameters
            (1.2 M for the reduced one at ``r`` = 256).
        iom_iterations: IOM passes per forward in training (official: 1, with the history mask
            given as input; DENet: 3, unrolled). Each pass after the first takes the softmax of the
            previous pass's logits (at feature resolution, not detached) as history mask.
        eval_iom_iterations: IOM passes in eval mode (``None``: same as ``iom_iterations``;
            the official evaluation repeats the whole pass up to 5 times).
        shot_fusion: K-shot rule. ``"prototype"`` (default): the K masked-average prototypes are
            averaged and one comparison is run (as PFENet); ``"logits"`` (DENet): one comparison
            and IOM per shot, the final logits averaged over shots. (The CANet paper's attention
            fusion is not in any released code and is not implemented.) With the DCM both use the
            same DCM maps computed from all shots.
        init_std: std of the normal initialisation of the new convolution weights (official 0.01).
        **legacy: the deprecated flat spelling of ``dcm`` (``use_dcm``, ``dcm_<field>``, ``dcm_kwargs``;
            :func:`models.dcm_spec.spec_from_flags`): warns, removed in the next release.

    Shape:
        ``forward(query_img[B,3,H,W], support_imgs[B,K,3,H,W], support_masks[B,K,H,W] (or [B,H,W]),
        query_mask[B,H,W] = None, history_mask[B,2,h,w] = None)`` returns a dict:

        - ``logits``: ``Tensor[B, 2, H, W]`` (input resolution),
        - ``history_mask``: ``Tensor[B, 2, h, w]`` softmax of the final logits at feature
          resolution, detached (feed it back for the official history-mask training trick or the
          official multi-pass evaluation),
        - with ``query_mask``: ``main_loss`` and ``loss`` (the same: CE on the final logits).

    Example:
        >>> m = CANet("resnet50", backbone_weights="random", reduce_dim=16, dcm="paper").eval()
        >>> q, s, sm = torch.randn(1, 3, 65, 65), torch.randn(1, 1, 3, 65, 65), torch.ones(1, 1, 65, 65)
        >>> out = m(q, s, sm)          # the DCM in the paper's form: its maps concatenated to the query
        >>> tuple(out["logits"].shape), tuple(out["history_mask"].shape)
        ((1, 2, 65, 65), (1, 2, 9, 9))
    """

    def __init__(
        self,
        backbone="resnet50",
        backbone_weights=None,
        shot: int = 1,
        *,
        freeze_backbone_bn: bool = True,
        backbone_kwargs: Optional[Dict] = None,
        reduce_dim: int = 256,
        dcm: Union[None, str, Mapping, DCMSpec] = None,
        iom_iterations: int = 1,
        eval_iom_iterations: Optional[int] = None,
        shot_fusion: str = "prototype",
        init_std: float = 0.01,
        **legacy,
    ):
        super().__init__()
        for name, v in (("shot", shot), ("reduce_dim", reduce_dim), ("iom_iterations", iom_iterations)):
            check_positive_int(name, v)
        check_positive_int("eval_iom_iterations", eval_iom_iterations, or_none=True)
        check_choice("shot_fusion", shot_fusion, ("prototype", "logits"))
        spec, _ = host_dcm("canet", dcm, None, legacy)
        self.dcm_spec = spec
        bkw = dict(backbone_kwargs or {})
        if bkw.pop("layer4_trainable", False):
            raise ValueError("layer4_trainable: CANet uses no layer4 (layer2 + layer3 only)")
        if isinstance(backbone, str):
            bkw.setdefault("freeze_bn", bool(freeze_backbone_bn))
        self.backbone = resolve_backbone(backbone, backbone_weights, False, **bkw)
        self.shot, self.use_dcm, self.reduce_dim = shot, spec is not None, reduce_dim
        self.iom_iterations = iom_iterations
        self.eval_iom_iterations = eval_iom_iterations
        self.shot_fusion = shot_fusion
        r = reduce_dim
        ch = self.backbone.channels
        self.fea_dim = ch["layer2"] + ch["layer3"]

        self.layer5 = _conv_block(self.fea_dim, r, k=3, dilation=2)
        fuse_in = 2 * r
        if self.use_dcm:
            c_dcm = r if spec.input == "reduced" else self.fea_dim
            self.dcm = DynamicConvModule(c_dcm, **spec.module_kwargs())
            if spec.host_fusion("canet") == "concat":
                fuse_in += self.dcm.out_channels
            else:
                self.dcm_fuse = DCMFusion(r, len(self.dcm.variants), "residual", map_channels=c_dcm)
            if spec.kernels == "identity":
                self.dcm.requires_grad_(False)
        self.layer55 = _conv_block(fuse_in, r, k=3, dilation=2)
        self.residule1 = _residual_block(r + 2, r)
        self.residule2 = _residual_block(r, r)
        self.residule3 = _residual_block(r, r)
        self.layer6_0 = _conv_block(r, r, k=1)
        self.layer6_1 = _conv_block(r, r, k=1)
        self.layer6_2 = _conv_block(r, r, k=3, dilation=6)
        self.layer6_3 = _conv_block(r, r, k=3, dilation=12)
        self.layer6_4 = _conv_block(r, r, k=3, dilation=18)
        self.layer7 = _conv_block(5 * r, r, k=1)
        self.layer9 = nn.Conv2d(r, 2, 1)

        # official init: every conv weight ~ N(0, 0.01) -- only CANet's own layers, not the backbone
        # and not the DCM's kernel generators (they keep the dcm library's initialisation)
        for name, m in self.named_modules():
            if name.startswith(("backbone", "dcm")):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, init_std)

    # ------------------------------------------------------------------ pieces
    def mid_feature(self, x: Tensor) -> Tensor:
        """``cat[layer2 resized to layer3's size, layer3]``: ``Tensor[N, 3, H, W] -> Tensor[N, fea_dim, h, w]``."""
        l2, l3 = self.backbone.forward_mid(x)
        return torch.cat([upsample(l2, l3.shape[-2:]), l3], 1)

    def embed(self, x: Tensor) -> Tensor:
        """``layer5(cat[layer2, layer3])``: ``Tensor[N, 3, H, W] -> Tensor[N, r, h, w]``."""
        return self.layer5(self.mid_feature(x))

    def iom(self, x: Tensor, history: Tensor) -> Tensor:
        """One IOM + ASPP + classifier pass: ``x[N, r, h, w], history[N, 2, h, w] -> logits[N, 2, h, w]``."""
        y = x + self.residule1(torch.cat([x, history], 1))
        y = y + self.residule2(y)
        y = y + self.residule3(y)
        g = self.layer6_0(F.adaptive_avg_pool2d(y, 1)).expand(-1, -1, *y.shape[-2:])
        y = torch.cat([g, self.layer6_1(y), self.layer6_2(y), self.layer6_3(y), self.layer6_4(y)], 1)
        return self.layer9(self.layer7(y))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        query_mask: Optional[Tensor] = None,
        history_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        support_masks = check_episode(query_img, support_imgs, support_masks, query_mask, shot=self.shot)
        B, K = support_imgs.shape[:2]
        H, W = query_img.shape[-2:]
        r = self.reduce_dim

        q_mid = self.mid_feature(query_img)
        q = self.layer5(q_mid)  # [B, r, h, w]
        h, w = q.shape[-2:]
        s_mid = self.mid_feature(support_imgs.flatten(0, 1))
        s_pre = self.layer5[:-1](s_mid)  # conv + ReLU, before layer5's Dropout2d
        hs, ws = s_pre.shape[-2:]
        s = self.layer5[-1](s_pre).reshape(B, K, r, hs, ws)
        protos = DF.masked_average_pool(s, support_masks, eps=MAP_EPS)  # [B, K, r]; mask (255 -> 0) resized

        if history_mask is None:
            history = q.new_zeros(B, 2, h, w)
        else:
            if not isinstance(history_mask, Tensor) or history_mask.dim() != 4 or tuple(history_mask.shape[:2]) != (B, 2):
                got = tuple(history_mask.shape) if isinstance(history_mask, Tensor) else type(history_mask).__name__
                raise ValueError(f"history_mask: expected shape (B={B}, 2, h, w), got {got}")
            history = upsample(history_mask.to(q.dtype), (h, w))

        extra = []
        spec = self.dcm_spec
        if self.use_dcm:
            if spec.input == "raw":
                dcm_q, dcm_s = q_mid, s_mid.reshape(B, K, -1, hs, ws)
            elif spec.support == "clean":
                dcm_q, dcm_s = q, s_pre.reshape(B, K, r, hs, ws)
            else:
                dcm_q, dcm_s = q, s
            if spec.kernels == "identity":
                extra = [dcm_q] * len(self.dcm.variants)
            else:
                extra = list(self.dcm(dcm_q, dcm_s, support_masks))
            extra = drop_maps(extra, spec.map_dropout, self.training)
            if spec.fusion == "residual":
                fit = kernel_fit(dcm_q, dcm_s, support_masks) if spec.gate == "fit" else None
                q, extra = gated_fusion(self.dcm_fuse, q, extra, fit), []

        if self.shot_fusion == "prototype" or K == 1:
            z = protos.mean(1)[:, :, None, None].expand(-1, -1, h, w)
            x = self.layer55(torch.cat([q, z, *extra], 1))
            n_rep = 1
        else:  # "logits": one comparison per shot, stacked along the batch (shot-major per sample)
            z = protos.reshape(B * K, r)[:, :, None, None].expand(-1, -1, h, w)
            rep = lambda t: t.repeat_interleave(K, 0)  # noqa: E731
            x = self.layer55(torch.cat([rep(q), z, *map(rep, extra)], 1))
            history = rep(history)
            n_rep = K

        iters = self.iom_iterations if self.training or self.eval_iom_iterations is None else self.eval_iom_iterations
        for _ in range(iters):
            logits_f = self.iom(x, history)
            history = torch.softmax(logits_f, 1)
        if n_rep > 1:
            logits_f = logits_f.reshape(B, n_rep, 2, h, w).mean(1)
        logits = upsample(logits_f, (H, W))
        out: Dict[str, Tensor] = {"logits": logits, "history_mask": torch.softmax(logits_f, 1).detach()}
        if query_mask is not None:
            out["main_loss"] = segmentation_loss(logits, query_mask)
            out["loss"] = out["main_loss"]
        return out

    def extra_repr(self) -> str:
        return (
            f"reduce_dim={self.reduce_dim}, shot={self.shot}, dcm={self.dcm_spec!r}, "
            f"iom_iterations={self.iom_iterations}, eval_iom_iterations={self.eval_iom_iterations}, "
            f"shot_fusion={self.shot_fusion!r}"
        )
