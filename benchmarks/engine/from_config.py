"""What a config builds: the network (:func:`build_model_from_config`), the training episodes
(:func:`build_train_dataset`), the evaluation :class:`~benchmarks.scoring.protocols.Protocol` of the final test or of
the per-epoch validation (:func:`eval_protocol`, at :func:`test_size`) and the evaluation-dataset factory
(:func:`eval_factory`). The config keys are those of :mod:`benchmarks.engine.config`.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from torch import nn

from ..datasets import build_dataset
from ..scoring.protocols import Protocol, dataset_factory

__all__ = ["build_model_from_config", "build_train_dataset", "test_size", "eval_protocol", "eval_factory",
           "check_model_config", "recipe_hint"]


def build_model_from_config(cfg: dict, *, backbone_weights=...) -> nn.Module:
    """``models.build_model(cfg.model.name, backbone=..., shot=..., backbone_weights=..., dcm=cfg.model.dcm,
    **cfg.model.flags)`` (``dcm`` left out when null: the model's default).

    ``backbone_weights`` overrides the config (``"random"`` when a checkpoint will overwrite them).
    """
    from models.registry import build_model
    m = cfg["model"]
    weights = m["backbone_weights"] if backbone_weights is ... else backbone_weights
    if isinstance(weights, str) and weights.startswith("~"):
        weights = os.path.expanduser(weights)
    flags = dict(m["flags"] or {})
    if "layer4_trainable" in flags:
        raise ValueError("model.flags.layer4_trainable: set train.finetune_layer4 / train.layer4_start_epoch "
                         "instead (the trainer unfreezes layer4 on schedule)")
    for k, v in list(flags.items()):  # YAML lists -> tuples for window/variant flags
        if isinstance(v, list):
            flags[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    dcm = {} if m.get("dcm") is None else {"dcm": m["dcm"]}
    try:
        return build_model(m["name"], backbone=m["backbone"], shot=int(m["shot"]), backbone_weights=weights, **dcm,
                           **flags)
    except TypeError as e:
        if "unknown flag" not in str(e):
            raise
        raise TypeError(f"{e} -- the recipe's model.flags belong to another network; {recipe_hint(m['name'])}") from None


def check_model_config(cfg: dict) -> None:
    """Raise the error :func:`build_model_from_config` would raise for ``cfg`` (unknown model or flag, a flag
    value the network refuses) without building real weights: the network is built on PyTorch's ``meta``
    device (no memory, no backbone file read). For checking every run of a comparison before the first."""
    import torch
    try:
        with torch.device("meta"):
            build_model_from_config(cfg, backbone_weights="random")
    except (ValueError, TypeError, ImportError):
        raise
    except Exception:  # an operation the meta device does not support: the real build decides
        pass


def recipe_hint(model: str) -> str:
    """Which recipes of ``configs/`` are for ``model`` (its host family: ``pfenet+dcm`` -> pfenet, ``baseline``
    -> dpcn), as a hint for an error: ``"use one of its recipes: --config a / b"``."""
    from .config import CONFIG_DIR, host_of
    family = host_of(model)
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml") if family in f.stem.split("_") and "base" not in f.stem)
    if not names:
        return "give a recipe for it (--config FILE) or set its flags (--set model.flags={...})"
    return f"use a {family} recipe: --config {' / '.join(names)} (or set the flags: --set model.flags={{...}})"


def _dataset_kwargs(cfg: dict, split: str) -> dict:
    d = cfg["data"]
    kw = dict(d["args"] or {})
    kw.update((d["train_args"] if split == "train" else d["val_args"]) or {})
    if d["dataset"] != "synthetic" and d["root"] is not None:
        kw["root"] = d["root"]
    return kw


def test_size(cfg: dict) -> int:
    """The evaluation input size: ``data.test_size``, else the synthetic image size, else 473."""
    d = cfg["data"]
    if d["test_size"]:
        return int(d["test_size"])
    if d["dataset"] == "synthetic":
        return int({**(d["args"] or {}), **(d["val_args"] or {})}.get("image_size", 96))
    return 473


def build_train_dataset(cfg: dict):
    """The training-split episode dataset of the recipe (PFENet augmentation when ``data.train_size`` is set)."""
    d = cfg["data"]
    kw = _dataset_kwargs(cfg, "train")
    kw.update(shot=int(cfg["model"]["shot"]), split="train", episodes=d["train_episodes"],
              seed=int(cfg["train"]["seed"]))
    if d["dataset"] not in ("fss", "fss1000"):
        kw["fold"] = d["fold"]
    if d["train_size"]:
        from ..datasets.transforms import flip_transform, train_transform
        if d["augment"] == "flip":
            kw["transform"] = flip_transform(int(d["train_size"]), d["test_resize"])
        else:
            kw["transform"] = train_transform(int(d["train_size"]), tuple(d["scale"]), tuple(d["rotate"]))
    elif d["augment"] != "pfenet":
        raise ValueError("data.augment=flip needs data.train_size (the size training inputs are resized to)")
    return build_dataset(d["dataset"], **kw)


def eval_protocol(cfg: dict, *, validation: bool = False, shot: Optional[int] = None) -> Protocol:
    """The :class:`Protocol` of the final test (``eval.*``) or of the per-epoch validation (``train.val_*``)."""
    d, e, t = cfg["data"], cfg["eval"], cfg["train"]
    size = test_size(cfg)
    split = t["val_split"] if validation else e["split"]
    kw = dict(dataset=d["dataset"], fold=None if d["dataset"] in ("fss", "fss1000") else d["fold"],
              shot=int(shot or cfg["model"]["shot"]), resize=d["test_resize"],
              split="test" if d["dataset"] in ("fss", "fss1000") else split,
              images=_image_split_text(cfg))
    if validation:
        kw.update(episodes=int(t["val_episodes"]), seeds=(int(t["val_seed"]),), scales=(size,),
                  resolution=e["resolution"])
    else:
        scales = tuple(int(s) for s in (e["scales"] or [size]))
        kw.update(episodes=e["episodes"], seeds=tuple(int(s) for s in e["seeds"]), scales=scales,
                  resolution=e["resolution"], episode_iou=bool(e.get("episode_iou", False)))
        if e.get("preset"):
            return Protocol.preset(e["preset"], **{k: v for k, v in kw.items() if k in ("dataset", "fold", "shot", "split",
                                                                                          "images")})
    return Protocol(**kw)


def _image_split_text(cfg: dict) -> str:
    """How the images were split (``data.args.image_split``), for the protocol line; '' when not split."""
    spec = (cfg["data"]["args"] or {}).get("image_split")
    if not spec:
        return ""
    from ..datasets.pascal import describe_image_split
    return describe_image_split(spec)


def _memo_factory(factory: Callable) -> Callable:
    cache: dict = {}

    def make(protocol, seed, size):
        key = (protocol.dataset, protocol.fold, protocol.shot, protocol.split, protocol.episodes, protocol.resize,
               protocol.images, getattr(protocol, "support_annotation", "mask"),
               protocol.fold_scheme, seed, size)
        if key not in cache:
            cache[key] = factory(protocol, seed, size)
        return cache[key]

    return make


def eval_factory(cfg: dict) -> Callable:
    """``dataset_factory`` with the recipe's root and extra dataset arguments."""
    kw = _dataset_kwargs(cfg, "val")
    root = kw.pop("root", None)
    return _memo_factory(dataset_factory(root, **kw))
