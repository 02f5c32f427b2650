"""How a Dynamic Convolution Module sits in a host network: :class:`DCMSpec`, the named presets and the
one reader of the deprecated flat ``dcm_*`` flags.

Every host (:class:`models.dpcn.DPCN`, :class:`models.pfenet.PFENet`, :class:`models.canet.CANet`) takes
``dcm=``: a :class:`DCMSpec`, a preset name (:func:`preset`), a mapping (the host's ``default`` preset, or
the one its ``preset`` key names, with the fields it sets), or ``None`` / ``"none"`` (no DCM).
:func:`as_spec` turns any of them into a spec and validates it for the host (:meth:`DCMSpec.validate_for`):
a field that means nothing for the host, set to another value than its default, is an error naming the
host and the field.

=============  ===========================  ==================================================
preset         host                         spec
=============  ===========================  ==================================================
``paper``      every host                   ``DCMSpec()``: the DCM as the paper describes it
``default``    ``dpcn``                     ``DCMSpec()``
``default``    ``pfenet``                   ``DCMSpec(fusion="residual")``
``default``    ``canet``                    ``DCMSpec(input="raw", fusion="residual")``
=============  ===========================  ==================================================

Example:
    >>> preset("canet", "default")
    DCMSpec(input='raw', fusion='residual')
    >>> as_spec({"gate": "fit"}, "pfenet")
    DCMSpec(fusion='residual', gate='fit')
    >>> as_spec({"placement": "decoder"}, "canet")
    Traceback (most recent call last):
    ...
    ValueError: CANet: dcm.placement='decoder' means nothing for CANet (the field applies to PFENet only); leave it at 'fem_input'
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional, Tuple

from .common import check_choice

__all__ = ["DCMSpec", "HOSTS", "PAPER_FUSION", "PRESETS", "preset", "as_spec", "spec_fields", "LEGACY_FLAGS",
           "legacy_flag_names", "spec_from_flags", "host_dcm"]

#: host key -> class name (the hosts of :class:`DCMSpec`)
HOSTS: Dict[str, str] = {"dpcn": "DPCN", "pfenet": "PFENet", "canet": "CANet"}

#: what ``fusion="paper"`` builds on each host: the maps replace the query feature (DPCN Eq. 9, PFENet), or
#: are concatenated to the input of CANet's fusion layer
PAPER_FUSION: Dict[str, str] = {"dpcn": "replace", "pfenet": "replace", "canet": "concat"}

#: the allowed values of the fields with a fixed vocabulary (the first is the default)
_CHOICES: Dict[str, Tuple] = {
    "input": ("reduced", "raw"),
    "fusion": ("paper", "residual"),
    "placement": ("fem_input", "pyramid", "decoder"),
    "support": ("dropout", "clean"),
    "kernels": ("dynamic", "identity"),
    "gate": ("none", "fit"),
}

#: the fields that apply to some hosts only (the others apply to every host)
_ONLY: Dict[str, Tuple[str, ...]] = {
    "placement": ("pfenet",),
    "support": ("pfenet", "canet"),
    "kernels": ("pfenet", "canet"),
    "gate": ("pfenet", "canet"),
    "map_dropout": ("pfenet", "canet"),
}


def _number(name: str, v, low: float, high: Optional[float] = None, optional: bool = False):
    if optional and v is None:
        return None
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and v >= low and (high is None or v < high)
    if not ok:
        rng = f"in [{low:g}, {high:g})" if high is not None else f">= {low:g}"
        raise ValueError(f"dcm.{name}: expected {'None or ' if optional else ''}a number {rng}, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class DCMSpec:
    """Everything about how a DCM sits in a host. ``DCMSpec()`` is the DCM as the paper describes it.

    The module (:class:`dcm.DynamicConvModule`'s arguments; the module checks them when the host builds it):

    Attributes:
        kernel_size: ``S``, the dynamic kernels' size (5; paper Table 4).
        variants: subset of ``("v", "h", "s")`` (S×1, 1×S, S×S kernels; Table 5); a string ``"vh"`` is
            read as ``("v", "h")``.
        square_source: ``"serial"`` (5→25, default) or ``"parallel"`` (5/25; Table A1).
        kernel_norm: ``None`` (the paper), ``"l1"`` or ``"l2"``: each generated kernel normalised over its taps.
        fg_threshold: foreground threshold on the resized support mask (0.5).
        kgen_kernel_size: kernel size of the kernel generators' 1-D convolutions (3).

    Its integration into the host:

    Attributes:
        input: what the DCM convolves: ``"reduced"`` (the host's reduced query feature, kernels from the
            reduced support feature; the paper) or ``"raw"`` (the backbone's mid-level feature before the
            host's reducer, for query and support alike).
        fusion: how the maps enter the host: ``"paper"`` (the paper's form for the host,
            :data:`PAPER_FUSION`: they replace the query feature on DPCN and PFENet, they are concatenated
            to CANet's fusion-layer input) or ``"residual"`` (``q + γ ⊙ ReLU(Conv1x1([q, maps]))`` with
            ``γ = 0`` at initialisation, :class:`dcm.DCMFusion`: the host+DCM equals the host at
            initialisation).
        placement: PFENet only: where the fused maps enter: ``"fem_input"`` (the reduced query feature
            before the FEM), ``"pyramid"`` (each pyramid level) or ``"decoder"`` (the FEM's output).
        support: PFENet, CANet: what the kernel generators see of the support with ``input="reduced"``:
            ``"dropout"`` (the reduced support feature after the reducer's Dropout2d) or ``"clean"``
            (before it).
        kernels: PFENet, CANet: ``"dynamic"`` (the support-generated kernels) or ``"identity"`` (a
            control: every map is the DCM's query input; the generators are frozen and unused).
        gate: PFENet, CANet: ``"none"`` or ``"fit"`` (the residual fusion scaled per query position by
            :func:`models.common.kernel_fit`; needs ``fusion="residual"``).
        map_dropout: PFENet, CANet: channel dropout on each DCM map while training (0: none).

    Its training:

    Attributes:
        lr_scale: learning-rate factor of the DCM's kernel generators (an optimiser group of their own
            when it is not 1 or ``weight_decay`` is set).
        weight_decay: weight decay of the kernel generators (``None``: the optimiser's).

    The ``repr`` names the fields that differ from ``DCMSpec()``.
    """

    kernel_size: int = 5
    variants: Tuple[str, ...] = ("v", "h", "s")
    square_source: str = "serial"
    kernel_norm: Optional[str] = None
    fg_threshold: float = 0.5
    kgen_kernel_size: int = 3
    input: str = "reduced"
    fusion: str = "paper"
    placement: str = "fem_input"
    support: str = "dropout"
    kernels: str = "dynamic"
    gate: str = "none"
    map_dropout: float = 0.0
    lr_scale: float = 1.0
    weight_decay: Optional[float] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise in place)
        if isinstance(self.variants, (str, list)):
            set_("variants", tuple(self.variants))
        for name in ("kernel_norm", "weight_decay"):  # "none" (a YAML / arm spelling) is None
            if isinstance(getattr(self, name), str) and getattr(self, name).lower() in ("none", "null"):
                set_(name, None)
        for name, choices in _CHOICES.items():
            v = getattr(self, name)
            try:
                check_choice(f"dcm.{name}", v, choices)
            except ValueError as e:
                hint = ""
                if name == "fusion" and v in ("replace", "concat"):
                    hint = f" ('{v}' is the paper's fusion of {' and '.join(HOSTS[h] for h, f in PAPER_FUSION.items() if f == v)}: fusion='paper')"
                raise ValueError(f"{e}{hint}") from None
        set_("map_dropout", _number("map_dropout", self.map_dropout, 0.0, 1.0))
        set_("lr_scale", _number("lr_scale", self.lr_scale, 0.0))
        set_("weight_decay", _number("weight_decay", self.weight_decay, 0.0, optional=True))

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"DCMSpec({', '.join(changed)})"

    # ------------------------------------------------------------------ per host
    def validate_for(self, host: str) -> "DCMSpec":
        """Check that the spec means what it says on ``host`` (``"dpcn"``, ``"pfenet"``, ``"canet"`` or the
        class name); returns the spec.

        Raises:
            ValueError: naming the host and the field: a field of another host set to another value than
                its default, or fields that contradict each other on this host.
        """
        key = _host_key(host)
        cls = HOSTS[key]
        for name, hosts in _ONLY.items():
            default = _DEFAULTS[name]
            if key not in hosts and getattr(self, name) != default:
                raise ValueError(f"{cls}: dcm.{name}={getattr(self, name)!r} means nothing for {cls} (the field "
                                 f"applies to {' and '.join(HOSTS[h] for h in hosts)} only); leave it at {default!r}")
        if self.support == "clean" and self.input == "raw":
            raise ValueError(f"{cls}: dcm.support='clean' applies to dcm.input='reduced' (the raw mid-level feature "
                             f"has no dropout); pass input='reduced' with it")
        if self.gate == "fit" and self.fusion != "residual":
            raise ValueError(f"{cls}: dcm.gate='fit' gates the residual fusion; dcm.fusion={self.fusion!r} has none "
                             f"(pass fusion='residual')")
        if self.gate == "fit" and self.placement != "fem_input":
            raise ValueError(f"{cls}: dcm.gate='fit' gates the fusion at the FEM input; pass placement='fem_input' "
                             f"(got {self.placement!r})")
        if key == "dpcn" and self.input == "raw" and self.fusion != "residual":
            raise ValueError("DPCN: dcm.input='raw' needs dcm.fusion='residual' (the raw-feature maps are projected "
                             "into the reduced query feature; the paper's fusion would put them into x_out as they are)")
        return self

    def host_fusion(self, host: str) -> str:
        """The :class:`dcm.DCMFusion` mode / CANet form this spec builds on ``host``: ``"residual"``,
        ``"replace"`` or ``"concat"``."""
        return "residual" if self.fusion == "residual" else PAPER_FUSION[_host_key(host)]

    def module_kwargs(self) -> Dict[str, object]:
        """The keyword arguments of :class:`dcm.DynamicConvModule` (all but ``channels``)."""
        return {k: getattr(self, k) for k in _MODULE_FIELDS}

    def replace(self, **changes) -> "DCMSpec":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, object]:
        """Every field, ``variants`` as a list (YAML / JSON friendly)."""
        out = dataclasses.asdict(self)
        out["variants"] = list(self.variants)
        return out

    def changes(self, base: "DCMSpec") -> Dict[str, object]:
        """The fields that differ from ``base`` (``to_dict`` spelling)."""
        a, b = self.to_dict(), base.to_dict()
        return {k: v for k, v in a.items() if b[k] != v}


_DEFAULTS = {f.name: f.default for f in fields(DCMSpec)}
_MODULE_FIELDS = ("kernel_size", "variants", "square_source", "kgen_kernel_size", "fg_threshold", "kernel_norm")


def spec_fields() -> Tuple[str, ...]:
    """The field names of :class:`DCMSpec`, in order."""
    return tuple(_DEFAULTS)


def _host_key(host: str) -> str:
    key = str(host).strip().lower()
    if key not in HOSTS:
        raise ValueError(f"host: expected one of {', '.join(HOSTS)}, got {host!r}")
    return key


#: preset name -> host -> spec
PRESETS: Dict[str, Dict[str, DCMSpec]] = {
    "paper": {h: DCMSpec() for h in HOSTS},
    "default": {"dpcn": DCMSpec(), "pfenet": DCMSpec(fusion="residual"),
                "canet": DCMSpec(input="raw", fusion="residual")},
}


def preset(host: str, name: str = "default", **changes) -> DCMSpec:
    """The spec of preset ``name`` (:data:`PRESETS`) for ``host``, with ``changes`` applied.

    Example:
        >>> preset("pfenet", "paper") == DCMSpec(), preset("pfenet", gate="fit").gate
        (True, 'fit')
    """
    key = _host_key(host)
    if name not in PRESETS:
        raise ValueError(f"dcm: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    base = PRESETS[name][key]
    return base.replace(**changes) if changes else base


def as_spec(dcm, host: str) -> Optional[DCMSpec]:
    """``dcm`` as a validated spec for ``host`` (``None``: no DCM).

    ``dcm``: a :class:`DCMSpec`; a preset name; ``None`` or ``"none"``; or a mapping: the preset its
    ``preset`` key names (``"default"`` if none) with the fields it sets (``{"gate": "fit"}``).
    """
    if dcm is None or (isinstance(dcm, str) and dcm.strip().lower() == "none"):
        return None
    if isinstance(dcm, DCMSpec):
        spec = dcm
    elif isinstance(dcm, str):
        spec = preset(host, dcm.strip())
    elif isinstance(dcm, Mapping):
        items = dict(dcm)
        name = items.pop("preset", None) or "default"
        unknown = sorted(k for k in items if k not in _DEFAULTS)
        if unknown:
            raise ValueError(f"dcm: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"fields: {', '.join(_DEFAULTS)} (and 'preset')")
        spec = preset(host, name, **items)
    else:
        raise TypeError(f"dcm: expected a DCMSpec, a preset name, a mapping or None, got {type(dcm).__name__}")
    return spec.validate_for(host)


# ====================================================================== the deprecated flat flags
#: the flat ``dcm_*`` flag of each field (the hosts' keyword arguments before :class:`DCMSpec`)
LEGACY_FLAGS: Dict[str, str] = {f"dcm_{name}": name for name in _DEFAULTS}

#: the flat flags each host took (``use_dcm`` and the deprecated ``dcm_kwargs`` besides)
_LEGACY_OF = {
    "dpcn": [f for f, n in LEGACY_FLAGS.items() if n not in _ONLY] + ["use_dcm", "dcm_off_feature"],
    "pfenet": list(LEGACY_FLAGS) + ["use_dcm", "dcm_kwargs"],
    "canet": [f for f, n in LEGACY_FLAGS.items() if n != "placement"] + ["use_dcm", "dcm_kwargs"],
}


def legacy_flag_names(host: str) -> Tuple[str, ...]:
    """The deprecated flat keyword arguments ``host`` reads through :func:`spec_from_flags`."""
    return tuple(_LEGACY_OF[_host_key(host)])


def spec_from_flags(host: str, flags: Mapping, *, on: bool, base: Optional[DCMSpec] = None,
                    warn: bool = True, stacklevel: int = 3) -> Tuple[Optional[DCMSpec], Dict[str, object]]:
    """The spec that the deprecated flat flags ``flags`` of ``host`` describe: ``(spec or None, host keyword
    arguments)``; the only reader of the flat spelling.

    Args:
        host: ``"dpcn"``, ``"pfenet"`` or ``"canet"``.
        flags: ``use_dcm``, the ``dcm_<field>`` flags of :data:`LEGACY_FLAGS` (``dcm_fusion``: ``"residual"``
            or the host's paper form, ``"replace"`` / ``"concat"``), ``dcm_kwargs`` (PFENet, CANet: the
            module's arguments as a mapping) and DPCN's ``dcm_off_feature`` (returned as the host keyword
            ``off_feature`` when the DCM is off; meaningless with it on).
        on: whether the DCM is on when ``flags`` holds no ``use_dcm`` (the host's or model's default).
        base: the spec the flags change (default: the host's ``default`` preset).
        warn: emit a ``DeprecationWarning`` naming the flags and the ``dcm=`` spelling.

    With the DCM off the other flags are dropped (they meant nothing); a flag ``host`` never took is a
    ``TypeError`` naming it.
    """
    key = _host_key(host)
    cls = HOSTS[key]
    flags = dict(flags)
    given = ", ".join(sorted(flags))
    unknown = [k for k in flags if k not in _LEGACY_OF[key]]
    if unknown:
        raise TypeError(f"{cls}: unexpected keyword argument {unknown[0]!r}")
    on = bool(flags.pop("use_dcm", on))
    extra: Dict[str, object] = {}
    off_feature = flags.pop("dcm_off_feature", None)
    kwargs = flags.pop("dcm_kwargs", None)
    changes = {LEGACY_FLAGS[k]: v for k, v in flags.items()}
    if "fusion" in changes:
        v = changes["fusion"]
        if v not in ("residual", PAPER_FUSION[key]):
            raise ValueError(f"dcm_fusion: expected {PAPER_FUSION[key]!r} or 'residual', got {v!r}")
        changes["fusion"] = "paper" if v == PAPER_FUSION[key] else v
    if kwargs is not None:
        if not on:
            raise ValueError("dcm_kwargs: given but use_dcm=False")
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"dcm_kwargs: expected a dict, got {type(kwargs).__name__}")
        if "channels" in kwargs:
            raise ValueError("dcm_kwargs: 'channels' is fixed by the host")
        for k, v in kwargs.items():
            if k not in _MODULE_FIELDS:
                raise ValueError(f"dcm_kwargs: unknown key '{k}' (expected some of {sorted(_MODULE_FIELDS)})")
            if k in changes and changes[k] != _DEFAULTS[k] and changes[k] != v:
                raise ValueError(f"dcm_kwargs: '{k}' given twice (dcm_{k}={changes[k]!r} and dcm_kwargs)")
            changes[k] = v
    if warn:
        new = "dcm=None" if not on else f"dcm=preset({key!r}, 'default'{''.join(f', {k}={v!r}' for k, v in changes.items())})"
        warnings.warn(f"{cls}: the flat DCM flags ({given}) are deprecated and will be removed in the next release; "
                      f"pass {new} (models.dcm_spec)", DeprecationWarning, stacklevel=stacklevel)
    if not on:
        if off_feature is not None:
            extra["off_feature"] = off_feature
        return None, extra
    spec = (base if base is not None else preset(key)).replace(**changes)
    return spec.validate_for(key), extra


def host_dcm(host: str, dcm, default, legacy: Mapping, stacklevel: int = 4
             ) -> Tuple[Optional[DCMSpec], Dict[str, object]]:
    """A host constructor's one call: its ``dcm`` argument as a validated spec, or, when the deprecated flat
    flags ``legacy`` (its ``**legacy`` keywords) are given, the spec they describe (:func:`spec_from_flags`,
    with a ``DeprecationWarning``). Returns ``(spec or None, host keyword arguments the flags name)``.

    ``default`` is the host's default of ``dcm``; the flags and another ``dcm`` together are an error.
    """
    if not legacy:
        return as_spec(dcm, host), {}
    cls = HOSTS[_host_key(host)]
    if dcm is not default and dcm != default:
        raise TypeError(f"{cls}: pass the DCM either as dcm= or as the deprecated flat flags "
                        f"({', '.join(sorted(legacy))}), not both")
    return spec_from_flags(host, legacy, on=default is not None, stacklevel=stacklevel)
