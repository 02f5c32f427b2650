"""Training/evaluation recipes: YAML files, command-line overrides, the resolved config saved with a run.

A config is a nested ``dict`` with five sections (every key and its default is in :data:`DEFAULTS`):

``model``  which network (``name``, ``backbone``, ``backbone_weights``, ``shot``), its DCM (``dcm``,
           :mod:`models.dcm_spec`) and ``flags`` passed to :func:`models.build_model` unchanged (e.g.
           ``{sam_windows: [[1, 1]]}``);
``data``   dataset, root, fold, transforms, episodes per epoch, workers, extra dataset arguments;
``train``  SGD + poly schedule, epochs, batch, layer4 fine-tuning (docs/CONVENTIONS.md#layer4-fine-tuning),
           seed, AMP, validation;
``eval``   the evaluation protocol of the final test (episodes, seeds, resolution, scales, fusion);
``run``    output folder, logging, device.

A recipe file may start from another with ``_base_: other.yaml`` (path relative to the file); keys are
merged section by section, and a key that is not in :data:`DEFAULTS` is an error naming the closest
valid key (``model.flags``, ``model.dcm`` and the ``*_args`` dictionaries are free-form). Overrides are
``dotted.key=value`` strings whose value is parsed as YAML (``train.lr=0.01``,
``model.flags={reduce_dim: 64}``, ``eval.scales=[473,641]``).

Example:
    >>> cfg = load_config(None, ["train.epochs=3", "model.flags.reduce_dim=64"])
    >>> cfg["train"]["epochs"], cfg["model"]["flags"], cfg["train"]["momentum"]
    (3, {'reduce_dim': 64}, 0.9)
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import yaml

__all__ = ["DEFAULTS", "ConfigError", "show_deprecations", "load_config", "apply_overrides", "merge", "save_config", "dump_config",
           "add_config_args", "overrides_from_args", "CLI_FLAGS",
           "CONFIG_DIR", "resolve_recipe", "choose_recipe", "host_of"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: every recognised key with its default (the synthetic CPU demo; recipes in configs/ set the paper's values)
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "model": {
        "name": "dpcn",                # dpcn | baseline | pfenet | pfenet+dcm | canet | canet+dcm
        "backbone": "efficientnet_lite0",
        "backbone_weights": "imagenet",  # "imagenet" (lite0 only, offline), "random", or a local file
        "shot": 1,
        "dcm": None,                   # the DCM (models/dcm_spec.py): null = the model's default, none, a preset
                                       # name (paper | default) or a mapping {preset: ..., <field>: ...}
        "flags": {},                   # passed to build_model(**flags) unchanged
        "config_version": None,        # the release conventions of this section (models/migrate.py); a recipe
                                       # without it describes this release's networks
    },
    "data": {
        "dataset": "synthetic",        # synthetic | pascal | coco | fss
        "root": None,                  # dataset folder (not needed for synthetic)
        "fold": 0,
        "train_size": None,            # PFENet training crop (473); None = the dataset's own transform
        "scale": [0.9, 1.1],           # RandScale range (COCO: [0.8, 1.25])
        "rotate": [-10.0, 10.0],
        "augment": "pfenet",           # training augmentation with train_size: pfenet (scale, rotate, blur, flip,
                                       # crop) | flip (test_resize to train_size + horizontal flip: repeatable
                                       # inputs, what train.cache_backbone needs to pay off)
        "test_size": None,             # test letterbox size (473); None = the dataset's own transform
        "test_resize": "letterbox",    # letterbox | shrink | squash | none (docs/PROTOCOLS.md#test-resizing)
        "train_episodes": None,        # episodes per training epoch; None = one per query image
        "num_workers": 2,
        "args": {},                    # extra keyword arguments for both splits' dataset constructors
        "train_args": {},              # ... for the training split only
        "val_args": {},                # ... for the validation / test split only
    },
    "train": {
        "epochs": 200,
        "batch_size": 8,               # per process (DDP: global batch = batch_size × world size)
        "optimizer": "sgd",            # sgd (the paper) | adamw (the synthetic CPU demo: learns in minutes)
        "lr": 0.005,
        "lr_multiplier": 1.0,          # 10 reproduces PFENet's released code (docs/CONVENTIONS.md#lr-multiplier)
        "momentum": 0.9,
        "weight_decay": 1.0e-4,
        "power": 0.9,                  # poly schedule, updated every iteration
        "warmup_iters": 0,
        "finetune_layer4": False,      # PASCAL True (paper), COCO False
        "layer4_start_epoch": 100,     # layer4 frozen before this epoch (0-based), then trained
        "layer4_lr_scale": 1.0,        # layer4 lr = lr × this (paper: "same learning rate")
        "grad_clip": None,             # max gradient norm, None = off
        "seed": 321,
        "amp": "auto",                 # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
        "val_every": 1,                # validate every N epochs (and always after the last)
        "val_episodes": 1000,          # episodes of the per-epoch validation (best-checkpoint selection)
        "val_seed": 321,
        "val_batch_size": 8,
        "checkpoint_every_iters": 0,   # also checkpoint inside an epoch every N iterations (0 = only at epoch end)
        "val_split": "val",            # split of the per-epoch validation (val | test)
        "cache_backbone": False,       # memoise the frozen backbone's features per input (benchmarks/engine/feature_cache.py)
        "cache_backbone_gb": 8.0,      # memory cap of that cache (GiB); with a dir: new features are spilled to
                                       # the dir at min(this, 0.5 GiB), nothing stops being stored
        "cache_backbone_dir": None,    # on-disk feature store shared by every process and session (memory-mapped)
        "deterministic": True,         # torch.use_deterministic_algorithms(warn_only) + cudnn.deterministic
    },
    "eval": {
        "enabled": True,               # evaluate the best checkpoint after training
        "preset": None,                # a published protocol (pfenet | bam | hsnet | dpcn) instead of the keys below
        "split": "val",                # split of the final test (val | test); pascal image_split: val, test
        "episodes": 1000,
        "seeds": [321],
        "batch_size": 1,
        "scales": None,                # test input sizes; None = [data.test_size]; several = multi-scale (DPCN: [473, 641])
        "resolution": "original",      # original (PFENet ori_resize, docs/PROTOCOLS.md#test-resizing) | original_crop | input
        "episode_iou": False,          # also report the episode-wise mean foreground IoU
        "fusion": "native",            # K-shot: native (the model's own) | vote | average | or (Table 7)
        "reference": "auto",           # no-training reference(s): auto | prior | untrained | none, or a list
    },
    "run": {
        "out_dir": "runs",
        "name": None,                  # run folder name (default: <model>_<dataset>_f<fold>_<shot>shot)
        "device": "auto",              # auto | cpu | cuda | cuda:N
        "tensorboard": "auto",         # auto (if importable) | true | false
        "progress": True,              # tqdm bars (drawn only when stderr is a terminal)
        "log_every": 10,               # iterations between JSON-lines log records
        "threads": None,               # torch.set_num_threads (None = leave)
        "move_aside": False,           # a new run into a folder that holds another run: rename that folder to
                                       # <name>.old-<time> first (false: refuse; benchmarks/engine/runfolder.py)
    },
}

# dictionaries whose content is not checked against DEFAULTS
_FREE = {("model", "flags"), ("model", "dcm"), ("data", "args"), ("data", "train_args"), ("data", "val_args")}


class ConfigError(ValueError):
    """A recipe or an override names an unknown key or has a malformed value."""


def _keys(d: dict, prefix: str = "") -> List[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict) and tuple((prefix + k).split(".")) not in _FREE:
            out += _keys(v, prefix + k + ".")
    return out


def _unknown(path: str) -> ConfigError:
    near = difflib.get_close_matches(path, _keys(DEFAULTS), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; sections: {', '.join(DEFAULTS)}"
    return ConfigError(f"unknown config key '{path}'{hint}")


def merge(base: dict, update: dict, _path: tuple = ()) -> dict:
    """Merge ``update`` into a copy of ``base``; keys must exist in ``base`` except inside free-form dicts."""
    out = copy.deepcopy(base)
    for k, v in (update or {}).items():
        path = _path + (str(k),)
        if k not in out:
            raise _unknown(".".join(path))
        if isinstance(out[k], dict) and not (path in _FREE and not isinstance(v, dict)):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{'.'.join(path)}' is a section; expected a mapping, got {v!r}")
            out[k] = _merge_free(out[k], v) if path in _FREE else merge(out[k], v, path)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_free(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge_free(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_yaml(path: Path, _seen: Optional[set] = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    _seen = set() if _seen is None else _seen
    if path.resolve() in _seen:
        raise ConfigError(f"config '{path}': _base_ cycle")
    _seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    parent = _read_yaml(path.parent / base, _seen)
    return _merge_free(parent, data)


def resolve_recipe(name_or_path: Union[str, os.PathLike]) -> Path:
    """A recipe path as given, or ``configs/<name>.yaml`` for a bare name (``dpcn_pascal_resnet50``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = CONFIG_DIR / (p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml")
    if cand.is_file():
        return cand
    avail = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name_or_path}' not found (neither a file nor one of configs/: {', '.join(avail)})")


def host_of(model: Optional[str]) -> str:
    """The host family of a registry model name: ``dpcn`` for ``dpcn`` and ``baseline`` (and ``None``),
    ``pfenet`` for ``pfenet`` and ``pfenet+dcm``, ``canet`` for ``canet`` and ``canet+dcm``."""
    family = str(model or "dpcn").strip().lower().split("+")[0]
    return "dpcn" if family == "baseline" else family


def choose_recipe(config: Union[None, str, os.PathLike], model: Optional[str] = None,
                  dataset: Optional[str] = None) -> Union[str, os.PathLike]:
    """The recipe a command runs, by one rule for every command (``examples/train_dpcn.py``,
    ``benchmarks/plug_in.py``): ``config`` as given when there is one (a YAML path or a name in
    ``configs/``, resolved by :func:`load_config`), else the default recipe of the network ``model`` (a
    registry name, default ``dpcn``) on ``dataset`` (default ``synthetic``), named after its host
    (:func:`host_of`):

    * on the synthetic set: ``synthetic`` for DPCN and its Baseline, ``plug_in_<host>_synthetic`` for the
      other hosts;
    * on a real dataset: ``<host>_<dataset>`` (``pfenet_pascal``, ``dpcn_coco``, ...).

    Raises:
        ConfigError: ``model`` is not a registry name, or its default recipe has no file in ``configs/``
            (the message asks for ``--config``).

    Example:
        >>> choose_recipe(None, "pfenet+dcm", "pascal"), choose_recipe(None, "baseline"), choose_recipe("my.yaml", "canet")
        ('pfenet_pascal', 'synthetic', 'my.yaml')
    """
    if config:
        return config
    from models.registry import MODELS, list_models
    if model is not None and str(model).strip().lower() not in MODELS:
        raise ConfigError(f"unknown model {model!r}; valid names: {', '.join(list_models())}")
    host = host_of(model)
    if dataset in (None, "synthetic"):
        name = "synthetic" if host == "dpcn" else f"plug_in_{host}_synthetic"
    else:
        name = f"{host}_{dataset}"
    if not (CONFIG_DIR / f"{name}.yaml").is_file():
        raise ConfigError(f"no recipe configs/{name}.yaml for {model or 'dpcn'} on '{dataset or 'synthetic'}'; "
                          f"pass --config FILE")
    return name


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` strings (value parsed as YAML) to a copy of ``cfg``.

    Example:
        >>> apply_overrides(DEFAULTS, ["eval.scales=[473, 641]"])["eval"]["scales"]
        [473, 641]
    """
    out = copy.deepcopy(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=0.01")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': malformed key '{key}'")
        upd: Any = _parse_value(text.strip())
        for p in reversed(parts):
            upd = {p: upd}
        out = merge(out, upd)
    return out


def _validate(cfg: dict) -> dict:
    t, d, e, m = cfg["train"], cfg["data"], cfg["eval"], cfg["model"]
    def pos(sec, key, v, integer=False, zero=False):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= 0 if zero else v > 0)
        if integer:
            ok = ok and float(v).is_integer()
        if not ok:
            raise ConfigError(f"{sec}.{key}: expected a {'non-negative' if zero else 'positive'} "
                              f"{'integer' if integer else 'number'}, got {v!r}")
    for k in ("epochs", "batch_size", "val_every", "val_episodes", "val_batch_size"):
        pos("train", k, t[k], integer=True)
    for k in ("lr", "lr_multiplier"):
        pos("train", k, t[k])
    for k in ("momentum", "weight_decay", "power", "layer4_lr_scale"):
        pos("train", k, t[k], zero=True)
    for k in ("warmup_iters", "layer4_start_epoch", "checkpoint_every_iters", "seed", "val_seed"):
        pos("train", k, t[k], integer=True, zero=True)
    pos("model", "shot", m["shot"], integer=True)
    pos("eval", "episodes", e["episodes"], integer=True)
    pos("eval", "batch_size", e["batch_size"], integer=True)
    pos("data", "num_workers", d["num_workers"], integer=True, zero=True)
    if t["optimizer"] not in ("sgd", "adamw"):
        raise ConfigError(f"train.optimizer: expected sgd or adamw, got {t['optimizer']!r}")
    if t["amp"] not in ("auto", "bf16", "fp16", "off", False, None):
        raise ConfigError(f"train.amp: expected auto, bf16, fp16 or off, got {t['amp']!r}")
    if e["fusion"] not in ("native", "vote", "average", "or"):
        raise ConfigError(f"eval.fusion: expected native, vote, average or or, got {e['fusion']!r}")
    if e["resolution"] not in ("original", "original_crop", "input"):
        raise ConfigError(f"eval.resolution: expected original, original_crop or input, got {e['resolution']!r}")
    if e["preset"] not in (None, "pfenet", "bam", "hsnet", "dpcn"):
        raise ConfigError(f"eval.preset: expected pfenet, bam, hsnet, dpcn or null, got {e['preset']!r}")
    refs = e["reference"] if isinstance(e["reference"], list) else [e["reference"]]
    for r in refs:
        if r not in ("auto", "prior", "untrained", "none", None, False):
            raise ConfigError(f"eval.reference: expected auto, prior, untrained, none or a list of them, got {r!r}")
    if isinstance(e["seeds"], int):
        e["seeds"] = [e["seeds"]]
    if not e["seeds"] or not all(isinstance(s, int) and s >= 0 for s in e["seeds"]):
        raise ConfigError(f"eval.seeds: expected a list of non-negative integers, got {e['seeds']!r}")
    if isinstance(e["scales"], (int, float)):
        e["scales"] = [int(e["scales"])]
    if e["scales"] is not None and (not e["scales"] or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in e["scales"])):
        raise ConfigError(f"eval.scales: expected a list of input sizes (integers >= 8) or null, got {e['scales']!r}")
    for k in ("scale", "rotate"):
        v = d[k]
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)):
            raise ConfigError(f"data.{k}: expected [min, max], got {v!r}")
    if d["dataset"] != "synthetic" and not d["root"]:
        raise ConfigError(f"data.root: dataset '{d['dataset']}' needs its folder (--data-root PATH)")
    _validate_dataset_args(d)
    if not isinstance(m["flags"], dict):
        raise ConfigError(f"model.flags: expected a mapping, got {m['flags']!r}")
    if m["dcm"] is not None and not isinstance(m["dcm"], (str, dict)):
        raise ConfigError(f"model.dcm: expected null, none, a preset name or a mapping of DCMSpec fields, got {m['dcm']!r}")
    if d["augment"] not in ("pfenet", "flip"):
        raise ConfigError(f"data.augment: expected pfenet or flip, got {d['augment']!r}")
    for sec, key, v in (("train", "val_split", t["val_split"]), ("eval", "split", e["split"])):
        if v not in ("val", "test"):
            raise ConfigError(f"{sec}.{key}: expected val or test, got {v!r}")
    for key in ("args", "val_args"):
        if "support_annotation" in (d[key] or {}):
            raise ConfigError(f"data.{key}.support_annotation: box supports are a training option here "
                              f"(data.train_args.support_annotation); the evaluation's is a protocol field "
                              f"(benchmarks/evaluate.py --support-annotation box)")
    if (d["train_args"] or {}).get("support_annotation", "mask") not in ("mask", "box"):
        raise ConfigError(f"data.train_args.support_annotation: expected mask or box, got "
                          f"{d['train_args']['support_annotation']!r}")
    if not isinstance(cfg["run"]["move_aside"], bool):
        raise ConfigError(f"run.move_aside: expected true or false, got {cfg['run']['move_aside']!r}")
    if not isinstance(t["cache_backbone"], bool):
        raise ConfigError(f"train.cache_backbone: expected true or false, got {t['cache_backbone']!r}")
    pos("train", "cache_backbone_gb", t["cache_backbone_gb"], zero=True)
    if t["cache_backbone_dir"] is not None and not isinstance(t["cache_backbone_dir"], str):
        raise ConfigError(f"train.cache_backbone_dir: expected a folder path or null, got {t['cache_backbone_dir']!r}")
    return cfg


#: dataset arguments the engine sets itself (from data.fold, model.shot, the split, the protocol)
_ENGINE_DATASET_ARGS = {"self", "fold", "shot", "split", "episodes", "seed", "transform"}


def _validate_dataset_args(d: dict) -> None:
    """``data.fold`` among the dataset's folds (0-3; FSS-1000 has none) and every key of ``data.args`` /
    ``data.train_args`` / ``data.val_args`` an argument of the dataset's class."""
    import inspect

    from ..datasets import DATASETS
    name = str(d["dataset"]).lower()
    cls = DATASETS.get(name)
    if cls is None:
        raise ConfigError(f"data.dataset: expected one of {', '.join(sorted(DATASETS))}, got {d['dataset']!r}")
    if name not in ("fss", "fss1000") and (isinstance(d["fold"], bool) or d["fold"] not in (0, 1, 2, 3)):
        raise ConfigError(f"data.fold: dataset '{name}' has folds 0, 1, 2 and 3, got {d['fold']!r}")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = sorted(set(params) - _ENGINE_DATASET_ARGS - {"root"})
    for key in ("args", "train_args", "val_args"):
        args = d[key] or {}
        if not isinstance(args, dict):
            raise ConfigError(f"data.{key}: expected a mapping of dataset arguments, got {args!r}")
        for k in args:
            if k == "root":
                raise ConfigError(f"data.{key}.root: the dataset folder is data.root (--data-root PATH)")
            if k not in valid:
                raise ConfigError(f"data.{key}.{k}: dataset '{name}' takes no argument '{k}'; its arguments: "
                                  f"{', '.join(valid)}")


def load_config(recipe: Union[None, str, os.PathLike] = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults ← recipe file (with its ``_base_`` chain) ← overrides; validated.

    Args:
        recipe: ``None`` (the built-in synthetic CPU default), a YAML path, or a name in ``configs/``.
        overrides: ``["train.lr=0.01", ...]`` applied last.

    Raises:
        ConfigError: unknown key (with the closest valid key), missing file, malformed value.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if recipe is not None:
        path = resolve_recipe(recipe)
        cfg = merge(cfg, _read_yaml(path))
    cfg = apply_overrides(cfg, overrides)
    return _current_model(_validate(cfg))


def show_deprecations() -> None:
    """Show the library's ``DeprecationWarning`` s (a config's flat ``dcm_*`` flags, old arm tokens) in a
    command's output, once per place: Python's default filter shows them only for code run as
    ``__main__``, and these are raised inside ``models`` and ``benchmarks``. The commands call it first."""
    import warnings
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"(benchmarks|models)(\.|$)")


def _current_model(cfg: dict) -> dict:
    """The model section in this release's form (:func:`models.migrate.migrate_model_config`): a recipe
    without ``model.config_version`` describes this release's networks, so it is stamped with it first
    (flat ``dcm_*`` flags in it keep today's defaults, with a ``DeprecationWarning``)."""
    from models.migrate import CONFIG_VERSION, migrate_model_config
    model = dict(cfg["model"])
    if model.get("config_version") is None:
        model["config_version"] = CONFIG_VERSION
    try:
        cfg["model"] = migrate_model_config(model)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    return cfg


def dump_config(cfg: dict) -> str:
    """The config as YAML text (sections in the order of :data:`DEFAULTS`)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def save_config(cfg: dict, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config atomically (a uniquely named temporary file + ``os.replace``,
    :func:`benchmarks.engine.runfolder.atomic_write`) and return the path."""
    from .runfolder import atomic_write
    text = dump_config(cfg)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# =============================================================================== command lines
#: explicit flags shared by the entry points -> config keys
CLI_FLAGS = {
    "model": "model.name", "backbone": "model.backbone", "backbone_weights": "model.backbone_weights",
    "shot": "model.shot", "dataset": "data.dataset", "data_root": "data.root", "fold": "data.fold",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
    "lr_multiplier": "train.lr_multiplier", "seed": "train.seed", "workers": "data.num_workers",
    "train_episodes": "data.train_episodes", "val_episodes": "train.val_episodes",
    "episodes": "eval.episodes", "device": "run.device", "out": "run.out_dir", "name": "run.name",
    "fusion": "eval.fusion",
}


def add_config_args(parser, *, include: Optional[Sequence[str]] = None) -> None:
    """Add ``--config``, ``--set`` and the explicit flags of :data:`CLI_FLAGS` (all default ``None`` = keep)."""
    helps = {
        "model": "network: dpcn, baseline, pfenet, pfenet+dcm, canet, canet+dcm",
        "backbone": "resnet50, resnet101, resnet50_v2, resnet101_v2, vgg16_bn, efficientnet_lite0",
        "backbone_weights": "'imagenet' (efficientnet_lite0, offline), 'random', or a local weights file",
        "shot": "K shots per episode", "dataset": "synthetic (default), pascal, coco, fss",
        "data_root": "dataset folder (PASCAL: the VOC2012 folder; COCO: the folder with the annotations)",
        "fold": "fold 0-3", "epochs": "training epochs", "batch_size": "episodes per iteration (per process)",
        "lr": "base learning rate", "lr_multiplier": "multiply every group's lr (10 = PFENet's released code)",
        "seed": "training seed", "workers": "DataLoader workers", "train_episodes": "training episodes per epoch",
        "val_episodes": "episodes of the per-epoch validation", "episodes": "episodes of the final test",
        "device": "auto, cpu, cuda, cuda:N", "out": "parent folder of the run folders", "name": "run folder name",
        "fusion": "K-shot fusion: native, vote, average, or",
    }
    types = {"shot": int, "fold": int, "epochs": int, "batch_size": int, "lr": float, "lr_multiplier": float,
             "seed": int, "workers": int, "train_episodes": int, "val_episodes": int, "episodes": int}
    parser.add_argument("--config", "-c", default=None,
                        help="recipe: a YAML file or a name in configs/ (e.g. dpcn_pascal)")
    for dest in (include if include is not None else CLI_FLAGS):
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, type=types.get(dest, str), default=None,
                            help=f"{helps[dest]} (config key {CLI_FLAGS[dest]})")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set train.lr=0.01 --set model.flags.reduce_dim=64 "
                             "(repeatable; value parsed as YAML)")


def overrides_from_args(args) -> List[str]:
    """``key=value`` strings for the explicit flags that were given, then the ``--set`` ones."""
    out = []
    for dest, key in CLI_FLAGS.items():
        v = getattr(args, dest, None)
        if v is not None:
            out.append(f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                       if not isinstance(v, str) else f"{key}={_quote(v)}")
    return out + list(getattr(args, "overrides", []) or [])


def _quote(s: str) -> str:
    """A string value that YAML will read back as the same string (paths like ``1e-3`` or ``on``)."""
    parsed = _parse_value(s)
    return s if isinstance(parsed, str) and parsed == s else yaml.safe_dump(s, default_flow_style=True).strip().removesuffix("...").strip()
