"""Arms of a comparison (``benchmarks/plug_in.py --arms``): a registry model and, in brackets, the DCM it
trains with (a :class:`models.dcm_spec.DCMSpec` preset and fields) or a flag of the model.

Grammar::

    arm   := MODEL | MODEL "[" item ("," item)* "]"
    item  := PRESET | FIELD "=" VALUE

``MODEL``: a model of the host (:data:`HOST_MODELS`); ``PRESET``: ``paper`` or ``default``
(:func:`models.dcm_spec.preset`), or ``nodcm`` (``dpcn`` without DCM); ``FIELD``: a field of
:class:`~models.dcm_spec.DCMSpec` (the config's ``model.dcm.FIELD``) or another keyword flag of the
model (``model.flags.FIELD``); ``VALUE``: a number, ``none``, or a word (``variants=vh`` for
``("v", "h")``). The items change the model's ``default`` DCM (or the named preset), e.g.
``pfenet+dcm[input=raw]``, ``canet+dcm[gate=fit,map_dropout=0.5]``, ``pfenet+dcm[paper]``,
``baseline[support_branch_weight=1]``.

The earlier variant tokens joined by ``+`` (``canet+dcm[residual+rawin]``, ``baseline[sb1]``, ...;
:data:`LEGACY_TOKENS`) still work for one release with a ``DeprecationWarning`` that names the new
spelling.

Every arm has a run-folder tag, ``<model, "+" as "_">[_<items>]``: each item in its short form (``input=raw``
-> ``rawin``, ``gate=fit`` -> ``fit``, ``map_dropout=0.5`` -> ``mapdrop0.5``, a preset -> its name,
:data:`SHORT`; otherwise ``field=value``) joined by ``-``. A deprecated arm keeps its earlier tag, its
tokens joined by ``-``; its new spelling has the same tag (``canet+dcm[fit]`` and ``canet+dcm[gate=fit]``
both train in ``canet_dcm_fit_f<fold>_seed<seed>``).

Example:
    >>> a = parse_arm("canet+dcm[gate=fit,map_dropout=0.5]", "canet")
    >>> a.tag, a.overrides
    ('canet_dcm_fit-mapdrop0.5', ['model.dcm.gate=fit', 'model.dcm.map_dropout=0.5'])
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .dcm_spec import PAPER_FUSION, PRESETS, spec_fields

__all__ = ["DEFAULT_ARMS", "HOST_MODELS", "Arm", "parse_arm", "SHORT", "LEGACY_TOKENS"]

#: the arms a host's comparison runs when none are given (the first is the reference)
DEFAULT_ARMS: Dict[str, List[str]] = {"pfenet": ["pfenet", "pfenet+dcm"], "canet": ["canet", "canet+dcm"],
                                      "dpcn": ["baseline", "dpcn[nodcm]", "dpcn"]}
#: the registry models each host's comparison may use
HOST_MODELS: Dict[str, Tuple[str, ...]] = {"pfenet": ("pfenet", "pfenet+dcm"), "canet": ("canet", "canet+dcm"),
                                           "dpcn": ("dpcn", "baseline")}

#: the short form of ``field=value`` items in a run-folder tag: ``(field, value) -> tag`` for words, ``field ->
#: prefix`` for numbers (``fusion=paper`` is the host's paper form, ``replace`` or ``concat``)
SHORT: Dict[object, str] = {
    ("input", "raw"): "rawin", ("input", "reduced"): "redin", ("fusion", "residual"): "residual",
    ("kernel_norm", "l1"): "l1", ("kernel_norm", "l2"): "l2", ("kernel_norm", None): "raw",
    ("support", "clean"): "clean", ("kernels", "identity"): "ident", ("placement", "pyramid"): "pyramid",
    ("placement", "decoder"): "decoder", ("gate", "fit"): "fit",
    "map_dropout": "mapdrop", "lr_scale": "lr", "weight_decay": "wd", "support_branch_weight": "sb",
}

#: the deprecated ``+``-joined tokens: word -> item, or number prefix -> field (``paper`` is the preset)
LEGACY_TOKENS: Dict[str, str] = {
    "paper": "paper", "residual": "fusion=residual", "l1": "kernel_norm=l1", "l2": "kernel_norm=l2",
    "raw": "kernel_norm=none", "clean": "support=clean", "rawin": "input=raw", "redin": "input=reduced",
    "ident": "kernels=identity", "pyramid": "placement=pyramid", "decoder": "placement=decoder",
    "fit": "gate=fit", "nodcm": "nodcm",
}
_LEGACY_NUMBERS = {"mapdrop": "map_dropout", "lr": "lr_scale", "wd": "weight_decay", "sb": "support_branch_weight"}
#: what the paper token set, to find tokens that contradict it
_PAPER_FIELDS = {"fusion": "paper", "input": "reduced", "kernel_norm": None}


@dataclass(frozen=True)
class Arm:
    """One arm: ``spec`` as given, its registry ``model``, the bracket content ``variant`` (``""`` without),
    the config ``overrides`` that make it, and its run-folder ``tag``."""

    spec: str
    model: str
    variant: str
    overrides: List[str]
    tag: str


def _value(text: str):
    """An item's value: ``none`` / ``null`` -> None, ``true`` / ``false``, an int, a float, else the word."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def _yaml(v) -> str:
    """``v`` as a YAML scalar for a ``key=value`` override (floats always with a dot, which YAML needs)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        if "e" in text and "." not in text.split("e")[0]:
            mant, exp = text.split("e")
            text = f"{mant}.0e{exp if exp[0] in '+-' else '+' + exp}"
        return text
    return str(v)


def _short(field: str, text: str, value, host: str) -> str:
    if field == "fusion" and value == "paper":
        return PAPER_FUSION[host]
    if (field, value) in SHORT:
        return SHORT[(field, value)]
    if field in SHORT:
        return f"{SHORT[field]}{text}"
    return f"{field}={text}"


def _from_legacy(spec: str, model: str, variant: str) -> List[str]:
    """The deprecated ``+``-joined tokens of ``variant`` as items of the grammar (errors as before)."""
    items: List[str] = []
    set_by: Dict[str, Tuple[str, object]] = {}
    for tok in variant.split("+"):
        m = re.fullmatch(r"(mapdrop|lr|wd|sb)([0-9.e+-]*)", tok)
        if tok in LEGACY_TOKENS:
            item = LEGACY_TOKENS[tok]
        elif tok in ("replace", "concat"):
            host = model.split("+")[0] if model not in ("dpcn", "baseline") else "dpcn"
            if tok != PAPER_FUSION[host]:
                raise ValueError(f"arm '{spec}': {host} takes fusion '{PAPER_FUSION[host]}' (its paper form) or "
                                 f"'residual', not '{tok}'")
            item = "fusion=paper"
        elif m and m.group(2):
            try:
                float(m.group(2))
            except ValueError:
                raise ValueError(f"arm '{spec}': '{tok}' needs a number after '{m.group(1)}'") from None
            item = f"{_LEGACY_NUMBERS[m.group(1)]}={m.group(2)}"
        else:
            raise ValueError(f"arm '{spec}': unknown variant token '{tok}' (paper, residual, replace/concat, l1, l2, "
                             f"raw, clean, rawin, redin, ident, pyramid, decoder, fit, mapdrop<x>, lr<x>, wd<x>, "
                             f"nodcm, sb<x>)")
        changes = dict(_PAPER_FIELDS) if item == "paper" else (
            {item.split("=")[0]: _value(item.split("=")[1])} if "=" in item else {})
        for k, v in changes.items():
            if k in set_by and set_by[k][1] != v:
                raise ValueError(f"arm '{spec}': '{set_by[k][0]}' and '{tok}' contradict each other ({k}: "
                                 f"{_yaml(set_by[k][1])} vs {_yaml(v)}); keep one")
            set_by.setdefault(k, (tok, v))
        if item not in items:
            items.append(item)
    return items


def parse_arm(spec: str, host: str) -> Arm:
    """The :class:`Arm` that ``spec`` names for ``host`` (module docstring); its DCM is validated for the host.

    Raises:
        ValueError: naming the arm: unreadable, a model that is not the host's, an unknown field or preset,
            a DCM item on a model without DCM, a spec the host refuses (:meth:`DCMSpec.validate_for`).
    """
    from .registry import MODELS, default_flags, has_dcm, host_of, resolve_dcm
    m = re.fullmatch(r"([a-z0-9+_]+)(?:\[([^\[\]]*)\])?", spec.strip())
    if not m:
        raise ValueError(f"--arms: cannot read '{spec}' (expected NAME or NAME[items], e.g. pfenet+dcm[input=raw])")
    model, variant = m.group(1), (m.group(2) or "").strip()
    spec = spec.strip()
    if m.group(2) is not None and not variant:
        raise ValueError(f"--arms: '{spec}' has empty brackets; name a variant (e.g. {model}[paper]) or drop the "
                         f"brackets")
    if model not in HOST_MODELS[host]:
        raise ValueError(f"--arms: '{model}' is not a {host} arm (one of {', '.join(HOST_MODELS[host])})")
    words = set(PRESETS) | {"nodcm"}
    legacy = bool(variant) and "=" not in variant and "," not in variant and variant not in words
    items = _from_legacy(spec, model, variant) if legacy else [i.strip() for i in variant.split(",") if variant]
    if legacy:
        new = f"{model}[{','.join(items)}]"
        warnings.warn(f"arm '{spec}': the '+'-joined variant tokens are deprecated and will be removed in the next "
                      f"release; write '{new}' (the same network and run folder)", DeprecationWarning, stacklevel=2)
    hostkey, dcm_on = host_of(model), has_dcm(model)
    fields, flags = set(spec_fields()), default_flags(model)
    preset: Optional[str] = None
    dcm: Dict[str, object] = {}
    overrides: List[str] = []
    tags: List[str] = []
    for item in items:
        name, eq, text = (s.strip() for s in item.partition("="))
        if not eq:
            if name not in words or (name == "nodcm" and model != "dpcn"):
                raise ValueError(f"arm '{spec}': unknown preset '{name}' (presets: {', '.join(PRESETS)}; "
                                 f"dpcn: nodcm)")
            if preset is not None:
                raise ValueError(f"arm '{spec}': two presets, '{preset}' and '{name}'; keep one")
            if dcm_on is False:
                raise ValueError(f"arm '{spec}': '{name}' is a DCM preset but '{model}' has no DCM")
            preset = name
            overrides.append("model.dcm=none" if name == "nodcm" else f"model.dcm.preset={name}")
            tags.append(name)
            continue
        value = _value(text)
        if name in fields:
            if dcm_on is False:
                raise ValueError(f"arm '{spec}': '{name}' is a DCM field but '{model}' has no DCM")
            if name in dcm:
                raise ValueError(f"arm '{spec}': '{name}' given twice; keep one")
            dcm[name] = value
            overrides.append(f"model.dcm.{name}={_yaml(value)}")
        elif name in flags and name != "dcm":
            if any(o.startswith(f"model.flags.{name}=") for o in overrides):
                raise ValueError(f"arm '{spec}': '{name}' given twice; keep one")
            overrides.append(f"model.flags.{name}={_yaml(value)}")
        else:
            owners = [m for m in MODELS if name in default_flags(m)]
            raise ValueError(f"arm '{spec}': '{name}' is neither a field of models.dcm_spec.DCMSpec nor a flag "
                             f"of {model}" + (f" (it is one of {', '.join(owners)})" if owners else ""))
        tags.append(_short(name, text, value, hostkey))
    if preset == "nodcm" and dcm:
        raise ValueError(f"arm '{spec}': 'nodcm' has no DCM for the fields {', '.join(dcm)}")
    if dcm_on is not False and preset != "nodcm":
        try:
            resolve_dcm(model, {**dcm, **({"preset": preset} if preset else {})})
        except ValueError as e:
            raise ValueError(f"arm '{spec}': {e}") from None
    base = model.replace("+", "_")
    tag = (f"{base}_{variant.replace('+', '-')}" if legacy else f"{base}_{'-'.join(tags)}") if variant else base
    return Arm(spec, model, variant, overrides, tag)
