"""Loading pretrained weights into a backbone from a local file, with an honest report.

PFENet loads ``initmodel/resnet50_v2.pth`` with ``strict=False``, which silently tolerates any
key mismatch (docs/CONVENTIONS.md#backbone-weights). :func:`load_backbone_weights` instead

* reads the file on the CPU with ``torch.load(weights_only=True)`` (no arbitrary unpickling);
* unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"model_state_dict": ...}`` containers;
* strips DataParallel/DDP ``module.`` prefixes (repeated prefixes too);
* sets aside the ImageNet-classifier keys the backbone does not build
  (``backbone.ignored_checkpoint_prefixes``: ``fc.*``, ``classifier.*``, ``_fc.*`` ...) as *ignored*;
* loads every key whose name and shape match, and reports the rest as *missing* (in the
  backbone, not in the file), *unexpected* (in the file, not in the backbone) or *mismatched*
  (same name, different shape: not loaded). ``num_batches_tracked`` buffers absent from old
  checkpoints are not reported;
* warns (:class:`BackboneWeightsWarning`, one warning listing the problems) unless everything
  matched, and raises ``ValueError`` naming the file when the file is missing, unreadable, not a
  state dict, or when *nothing* matched (wrong backbone for this file).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["BackboneWeightsWarning", "LoadReport", "load_backbone_weights", "read_state_dict"]

_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
_SHOW = 10  # keys listed per category in messages


class BackboneWeightsWarning(UserWarning):
    """Warnings about backbone weights: random initialisation, missing or unexpected keys."""


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did.

    Attributes:
        source: the file path (or ``"<state_dict>"`` for an in-memory mapping).
        loaded: backbone keys that received a tensor.
        missing: backbone keys the file did not provide (left at their initial values).
        unexpected: file keys the backbone does not have (not counting ``ignored``).
        mismatched: ``(key, shape_in_file, shape_in_backbone)`` for same-name, different-shape keys.
        ignored: file keys deliberately skipped (the ImageNet classifier head).
        stripped_prefix: the ``module.`` prefix removed from the file's keys ("" if none).
    """

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    stripped_prefix: str = ""

    @property
    def ok(self) -> bool:
        """True when every backbone key was loaded and the file had nothing else but ignored keys."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One-paragraph human-readable summary (lists at most 10 keys per category)."""

        def show(keys: List[str]) -> str:
            more = f", ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            return ", ".join(keys[:_SHOW]) + more

        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.stripped_prefix:
            parts.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} classifier keys")
        if self.missing:
            parts.append(f"{len(self.missing)} missing (kept at initial values): {show(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {show(self.unexpected)}")
        if self.mismatched:
            mm = [f"{k} file{tuple(a)} vs model{tuple(b)}" for k, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} shape-mismatched (not loaded): {show(mm)}")
        return "; ".join(parts)

    __str__ = summary


def _is_tensor_mapping(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """Read a state dict from ``path`` (CPU, ``weights_only=True``), unwrapping common containers.

    Raises:
        ValueError: the file does not exist, cannot be read, or holds no tensor mapping.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"backbone weights file not found: {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with arbitrary objects, ...
        raise ValueError(
            f"could not read backbone weights from {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "expected a file written by torch.save(state_dict)"
        ) from e
    if isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        for key in _CONTAINER_KEYS:
            if _is_tensor_mapping(obj.get(key)):
                obj = obj[key]
                break
        else:
            # mapping with a few non-tensor entries (e.g. metadata): keep the tensors if any
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            obj = tensors
    if not _is_tensor_mapping(obj):
        raise ValueError(f"{path!r} does not contain a state dict (a mapping of parameter names to tensors)")
    return dict(obj)


def _strip_module_prefix(sd: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], str]:
    stripped = ""
    while sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        stripped += "module."
    return sd, stripped


def load_backbone_weights(
    backbone: nn.Module,
    weights: Union[str, os.PathLike, Mapping[str, Tensor]],
    *,
    strict: bool = False,
    warn: bool = True,
) -> LoadReport:
    """Load ``weights`` (a path or a state dict) into ``backbone`` and report what matched.

    Args:
        backbone: any ``nn.Module``; ``backbone.ignored_checkpoint_prefixes`` (tuple of str), when
            present, names file keys to skip silently.
        weights: path of a ``torch.save``-d state dict, or the mapping itself.
        strict: raise ``ValueError`` unless the report is ``ok``.
        warn: emit one :class:`BackboneWeightsWarning` when the report is not ``ok``.

    Returns:
        :class:`LoadReport` (also stored as ``backbone.load_report``).

    Raises:
        ValueError: missing/unreadable file, no tensor in it, no key matching the backbone,
            or ``strict`` and a mismatch.
    """
    if isinstance(weights, Mapping):
        source, sd = "<state_dict>", dict(weights)
        if not _is_tensor_mapping(sd):
            raise ValueError("weights mapping must map parameter names to tensors")
    else:
        source = os.fspath(weights)
        sd = read_state_dict(source)
    sd, stripped = _strip_module_prefix(sd)
    report = LoadReport(source=source, stripped_prefix=stripped)

    ignored_prefixes = tuple(getattr(backbone, "ignored_checkpoint_prefixes", ()))
    own = backbone.state_dict()
    to_load: Dict[str, Tensor] = {}
    for key, value in sd.items():
        if key not in own:
            (report.ignored if key.startswith(ignored_prefixes) else report.unexpected).append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value
    report.loaded = list(to_load)
    report.missing = [
        k for k in own
        if k not in to_load and not (k.endswith("num_batches_tracked") and k not in sd)
        and k not in {m[0] for m in report.mismatched}
    ]

    name = getattr(backbone, "name", type(backbone).__name__)
    if not to_load:
        file_keys = ", ".join(list(sd)[:5])
        model_keys = ", ".join(list(own)[:5])
        raise ValueError(
            f"no tensor in {source!r} matches the {name} backbone (file keys: {file_keys}, ...; "
            f"expected keys like: {model_keys}, ...) -- wrong backbone for this file?"
        )
    if strict and not report.ok:
        raise ValueError(f"strict loading into {name} failed: {report.summary()}")

    result = backbone.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filtered above
    if warn and not report.ok:
        warnings.warn(f"{name} weights do not match exactly: {report.summary()}", BackboneWeightsWarning,
                      stacklevel=2)
    try:
        backbone.load_report = report
    except AttributeError:  # pragma: no cover - exotic modules
        pass
    return report
