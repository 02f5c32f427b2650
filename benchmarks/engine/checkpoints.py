"""Checkpoints and reproducibility: the atomic ``torch.save`` every checkpoint goes through
(:func:`atomic_save`), the RNG states a checkpoint stores and a resumed run restores
(:func:`rng_state`, :func:`set_rng_state`, :func:`seed_everything`), and the rebuilding of a trained
network from a checkpoint file (:func:`load_checkpoint_model`, for evaluation and prediction).

This module does not import the trainer (:mod:`benchmarks.engine.trainer`): ``benchmarks/evaluate.py``,
``examples/predict.py`` and :mod:`benchmarks.engine.inference` load checkpoints without it. The trainer calls
``checkpoints.atomic_save`` through this module, so a test that replaces
``benchmarks.engine.checkpoints.atomic_save`` sees every checkpoint a run writes.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .config import _validate as validate_config
from .config import apply_overrides
from .errors import first_line
from .from_config import build_model_from_config
from .runfolder import atomic_write

__all__ = ["atomic_save", "load_checkpoint_model", "strip_module_prefix", "rng_state", "set_rng_state",
           "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices)."""
    seed = int(seed) % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The RNG states of ``random``, ``numpy``, ``torch`` CPU and (if initialised) CUDA."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):  # fewer GPUs than when saved
            pass


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save`` to a uniquely named temporary file beside ``path``, then ``os.replace``
    (:func:`~benchmarks.engine.runfolder.atomic_write`): a crash never leaves a truncated file, and
    concurrent writers of one path never share a temporary file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def strip_module_prefix(state: dict) -> dict:
    """Remove the ``module.`` prefix that (Distributed)DataParallel adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _with_defaults(cfg: dict, path) -> dict:
    """A saved config with every key of today's defaults filled in (a checkpoint written before a key
    existed keeps working); a key today's code does not know is an error naming the checkpoint."""
    from .config import ConfigError, DEFAULTS, merge
    try:
        return merge(DEFAULTS, cfg)
    except ConfigError as e:
        raise ValueError(f"checkpoint '{path}': its config does not fit this version of the code ({e})") from None


def load_checkpoint_model(path: Union[str, os.PathLike], *, device="cpu", cfg: Optional[dict] = None,
                          overrides: Sequence[str] = ()) -> Tuple[nn.Module, dict]:
    """Rebuild the network of a training checkpoint (its saved config) and load its weights.

    ``cfg`` replaces the saved config (for a bare ``state_dict`` file it is required); ``overrides``
    are ``key=value`` strings (:func:`benchmarks.engine.config.apply_overrides`) applied to it and validated.
    Returns ``(model.eval(), cfg)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint '{path}' cannot be read by torch.load ({type(e).__name__}: "
                         f"{first_line(e) or 'truncated or not a torch file'})") from None
    state = ck.get("model") if isinstance(ck, dict) and "model" in ck else ck
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint '{path}' holds no state dict (a {type(state).__name__})")
    if cfg is None:
        cfg = ck.get("config") if isinstance(ck, dict) else None
        if cfg is None:
            raise ValueError(f"checkpoint '{path}' holds no config (a bare state dict); load it with "
                             f"benchmarks.engine.load_checkpoint_model(path, cfg=...) and the config it was trained with")
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):  # a config of its release: read as this one's
            from models.migrate import migrate_model_config
            try:
                cfg = {**cfg, "model": migrate_model_config(cfg["model"])}
            except (ValueError, TypeError) as e:
                raise ValueError(f"checkpoint '{path}': its model config cannot be read ({first_line(e)})") from None
    cfg = _with_defaults(cfg, path)
    if overrides:
        new_ds = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "data.dataset"]
        if new_ds and new_ds[-1] != cfg["data"]["dataset"]:
            # the saved dataset arguments (e.g. the synthetic set's image_size) belong to the old dataset
            cfg["data"]["args"], cfg["data"]["train_args"], cfg["data"]["val_args"] = {}, {}, {}
        cfg = validate_config(apply_overrides(cfg, overrides))
    try:
        model = build_model_from_config(cfg, backbone_weights="random")
    except (TypeError, ValueError) as e:  # the config names another model than its flags are for
        why = first_line(e).split(" -- ")[0]  # without the recipe hint of build_model_from_config
        raise ValueError(f"checkpoint '{path}': its config names model '{cfg['model']['name']}', which cannot be "
                         f"built with the config's flags ({why}); model.name and model.flags must describe the "
                         f"network the weights belong to (fix the config's model.name, or drop a --model / "
                         f"--set model.* that changes it)") from None
    if isinstance(ck, dict) and ck.get("layer4_on"):
        model.backbone.set_layer4_trainable(True)
    state = strip_module_prefix(state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch: the overrides / config describe another network
        raise ValueError(f"checkpoint '{path}' does not fit model '{cfg['model']['name']}' "
                         f"({cfg['model']['backbone']}, flags {cfg['model']['flags']}): {first_line(e, 1)}; "
                         f"leave the architecture as the checkpoint's config has it") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint '{path}' does not match model '{cfg['model']['name']}' "
                         f"({cfg['model']['backbone']}): {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    model.to(device).eval()
    model._registry_name = cfg["model"]["name"]
    return model, cfg
