"""``build_model(name, ...)``: one way to build every network of the project by name.

=============  ======================================================  ====================================
name           class                                                   fixed flags / DCM
=============  ======================================================  ====================================
dpcn           :class:`models.dpcn.DPCN`                               ``dcm`` default: ``"default"``
baseline       :class:`models.dpcn.DPCN` (Tables 1-2 "Baseline")       use_sam = use_ffm = False, dcm = None
pfenet         ``models.pfenet.PFENet``                                dcm = None
pfenet+dcm     ``models.pfenet.PFENet``                                ``dcm`` default: ``"default"``
canet          ``models.canet.CANet``                                  dcm = None
canet+dcm      ``models.canet.CANet``                                  ``dcm`` default: ``"default"``
=============  ======================================================  ====================================

``dcm`` is a :class:`models.dcm_spec.DCMSpec`, a preset name, a mapping or ``None`` (``models.dcm_spec``).
The deprecated flat flags (``use_dcm``, ``dcm_kernel_size``, ..., ``dcm_kwargs``) are read by
:func:`resolve_dcm` (one shim, :func:`models.dcm_spec.spec_from_flags`) with a ``DeprecationWarning``.

The network modules are imported lazily, so a missing or broken host network does not break the
others. Every network takes ``(query_img, support_imgs, support_masks, query_mask=None)`` and
returns a dict with ``logits`` and, given ``query_mask``, ``loss`` (see ``docs/CONTRACTS.md``).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from .dcm_spec import DCMSpec, as_spec, legacy_flag_names, spec_from_flags

__all__ = ["build_model", "list_models", "MODELS", "default_flags", "host_of", "has_dcm", "resolve_dcm"]

#: name -> (module, class name, fixed keyword flags)
MODELS: Dict[str, Tuple[str, str, Dict[str, object]]] = {
    "dpcn": ("models.dpcn", "DPCN", {}),
    "baseline": ("models.dpcn", "DPCN", {"use_sam": False, "use_ffm": False, "dcm": None}),
    "pfenet": ("models.pfenet", "PFENet", {"dcm": None}),
    "pfenet+dcm": ("models.pfenet", "PFENet", {}),
    "canet": ("models.canet", "CANet", {"dcm": None}),
    "canet+dcm": ("models.canet", "CANet", {}),
}

_UNSET = object()


def _key(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return name.strip().lower()


def _instead(key: str) -> str:
    """The model with the other answer to "has it a DCM?" (for error messages)."""
    host = host_of(key)
    return {"baseline": "dpcn", "dpcn": "baseline", host: f"{host}+dcm"}.get(key, host)


def host_of(name: str) -> str:
    """The host network of model ``name``: ``"dpcn"``, ``"pfenet"`` or ``"canet"``.

    Example:
        >>> host_of("baseline"), host_of("canet+dcm")
        ('dpcn', 'canet')
    """
    return MODELS[_key(name)][0].rsplit(".", 1)[1]


def has_dcm(name: str) -> Optional[bool]:
    """``True`` if model ``name`` always has a DCM, ``False`` if never, ``None`` if ``dcm`` decides (``dpcn``)."""
    key = _key(name)
    return False if "dcm" in MODELS[key][2] else (True if key.endswith("+dcm") else None)


def resolve_dcm(name: str, dcm=_UNSET, legacy: Optional[Dict[str, object]] = None, *, warn: bool = True,
                stacklevel: int = 3) -> Tuple[Optional[DCMSpec], Dict[str, object]]:
    """The DCM of model ``name``: ``(validated spec or None, host keyword arguments)``.

    ``dcm``: as a host takes it (left out: the model's default); ``legacy``: the deprecated flat flags,
    which change that spec (read by :func:`models.dcm_spec.spec_from_flags`, a ``DeprecationWarning``
    unless ``warn=False``). A model without a DCM (``baseline``, ``pfenet``, ``canet``) takes no DCM, a
    ``+dcm`` model no ``None``: both are errors naming the model.

    Example:
        >>> resolve_dcm("canet+dcm", {"gate": "fit"})
        (DCMSpec(input='raw', fusion='residual', gate='fit'), {})
        >>> resolve_dcm("pfenet+dcm", legacy={"dcm_fusion": "replace"}, warn=False)
        (DCMSpec(), {})
    """
    key, host, always = _key(name), host_of(name), has_dcm(name)
    if dcm is _UNSET:
        dcm = None if always is False else "default"
    spec, extra = as_spec(dcm, host), {}
    if legacy:
        if always is not None and "use_dcm" in legacy and bool(legacy["use_dcm"]) != always:
            raise ValueError(f"model {key!r} fixes use_dcm={always!r}; got use_dcm={legacy['use_dcm']!r} (build "
                             f"{_instead(key)!r} instead)")
        spec, extra = spec_from_flags(host, legacy, on=spec is not None, base=spec, warn=warn, stacklevel=stacklevel)
    if always is False and spec is not None:
        raise ValueError(f"model {key!r} has no DCM (it fixes dcm=None); got dcm={spec!r} (build "
                         f"{_instead(key)!r} instead)")
    if always and spec is None:
        raise ValueError(f"model {key!r} has a DCM; got dcm=None (build {_instead(key)!r} instead)")
    return spec, extra


def default_flags(name: str) -> Dict[str, object]:
    """Every keyword flag of model ``name`` with its default, the registry's fixed flags applied (the DCM,
    ``dcm``, is :func:`resolve_dcm`'s)."""
    key = _key(name)
    params = inspect.signature(_model_class(key).__init__).parameters
    out = {k: p.default for k, p in params.items()
           if p.default is not inspect.Parameter.empty and k not in ("backbone", "backbone_weights", "shot", "dcm")}
    return {**out, **{k: v for k, v in MODELS[key][2].items() if k != "dcm"}}


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


def _accepted(cls) -> set:
    """The keyword names ``cls.__init__`` declares (its ``**legacy`` catch aside)."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_model(name: str, backbone="resnet50", shot: int = 1, backbone_weights=None, dcm=_UNSET, **flags) -> nn.Module:
    """Build a few-shot segmentation network by name.

    Args:
        name: one of :func:`list_models` (case-insensitive).
        backbone: backbone name (``resnet50``, ``resnet101``, ``resnet50_v2``, ``resnet101_v2``,
            ``vgg16_bn``, ``efficientnet_lite0``) or a built backbone module.
        shot: nominal number of shots (the networks accept any ``K >= 1`` at run time).
        backbone_weights: ``None`` (random, with a warning), ``"random"`` (no warning), ``"imagenet"``
            (EfficientNet-Lite0 only) or a local state-dict path.
        dcm: the DCM (:func:`resolve_dcm`): left out, the model's default (``"default"`` for ``dpcn``,
            ``pfenet+dcm``, ``canet+dcm``; none for the others).
        **flags: model flags (e.g. DPCN's ``use_sam``, ``layer4_trainable``; see ``models.dpcn.ABLATIONS``
            for the paper's ablation rows). The deprecated flat DCM flags (``use_dcm``, ``dcm_*``) still
            work with a ``DeprecationWarning``.

    Returns:
        the network (an ``nn.Module`` in training mode).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), a flag that the name
            already fixes with a different value (e.g. ``build_model("baseline", use_sam=True)``), a DCM
            on a model without one (``build_model("pfenet", dcm="default")``).
        TypeError: a flag the network does not know (the message names it).

    Example:
        >>> m = build_model("dpcn", backbone="efficientnet_lite0", backbone_weights="random", reduce_dim=16, decoder_dim=16)
        >>> type(m).__name__, m.use_sam, m.use_ffm, m.use_dcm, m.dcm_spec
        ('DPCN', True, True, True, DCMSpec())
    """
    name = _key(name)
    fixed = MODELS[name][2]
    for k, v in fixed.items():
        if k != "dcm" and k in flags and flags[k] != v:
            raise ValueError(
                f"model {name!r} fixes {k}={v!r}; got {k}={flags[k]!r} (build the general model and set the flag instead)"
            )
    legacy_names = set(legacy_flag_names(host_of(name)))
    legacy = {k: flags.pop(k) for k in list(flags) if k in legacy_names}
    spec, host_kw = resolve_dcm(name, dcm, legacy, stacklevel=4)
    cls = _model_class(name)
    accepted = _accepted(cls)
    unknown = sorted(k for k in flags if k not in accepted)
    if unknown:
        valid = sorted(accepted - {"backbone", "shot", "backbone_weights"})
        raise TypeError(
            f"build_model({name!r}): unknown flag{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; valid flags: {', '.join(valid)}"
        )
    kwargs = {**flags, **host_kw, **{k: v for k, v in fixed.items() if k != "dcm"}}
    return cls(backbone=backbone, shot=shot, backbone_weights=backbone_weights, dcm=spec, **kwargs)
