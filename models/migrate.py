"""Model sections of configs (``{name, backbone, backbone_weights, shot, flags, dcm, config_version}``)
written by every release, read as this release builds them: :func:`migrate_model_config`, the one
migration, and :func:`network_of`, the network a section describes in one spelling.

``config_version`` says which release's conventions a section follows:

=======  ===========================================================================================
version  the model section
=======  ===========================================================================================
absent   before :class:`models.dcm_spec.DCMSpec`: the DCM as flat ``model.flags`` (``use_dcm``,
         ``dcm_*``, ``dcm_kwargs``); a section that does not name ``dcm_fusion`` (``pfenet+dcm``,
         ``canet+dcm``) or ``dcm_input`` (``canet+dcm``) was trained with the defaults of its time:
         ``replace`` / ``concat`` (the paper's fusion) and CANet's ``reduced`` input
2        ``model.dcm``: ``null`` (the model's default), ``none`` (DPCN without DCM), a preset name or a
         mapping (the model's ``default`` preset with the fields it sets; ``preset:`` picks another)
=======  ===========================================================================================

A recipe read by ``benchmarks.engine.config.load_config`` describes the network of this release: it is stamped
with :data:`CONFIG_VERSION` before it is migrated, so flat flags in it keep today's defaults (and warn).

Example:
    >>> migrate_model_config({"name": "canet+dcm", "flags": {"reduce_dim": 64}})
    {'name': 'canet+dcm', 'flags': {'reduce_dim': 64}, 'dcm': {'input': 'reduced', 'fusion': 'paper'}, 'config_version': 2}
    >>> migrate_model_config({"name": "dpcn", "flags": {"use_dcm": False}, "config_version": 2}, warn=False)["dcm"]
    'none'
"""
from __future__ import annotations

import copy
import json
from typing import Dict, Mapping, Optional

from .dcm_spec import DCMSpec, legacy_flag_names, preset

__all__ = ["CONFIG_VERSION", "migrate_model_config", "network_of"]

#: the ``model.config_version`` this release writes
CONFIG_VERSION = 2

#: flat flags whose default changed before version 2: the value a section of that time that does not name
#: the flag was trained with
_V1_DEFAULTS: Dict[str, Dict[str, object]] = {
    "pfenet+dcm": {"dcm_fusion": "replace"},
    "canet+dcm": {"dcm_fusion": "concat", "dcm_input": "reduced"},
}


def _version(model: Mapping) -> int:
    v = model.get("config_version")
    if v is None:
        return 1
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= CONFIG_VERSION:
        raise ValueError(f"model.config_version: expected an integer from 1 to {CONFIG_VERSION} (this release's), "
                         f"got {v!r}")
    return v


def _as_config(spec: Optional[DCMSpec], name: str):
    """``model.dcm`` for ``spec`` on model ``name``: null for the model's default, ``"none"`` for no DCM on
    DPCN, else the fields that differ from the host's ``default`` preset."""
    from .registry import has_dcm, host_of
    if spec is None:
        return "none" if has_dcm(name) is None else None
    changes = spec.changes(preset(host_of(name)))
    return changes or None


def migrate_model_config(model: Mapping, *, warn: bool = True) -> dict:
    """A copy of the model section ``model`` in this release's form (``config_version`` :data:`CONFIG_VERSION`).

    The flat DCM flags in ``model.flags`` become ``model.dcm`` (the fields they change on top of
    ``model.dcm`` or the model's default; DPCN's ``dcm_off_feature`` becomes ``flags.off_feature``), read
    by :func:`models.registry.resolve_dcm` and so validated; in a section of version 2 they are deprecated
    (a ``DeprecationWarning`` unless ``warn=False``), in an older one (no version) they are its spelling
    and migrate silently, with the defaults of its time (module docstring). A section of an unknown model
    is stamped and otherwise left as it is (building it names the error).

    Raises:
        ValueError: a ``config_version`` this release does not know, or flags that describe no network.
    """
    from .registry import MODELS, has_dcm, host_of, resolve_dcm
    m = copy.deepcopy(dict(model or {}))
    version = _version(m)
    name = str(m.get("name", "")).strip().lower()
    flags = dict(m.get("flags") or {})
    legacy = {}
    if name in MODELS:
        names = legacy_flag_names(host_of(name))
        legacy = {k: flags.pop(k) for k in list(flags) if k in names}
        if version == 1 and has_dcm(name):
            legacy = {**_V1_DEFAULTS.get(name, {}), **legacy}
    if legacy:
        dcm = m.get("dcm")
        spec, extra = resolve_dcm(name, legacy=legacy, warn=warn and version >= 2, stacklevel=4,
                                  **({} if dcm is None else {"dcm": dcm}))
        m["flags"] = {**flags, **extra}
        m["dcm"] = _as_config(spec, name)
    m["config_version"] = CONFIG_VERSION
    return m


def network_of(model: Mapping) -> dict:
    """The network model section ``model`` (of any version) describes, in one spelling: two sections that
    build the same network give equal dicts. ``flags`` holds every keyword flag of the model with its
    default filled in and the DCM's fields as ``dcm.<field>`` (``dcm: None`` without a DCM); tuples are
    lists.

    Example:
        >>> a = network_of({"name": "pfenet+dcm", "flags": {"dcm_fusion": "residual"}})
        >>> b = network_of({"name": "pfenet+dcm", "flags": {}, "config_version": 2})
        >>> a == b, a["flags"]["dcm.fusion"], a["flags"]["reduce_dim"]
        (True, 'residual', 256)
    """
    from .registry import MODELS, default_flags, resolve_dcm
    m = migrate_model_config(model, warn=False)
    del m["config_version"]
    name = str(m.get("name", "")).strip().lower()
    flags = dict(m.get("flags") or {})
    if name in MODELS:
        dcm = m.pop("dcm", None)
        spec, _ = resolve_dcm(name, **({} if dcm is None else {"dcm": dcm}))
        flags = {**default_flags(name), **flags}
        flags.update({f"dcm.{k}": v for k, v in spec.to_dict().items()} if spec is not None else {"dcm": None})
    m["flags"] = flags
    return json.loads(json.dumps(m, default=list))
