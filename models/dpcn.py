"""DPCN: Dynamic Prototype Convolution Network (Liu et al., CVPR 2022), and its Baseline / ablations.

Pipeline (paper §3, docs/MODELS_DPCN.md#architecture)::

    backbone (frozen; layer4 optionally trainable)
      mid-level  x = ReLU(conv1×1([layer3, layer2])) -> Dropout2d     separate reducers for query/support
      high-level layer4
    SAM   (layer4 of query & masked support)         -> M_act [B, nW, h, w], M⁰ = mean(M_act)
    FFM   (x_q, x_s, M_s, M⁰)                        -> prototype p, Mʳ, x̃_q = x_q ⊗ Mʳ + x_q
    DCM   (x̃_q, x_s, M_s)                            -> x̃_q^v, x̃_q^h, x̃_q^s
    x_out = [x̃_q^v, x̃_q^h, x̃_q^s, x_p, M_act¹..ⁿ, Mʳ]   (4C + 4 channels by default)
    decoder F_cls(F_ASPP(F_conv(x_out)))           -> logits [B, 2, h, w] -> bilinear to [B, 2, H, W]

Ablations (docs/CONVENTIONS.md#ablations; every row of the paper's Tables 3, 4, 5, A1 and the Baseline of Tables 1–2 is a
flag setting, see :data:`ABLATIONS`):

* ``use_sam=False``: ``M⁰`` is PFENet's prior, i.e. :class:`dcm.SupportActivation` with the single
  window ``(1, 1)`` (one activation map);
* ``use_ffm=False``: ``x̃_q = x_q`` and ``Mʳ = M⁰``; the prototype ``x_p`` is still the masked
  average of the support (:func:`dcm.functional.support_prototype`);
* ``dcm=None``: the three dynamically convolved maps are left out and the (filtered) query
  feature ``x̃_q`` takes their place in ``x_out`` (``off_feature="query"``; ``"none"`` leaves
  the query feature out entirely, the most literal reading of "removing DCM");
* all three off (``"baseline"``): ``x_out = [x_q, x_p]`` -- no prior, layer4 is never run
  (``use_prior=True`` adds PFENet's ``(1, 1)`` prior map and ``Mʳ = M⁰``: two extra channels).

Loss (paper §3.7): ``L = CE(M̂_q, M_q) + λ · CE(M̂_s, M_s)`` (2-class cross-entropy ignoring 255 on
logits at the input resolution). The support branch runs the same network with the roles swapped
(training mode only): the query image with its *predicted* mask (argmax or softmax probability,
detached) is the 1-shot support and each support image is a query, scored against its own mask.
For ``K > 1`` every shot is a query of its own (``K`` is folded into the batch, ``B·K`` swapped
episodes, the loss is the pixel average over all of them); ``support_branch_shots="first"`` uses only
the first shot. Backbone features are computed once and reused by the swapped pass (the frozen part
runs without a graph, so this is exactly a re-run of the network on the swapped inputs).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import dcm.functional as DF
from dcm import DynamicConvModule, FeatureFiltering, SupportActivation

from .common import (
    DCMFusion,
    FewShotSegmenter,
    check_choice,
    check_episode,
    check_positive_int,
    reduce_block,
    resolve_backbone,
    segmentation_loss,
    upsample,
)
from .dcm_spec import DCMSpec, host_dcm
from .heads import DPCNDecoder

__all__ = ["DPCN", "ABLATIONS", "PAPER_SAM_WINDOWS", "PRIOR_WINDOW", "dpcn_flags"]

#: SAM windows of the paper (PASCAL, and by default COCO too, docs/CONVENTIONS.md#sam-windows).
PAPER_SAM_WINDOWS: Tuple[Tuple[int, int], ...] = ((5, 1), (3, 3), (1, 5))
#: PFENet's element-wise prior = SAM with one (1, 1) window (paper's COCO setting; "SAM off").
PRIOR_WINDOW: Tuple[Tuple[int, int], ...] = ((1, 1),)

#: Named flag settings: the rows of the paper's ablation tables (ResNet-50, 1-shot, PASCAL-5i).
#: ``build_model("dpcn", **ABLATIONS[name])`` builds the row; ``"baseline"`` is also a model name.
ABLATIONS: Dict[str, Dict[str, object]] = {
    # Tables 1-2: Baseline = DPCN without SAM, FFM and DCM (decoder on [x_q, x_p])
    "baseline": {"use_sam": False, "use_ffm": False, "dcm": None},
    "dpcn": {},
    # Table 3: components
    "table3_sam_ffm": {"dcm": None},  # 64.5
    "table3_ffm_dcm": {"use_sam": False},  # 65.4
    "table3_sam_dcm": {"use_ffm": False},  # 64.7
    "table3_sam_ffm_dcm": {},  # 66.7
    # Table 4: DCM kernel size S
    "table4_k3": {"dcm": DCMSpec(kernel_size=3)},  # 65.9
    "table4_k5": {"dcm": DCMSpec(kernel_size=5)},  # 66.7
    "table4_k7": {"dcm": DCMSpec(kernel_size=7)},  # 66.1
    "table4_k9": {"dcm": DCMSpec(kernel_size=9)},  # 66.3
    # Table 5: kernel variants ("v" = S×1, "h" = 1×S, "s" = S×S)
    "table5_none": {"dcm": None},  # 64.5
    "table5_5x5": {"dcm": DCMSpec(variants=("s",))},  # 65.0
    "table5_1x5": {"dcm": DCMSpec(variants=("h",))},  # 65.2
    "table5_1x5_5x1": {"dcm": DCMSpec(variants=("v", "h"))},  # 64.7
    "table5_1x5_5x5_5x1": {"dcm": DCMSpec(variants=("v", "h", "s"))},  # 66.7
    # Table A1: square-kernel generation
    "tableA1_parallel": {"dcm": DCMSpec(square_source="parallel")},  # "5/25": 66.0
    "tableA1_serial": {"dcm": DCMSpec(square_source="serial")},  # "5→25": 66.7
    # COCO setting of the paper: SAM reduced to PFENet's prior (single (1, 1) window)
    "coco_prior": {"sam_windows": PRIOR_WINDOW},
}
# (layer4 fine-tuning on PASCAL is a training-schedule setting, not a row here: the trainer unfreezes
# layer4 on schedule; ``layer4_trainable=True`` unfreezes it from the start.)


def _as_windows(windows) -> Tuple[Tuple[int, int], ...]:
    try:
        out = tuple((int(w[0]), int(w[1])) for w in windows)
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"sam_windows: expected a sequence of (dh, dw) pairs, got {windows!r}") from None
    if not out or any(len(w) != 2 for w in windows):
        raise ValueError(f"sam_windows: expected a non-empty sequence of (dh, dw) pairs, got {windows!r}")
    return out


def _fg_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Validated support masks (values in [0, 1] or 255) -> float foreground in [0, 1], 255 -> 0.

    For label masks {0, 1, 255} this is PFENet's ``s_y == 1``; float masks in [0, 1] are taken
    as (soft) foreground probabilities.
    """
    m = mask.to(dtype)
    return torch.where(m == 255, torch.zeros((), dtype=dtype, device=m.device), m)


class DPCN(FewShotSegmenter):
    r"""Dynamic Prototype Convolution Network (paper §3) with every ablation as a flag.

    Args:
        backbone: a name for :func:`models.backbones.build_backbone` (``resnet50``, ``resnet101``,
            ``resnet50_v2``, ``resnet101_v2``, ``vgg16_bn``, ``efficientnet_lite0``) or a built
            backbone (``forward_mid``, ``forward_high``, ``channels``).
        backbone_weights: passed to ``build_backbone`` (``None`` warns that weights are random;
            ``"random"`` silences it; a path loads a state dict).
        shot: nominal number of shots ``K`` (informational; any ``K ≥ 1`` is accepted at run time).
            ``backbone``, ``backbone_weights``, ``shot`` are the positional arguments of every network
            in ``models`` (PFENet, CANet); the rest is keyword-only.
        layer4_trainable: unfreeze the backbone's layer4 (paper: PASCAL yes, COCO no).
        freeze_backbone_bn: keep backbone BN in eval mode (docs/CONVENTIONS.md#frozen-bn); ``False`` =
            PFENet's train-mode BN.
        reduce_dim: ``C`` of the mid-level features (256).
        shared_reducer: one 1×1 reducer for query and support instead of two (docs/CONVENTIONS.md#mid-level-features).
        reduce_dropout: Dropout2d after the reducers (0.5).
        use_sam, use_ffm: two of the three modules (see the module docstring for what "off" means;
            the third, the DCM, is ``dcm``).
        dcm: the DCM: a :class:`models.dcm_spec.DCMSpec`, a preset name (``"default"`` =
            ``"paper"`` = ``DCMSpec()``, the default: on the filtered reduced query feature ``x̃_q``,
            kernels from the reduced support feature ``x_s``, the maps ``q_v, q_h, q_s`` take the place of
            ``x̃_q`` in ``x_out``, Eq. 9), a mapping (the ``default`` preset with the fields it sets) or
            ``None`` (DPCN without DCM, see ``off_feature``). ``dcm.fusion="residual"``:
            ``x̃_q + γ ⊙ ReLU(Conv1x1([x̃_q, q_v, q_h, q_s]))`` with ``γ = 0`` at initialisation takes the
            place of ``x̃_q`` (:class:`dcm.DCMFusion`), so that DPCN equals DPCN without DCM at
            initialisation. ``dcm.input="raw"``: the DCM convolves the backbone's mid-level feature
            ``[layer3, layer2]`` of query and support before the reducers (``C3 + C2`` channels); its maps
            are projected into ``x̃_q``, so it needs ``fusion="residual"``. ``placement``, ``support``,
            ``kernels``, ``gate`` and ``map_dropout`` mean nothing for DPCN (an error).
        off_feature: with ``dcm=None``: ``"query"`` (``x̃_q`` takes the place of the DCM maps in
            ``x_out``; gives the Baseline ``[x_q, x_p]`` when everything is off) or ``"none"`` (the
            most literal reading of "removing DCM"); with a DCM it must stay ``"query"``.
        use_prior: ``None`` (auto: a prior/SAM is computed iff ``use_sam`` or ``use_ffm``);
            ``True`` forces it (with SAM off, PFENet's ``(1, 1)`` prior enters ``x_out``);
            ``False`` is only valid with SAM and FFM off.
        sam_windows: SAM windows (default ``((5, 1), (3, 3), (1, 5))``; ``((1, 1),)`` = the paper's
            COCO setting). Must be left unset (or ``((1, 1),)``) when ``use_sam=False``.
        sam_mask_before_layer4: PFENet style -- the support's layer3 is multiplied by the mask before
            layer4 (and the output is masked again inside SAM); default masks only after layer4
            (paper Eq. 1).
        sam_chunk_size: query rows per chunk in SAM (bounds memory; ``None`` = all at once).
        ffm_kernel_size: FFM refinement conv size (3; 1 is the alternative).
        decoder_dim: decoder width ``D`` (256).
        aspp_rates: ASPP dilation rates ``(6, 12, 18)``.
        decoder_dropout: Dropout2d after ``F_conv`` (0.5).
        cls_dropout: Dropout2d inside ``F_cls`` (0.1).
        support_branch_weight: ``λ`` of the q→s loss (1.0; 0 disables the branch).
        support_branch_mask: ``"argmax"`` (binary predicted query mask) or ``"soft"`` (foreground
            probability); detached either way.
        support_branch_shots: ``"all"`` (each support shot is a query; ``B·K`` swapped episodes)
            or ``"first"`` (only shot 0).
        **legacy: the deprecated flat spelling of ``dcm`` (``use_dcm``, ``dcm_<field>``,
            ``dcm_off_feature``; :func:`models.dcm_spec.spec_from_flags`): warns, removed in the next release.

    Forward:
        ``model(query_img, support_imgs, support_masks, query_mask=None)`` with

        - ``query_img``: ``Tensor[B, 3, H, W]`` (normalised as ``backbone.input_mean/std``),
        - ``support_imgs``: ``Tensor[B, K, 3, Hs, Ws]``,
        - ``support_masks``: ``Tensor[B, K, Hs, Ws]`` (or ``[B, Hs, Ws]`` for ``K = 1``), labels
          {0, 1, 255} (255 = ignore, background for the support) or float foreground
          probabilities in [0, 1],
        - ``query_mask``: ``Tensor[B, H, W]`` labels {0, 1, 255} (optional).

        Returns a dict:

        - ``logits``: ``Tensor[B, 2, H, W]`` (bilinear, ``align_corners=True``, to the input size);
        - ``activation_maps``: ``Tensor[B, nW, h, w]`` SAM maps (``nW = 1`` with SAM off), ``None``
          when no prior is computed (Baseline); ``h, w`` = mid-level feature size;
        - ``initial_pseudo_mask``: ``Tensor[B, 1, h, w]`` ``M⁰`` (or ``None``);
        - ``refined_pseudo_mask``: ``Tensor[B, 1, h, w]`` ``Mʳ`` (``= M⁰`` with FFM off, or ``None``);
        - with ``query_mask``: ``main_loss`` (s→q CE), ``loss`` (``main + λ·support`` in training
          mode, ``main`` in eval mode); in training mode with ``λ > 0`` also ``support_loss`` (q→s CE)
          and ``support_logits`` ``Tensor[B, K', 2, Hs, Ws]`` (``K' = K`` or 1).

    Example:
        >>> model = DPCN("resnet50", backbone_weights="random", reduce_dim=32, decoder_dim=32).eval()
        >>> out = model(torch.randn(1, 3, 65, 65), torch.randn(1, 2, 3, 65, 65), torch.ones(1, 2, 65, 65).long())
        >>> tuple(out["logits"].shape), tuple(out["activation_maps"].shape)
        ((1, 2, 65, 65), (1, 3, 9, 9))
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "resnet50",
        backbone_weights=None,
        shot: int = 1,
        *,
        layer4_trainable: bool = False,
        freeze_backbone_bn: bool = True,
        reduce_dim: int = 256,
        shared_reducer: bool = False,
        reduce_dropout: float = 0.5,
        use_sam: bool = True,
        use_ffm: bool = True,
        dcm: Union[None, str, Mapping, DCMSpec] = "default",
        off_feature: str = "query",
        use_prior: Optional[bool] = None,
        sam_windows: Optional[Sequence[Tuple[int, int]]] = None,
        sam_mask_before_layer4: bool = False,
        sam_chunk_size: Optional[int] = None,
        ffm_kernel_size: int = 3,
        decoder_dim: int = 256,
        aspp_rates: Sequence[int] = (6, 12, 18),
        decoder_dropout: float = 0.5,
        cls_dropout: float = 0.1,
        support_branch_weight: float = 1.0,
        support_branch_mask: str = "argmax",
        support_branch_shots: str = "all",
        **legacy,
    ):
        super().__init__()
        if isinstance(backbone_weights, int) and not isinstance(backbone_weights, bool):
            # DPCN(backbone, shot, backbone_weights): the positional order of the previous release
            warnings.warn("DPCN: the positional order is (backbone, backbone_weights, shot), as PFENet's and "
                          "CANet's; DPCN(backbone, shot, ...) is deprecated and will be removed in the next release: "
                          "pass shot=...", DeprecationWarning, stacklevel=2)
            backbone_weights, shot = (None if isinstance(shot, int) else shot), backbone_weights
        for name, v in (("shot", shot), ("reduce_dim", reduce_dim), ("decoder_dim", decoder_dim)):
            check_positive_int(name, v)
        check_choice("support_branch_mask", support_branch_mask, ("argmax", "soft"))
        check_choice("support_branch_shots", support_branch_shots, ("all", "first"))
        spec, legacy_kw = host_dcm("dpcn", dcm, "default", legacy)
        off_feature = legacy_kw.get("off_feature", off_feature)
        check_choice("off_feature", off_feature, ("query", "none"))
        if spec is not None and off_feature != "query":
            raise ValueError(f"DPCN: off_feature={off_feature!r} says what x_out holds without the DCM; with "
                             f"dcm={spec!r} leave it at 'query' (or pass dcm=None)")
        use_dcm = spec is not None
        if not float(support_branch_weight) >= 0:
            raise ValueError(f"support_branch_weight: expected a number >= 0, got {support_branch_weight!r}")
        if use_prior is None:
            use_prior = bool(use_sam or use_ffm)
        elif not use_prior and (use_sam or use_ffm):
            raise ValueError("use_prior=False needs use_sam=False and use_ffm=False (SAM and FFM consume the prior)")
        if use_sam:
            windows = PAPER_SAM_WINDOWS if sam_windows is None else _as_windows(sam_windows)
        else:
            if sam_windows is not None and _as_windows(sam_windows) != PRIOR_WINDOW:
                raise ValueError(
                    f"sam_windows={sam_windows!r} has no effect with use_sam=False (SAM off = PFENet's (1, 1) prior)"
                )
            windows = PRIOR_WINDOW
        if not use_dcm and not use_prior and off_feature == "none":
            raise ValueError("with SAM, FFM, DCM and the prior off and off_feature='none', x_out holds no query information")

        # ---------------------------------------------------------------- backbone
        bkw = {"freeze_bn": bool(freeze_backbone_bn)} if isinstance(backbone, str) else {}
        self.backbone = resolve_backbone(backbone, backbone_weights, layer4_trainable, **bkw)
        if layer4_trainable and not use_prior:
            warnings.warn(
                "layer4_trainable=True but this configuration computes no prior (SAM and FFM off): layer4 is "
                "never run, so it receives no gradient",
                UserWarning,
                stacklevel=2,
            )
        ch = self.backbone.channels
        mid_in = ch["layer2"] + ch["layer3"]

        self.shot = shot
        self.use_sam, self.use_ffm, self.use_dcm, self.use_prior = bool(use_sam), bool(use_ffm), bool(use_dcm), bool(use_prior)
        self.sam_mask_before_layer4 = bool(sam_mask_before_layer4)
        self.off_feature = off_feature
        self.dcm_spec = spec
        self.support_branch_weight = float(support_branch_weight)
        self.support_branch_mask = support_branch_mask
        self.support_branch_shots = support_branch_shots
        self.reduce_dim = C = reduce_dim

        # ---------------------------------------------------------------- mid-level reducers
        self.down_query = reduce_block(mid_in, C, reduce_dropout)
        self.down_supp = self.down_query if shared_reducer else reduce_block(mid_in, C, reduce_dropout)
        self.shared_reducer = bool(shared_reducer)

        # ---------------------------------------------------------------- modules
        self.sam = SupportActivation(windows=windows, chunk_size=sam_chunk_size) if self.use_prior else None
        self.ffm = FeatureFiltering(C, kernel_size=ffm_kernel_size) if self.use_ffm else None
        c_dcm = C if not use_dcm or spec.input == "reduced" else mid_in
        self.dcm = DynamicConvModule(c_dcm, **spec.module_kwargs()) if self.use_dcm else None
        if self.use_dcm and spec.fusion == "residual":
            self.dcm_fuse = DCMFusion(C, len(self.dcm.variants), "residual", map_channels=c_dcm)

        # ---------------------------------------------------------------- decoder
        if self.use_dcm:
            q_ch = self.dcm.out_channels if spec.fusion == "paper" else C
        else:
            q_ch = C if off_feature == "query" else 0
        map_ch = (len(windows) + 1) if self.use_prior else 0
        self.x_out_channels = q_ch + C + map_ch
        self.decoder = DPCNDecoder(
            self.x_out_channels, decoder_dim, aspp_rates, conv_dropout=decoder_dropout, cls_dropout=cls_dropout
        )

    # ------------------------------------------------------------------ features
    def _mid(self, img: Tensor) -> Tuple[Tensor, Tensor]:
        """Frozen mid-level features: ``(concat[layer3, layer2] Tensor[N, C3+C2, h, w], layer3)``."""
        l2, l3 = self.backbone.forward_mid(img)
        l2 = upsample(l2, l3.shape[-2:])  # VGG: layer2 is at 1/8, layer3 at 1/16 (docs/CONVENTIONS.md#backbones)
        return torch.cat([l3, l2], dim=1), l3

    def _support_high(self, s_l3: Tensor, s_fg: Tensor, s_l4: Optional[Tensor]) -> Tensor:
        """Support layer4 ``Tensor[N, C4, h, w]``: on the masked layer3 (PFENet style) or reused."""
        if self.sam_mask_before_layer4:
            m = upsample(s_fg.reshape(-1, 1, *s_fg.shape[-2:]).to(s_l3.dtype), s_l3.shape[-2:])
            return self.backbone.forward_high(s_l3 * m)
        return s_l4 if s_l4 is not None else self.backbone.forward_high(s_l3)

    def _head(
        self,
        q_mid: Tensor,
        q_l4: Optional[Tensor],
        s_mid: Tensor,
        s_l4: Optional[Tensor],
        s_fg: Tensor,
        out_size,
    ) -> Dict[str, Optional[Tensor]]:
        """Everything after the backbone.

        Args:
            q_mid: ``Tensor[B, C3+C2, h, w]``; q_l4: ``Tensor[B, C4, h4, w4]`` (or ``None`` without prior).
            s_mid: ``Tensor[B, K, C3+C2, hs, ws]``; s_l4: ``Tensor[B, K, C4, hs4, ws4]`` (or ``None``).
            s_fg: float support foreground ``Tensor[B, K, Hs, Ws]`` in [0, 1].
            out_size: ``(H, W)`` of the logits.
        """
        B, K = s_mid.shape[:2]
        x_q = self.down_query(q_mid)
        x_s = self.down_supp(s_mid.flatten(0, 1))
        x_s = x_s.reshape(B, K, *x_s.shape[1:])
        h, w = x_q.shape[-2:]

        maps = m0 = None
        if self.sam is not None:
            act = self.sam(q_l4, s_l4, s_fg)
            maps, m0 = upsample(act.maps, (h, w)), upsample(act.pseudo_mask, (h, w))

        if self.ffm is not None:
            ffm = self.ffm(x_q, x_s, s_fg, m0)
            proto, m_r, x_t = ffm.prototype, ffm.refined_mask, ffm.filtered
        else:
            proto, m_r, x_t = DF.support_prototype(x_s, s_fg), m0, x_q

        parts = []
        if self.dcm is not None:
            spec = self.dcm_spec
            dyn = self.dcm(x_t, x_s, s_fg) if spec.input == "reduced" else self.dcm(q_mid, s_mid, s_fg)
            parts.extend(dyn if spec.fusion == "paper" else [self.dcm_fuse(x_t, dyn)])
        elif self.off_feature == "query":
            parts.append(x_t)
        parts.append(proto[:, :, None, None].expand(-1, -1, h, w))
        if maps is not None:
            parts.extend([maps, m_r])
        logits = self.decoder(torch.cat(parts, dim=1), size=out_size)
        return {"logits": logits, "activation_maps": maps, "initial_pseudo_mask": m0, "refined_pseudo_mask": m_r}

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        query_mask: Optional[Tensor] = None,
    ) -> Dict[str, Optional[Tensor]]:
        """See the class docstring for shapes and the returned dict."""
        support_masks = check_episode(query_img, support_imgs, support_masks, query_mask, shot=self.shot)
        B, K = support_imgs.shape[:2]
        H, W = query_img.shape[-2:]
        Hs, Ws = support_imgs.shape[-2:]
        s_fg = _fg_float(support_masks, query_img.dtype)

        # backbone: mid-level once per image; layer4 only when a prior is needed
        q_mid, q_l3 = self._mid(query_img)
        s_mid, s_l3 = self._mid(support_imgs.flatten(0, 1))
        q_l4 = s_l4_plain = s_l4 = None
        if self.use_prior:
            q_l4 = self.backbone.forward_high(q_l3)
            if not self.sam_mask_before_layer4 or self._needs_support_branch(query_mask):
                s_l4_plain = self.backbone.forward_high(s_l3)  # unmasked: SAM input (paper) / swapped query
            s_l4 = self._support_high(s_l3, s_fg.flatten(0, 1), s_l4_plain)
            s_l4 = s_l4.reshape(B, K, *s_l4.shape[1:])
        out = self._head(q_mid, q_l4, s_mid.reshape(B, K, *s_mid.shape[1:]), s_l4, s_fg, (H, W))

        if query_mask is None:
            return out
        main = segmentation_loss(out["logits"], query_mask)
        out["main_loss"] = main
        out["loss"] = main
        if not self._needs_support_branch(query_mask):
            return out

        # support branch (q -> s): swapped roles, predicted query mask (detached) as the support mask
        with torch.no_grad():
            logits = out["logits"].detach()
            q_pred = logits.argmax(1).to(s_fg.dtype) if self.support_branch_mask == "argmax" else logits.softmax(1)[:, 1]
        n = K if self.support_branch_shots == "all" else 1
        sel = slice(0, n)
        new_q_mid = s_mid.reshape(B, K, *s_mid.shape[1:])[:, sel].flatten(0, 1)
        new_s_mid = q_mid.repeat_interleave(n, dim=0)[:, None]
        new_fg = q_pred.repeat_interleave(n, dim=0)[:, None]
        new_q_l4 = new_s_l4 = None
        if self.use_prior:
            new_q_l4 = s_l4_plain.reshape(B, K, *s_l4_plain.shape[1:])[:, sel].flatten(0, 1)
            q_l4_s = self._support_high(q_l3, q_pred, q_l4) if self.sam_mask_before_layer4 else q_l4
            new_s_l4 = q_l4_s.repeat_interleave(n, dim=0)[:, None]
        rev = self._head(new_q_mid, new_q_l4, new_s_mid, new_s_l4, new_fg, (Hs, Ws))
        target = support_masks[:, sel].flatten(0, 1)
        if target.is_floating_point():  # soft support masks: 255 stays ignore, foreground = value >= 0.5
            target = torch.where(target == 255, torch.full_like(target, 255), (target >= 0.5).to(target.dtype))
        sup = segmentation_loss(rev["logits"], target)
        out["support_loss"] = sup
        out["support_logits"] = rev["logits"].reshape(B, n, *rev["logits"].shape[1:])
        out["loss"] = main + self.support_branch_weight * sup
        return out

    def _needs_support_branch(self, query_mask: Optional[Tensor]) -> bool:
        return query_mask is not None and self.training and self.support_branch_weight > 0

    def extra_repr(self) -> str:
        return (
            f"shot={self.shot}, use_sam={self.use_sam}, use_ffm={self.use_ffm}, use_dcm={self.use_dcm}, "
            f"use_prior={self.use_prior}, x_out_channels={self.x_out_channels}, dcm={self.dcm_spec!r}, "
            f"support_branch_weight={self.support_branch_weight}, support_branch_mask={self.support_branch_mask!r}"
        )


def dpcn_flags() -> Dict[str, object]:
    """The keyword flags of :class:`DPCN` and their defaults (everything after ``backbone_weights``)."""
    params = inspect.signature(DPCN.__init__).parameters
    return {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
