"""``build_model(name, ...)``: one way to build every network of the project by name.

=============  ======================================================  ==========================
name           class                                                   fixed flags
=============  ======================================================  ==========================
dpcn           :class:`models.dpcn.DPCN`                               --
baseline       :class:`models.dpcn.DPCN` (Tables 1-2 "Baseline")       use_sam/ffm/dcm = False
pfenet         ``models.pfenet.PFENet``                                use_dcm = False
pfenet+dcm     ``models.pfenet.PFENet``                                use_dcm = True
canet          ``models.canet.CANet``                                  use_dcm = False
canet+dcm      ``models.canet.CANet``                                  use_dcm = True
=============  ======================================================  ==========================

The network modules are imported lazily, so a missing or broken host network does not break the
others. Every network takes ``(query_img, support_imgs, support_masks, query_mask=None)`` and
returns a dict with ``logits`` and, given ``query_mask``, ``loss`` (see ``docs/CONTRACTS.md``).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, List, Tuple

from torch import nn

__all__ = ["build_model", "list_models", "MODELS", "LEGACY_DEFAULTS", "pinned_flags", "legacy_flags", "default_flags"]

#: name -> (module, class name, fixed keyword flags)
MODELS: Dict[str, Tuple[str, str, Dict[str, object]]] = {
    "dpcn": ("models.dpcn", "DPCN", {}),
    "baseline": ("models.dpcn", "DPCN", {"use_sam": False, "use_ffm": False, "use_dcm": False}),
    "pfenet": ("models.pfenet", "PFENet", {"use_dcm": False}),
    "pfenet+dcm": ("models.pfenet", "PFENet", {"use_dcm": True}),
    "canet": ("models.canet", "CANet", {"use_dcm": False}),
    "canet+dcm": ("models.canet", "CANet", {"use_dcm": True}),
}


#: Flags whose default changed, per model name: flag -> the value that a config *without* the flag
#: was trained with. ``benchmarks.config.load_config`` writes today's default of each such flag into
#: every resolved config (:func:`pinned_flags`), so a saved run states it; a saved config that does
#: not name it is read with the old value (:func:`legacy_flags`).
LEGACY_DEFAULTS: Dict[str, Dict[str, object]] = {
    "pfenet+dcm": {"dcm_fusion": "replace"},
    "canet+dcm": {"dcm_fusion": "concat", "dcm_input": "reduced"},
}


def pinned_flags(name: str) -> Dict[str, object]:
    """Today's defaults of the flags of :data:`LEGACY_DEFAULTS` for model ``name`` (``{}`` if none).

    Example:
        >>> pinned_flags("pfenet+dcm"), pinned_flags("canet+dcm"), pinned_flags("dpcn")
        ({'dcm_fusion': 'residual'}, {'dcm_fusion': 'residual', 'dcm_input': 'raw'}, {})
    """
    key = str(name).strip().lower()
    if key not in LEGACY_DEFAULTS:
        return {}
    defaults = default_flags(key)
    return {k: defaults[k] for k in LEGACY_DEFAULTS[key]}


def default_flags(name: str) -> Dict[str, object]:
    """Every keyword flag of model ``name`` with its default, the registry's fixed flags applied."""
    key = str(name).strip().lower()
    params = inspect.signature(_model_class(key).__init__).parameters
    out = {k: p.default for k, p in params.items()
           if p.default is not inspect.Parameter.empty and k not in ("backbone", "backbone_weights", "shot")}
    return {**out, **MODELS[key][2]}


def legacy_flags(name: str) -> Dict[str, object]:
    """The values that a saved config of model ``name`` which does not name these flags was trained with.

    Example:
        >>> legacy_flags("canet+dcm")
        {'dcm_fusion': 'concat', 'dcm_input': 'reduced'}
    """
    return dict(LEGACY_DEFAULTS.get(str(name).strip().lower(), {}))


def list_models() -> List[str]:
    """Names accepted by :func:`build_model`.

    Example:
        >>> list_models()
        ['baseline', 'canet', 'canet+dcm', 'dpcn', 'pfenet', 'pfenet+dcm']
    """
    return sorted(MODELS)


def _model_class(name: str) -> Callable[..., nn.Module]:
    module, cls, _ = MODELS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # the host network is not available (yet)
        raise ImportError(f"model {name!r} needs {module}.{cls}, which cannot be imported: {e}") from e
    return getattr(mod, cls)


def _accepted(cls) -> Tuple[set, bool]:
    """(keyword names accepted by ``cls.__init__``, whether it takes ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    names = {n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(name: str, backbone="resnet50", shot: int = 1, backbone_weights=None, **flags) -> nn.Module:
    """Build a few-shot segmentation network by name.

    Args:
        name: one of :func:`list_models` (case-insensitive).
        backbone: backbone name (``resnet50``, ``resnet101``, ``resnet50_v2``, ``resnet101_v2``,
            ``vgg16_bn``, ``efficientnet_lite0``) or a built backbone module.
        shot: nominal number of shots (the networks accept any ``K >= 1`` at run time).
        backbone_weights: ``None`` (random, with a warning), ``"random"`` (no warning), ``"imagenet"``
            (EfficientNet-Lite0 only) or a local state-dict path.
        **flags: model flags (e.g. DPCN's ``use_sam``, ``dcm_kernel_size``, ``layer4_trainable``; see
            ``models.dpcn.ABLATIONS`` for the paper's ablation rows).

    Returns:
        the network (an ``nn.Module`` in training mode).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), or a flag that the name
            already fixes with a different value (e.g. ``build_model("baseline", use_dcm=True)``).
        TypeError: a flag the network does not know (the message names it).

    Example:
        >>> m = build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", reduce_dim=16, decoder_dim=16)
        >>> type(m).__name__, m.use_sam, m.use_ffm, m.use_dcm
        ('DPCN', True, True, True)
    """
    if not isinstance(name, str) or name.strip().lower() not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    name = name.strip().lower()
    fixed = MODELS[name][2]
    for k, v in fixed.items():
        if k in flags and flags[k] != v:
            raise ValueError(
                f"model {name!r} fixes {k}={v!r}; got {k}={flags[k]!r} (build the general model and set the flag instead)"
            )
    cls = _model_class(name)
    accepted, var_kw = _accepted(cls)
    if not var_kw:
        unknown = sorted(k for k in flags if k not in accepted)
        if unknown:
            valid = sorted(accepted - {"backbone", "shot", "backbone_weights"})
            raise TypeError(
                f"build_model({name!r}): unknown flag{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)}; valid flags: {', '.join(valid)}"
            )
    kwargs = {**flags, **fixed}
    return cls(backbone=backbone, shot=shot, backbone_weights=backbone_weights, **kwargs)
