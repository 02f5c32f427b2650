"""The final evaluation of a run: its best checkpoint under the recipe's protocol, as ``results.json`` records it.

:func:`~benchmarks.engine.trainer.train` runs it once training is done (:func:`final_evaluation` of the
trainer's best weights, beside the no-training references); :func:`evaluate_run` runs it again on a
finished run folder without training, e.g. on the test split after the model choices were made on ``val``
(``benchmarks/plug_in.py --split test --resume``). Both return the same record::

    {"protocol", "protocol_text", "fusion", "rows": [{"label", "miou", "fbiou", ...}], "best", "train_seconds"}

(:func:`evaluate_run` adds ``"from_checkpoint": true``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from torch import nn

from ..scoring.protocols import EvaluationResult, Protocol
from .checkpoints import load_checkpoint_model
from .device import resolve_device
from .from_config import eval_factory, eval_protocol
from .fusion import evaluate_model

__all__ = ["evaluate_run", "final_evaluation", "eval_kwargs"]


def eval_kwargs(cfg: dict, device, progress: bool = False) -> dict:
    """The keyword arguments of :func:`~benchmarks.engine.fusion.evaluate_model` (and of the references) under
    ``cfg``: K-shot fusion, AMP, batch size and DataLoader workers of the recipe."""
    return dict(device=device, fusion=cfg["eval"]["fusion"], amp=cfg["train"]["amp"],
                batch_size=int(cfg["eval"]["batch_size"]), num_workers=int(cfg["data"]["num_workers"]),
                progress=progress)


def final_evaluation(model: nn.Module, cfg: dict, protocol: Protocol, factory: Callable, *, best: dict,
                     train_seconds: Optional[float], device, refs: Sequence[Tuple[str, EvaluationResult]] = (),
                     progress: bool = False) -> Tuple[List[Tuple[str, EvaluationResult]], dict]:
    """Evaluate ``model`` (the run's best weights; ``best`` is the run's ``{"miou", "fbiou", "epoch"}``) under
    ``protocol``. Returns ``(rows, record)``: the rows ``refs + [("trained <model> (best epoch N)", result)]``
    and the results record of the module docstring (values as computed: NaN stays NaN)."""
    r = evaluate_model(model, protocol, factory, **eval_kwargs(cfg, device, progress))
    rows = list(refs) + [(f"trained {cfg['model']['name']} (best epoch {best.get('epoch')})", r)]
    record = {"protocol": protocol.as_dict(), "protocol_text": protocol.describe(), "fusion": cfg["eval"]["fusion"],
              "rows": [{"label": label, **x.as_dict()} for label, x in rows], "best": best,
              "train_seconds": train_seconds}
    return rows, record


def evaluate_run(cfg: dict, run_dir, split: Optional[str] = None) -> dict:
    """The final evaluation of the finished run in ``run_dir`` (its ``best.pth`` and ``results.json``) under
    ``cfg``'s protocol, on ``split`` (``val`` / ``test``; default ``cfg["eval"]["split"]``), without training
    and without writing anything. With ``train.cache_backbone`` the backbone's feature cache is attached as in
    training. Returns the results record with ``"from_checkpoint": True``; ``best`` and ``train_seconds`` are
    the run's own (from its ``results.json``)."""
    if split is not None:
        cfg = copy.deepcopy(cfg)
        cfg["eval"]["split"] = split
    run_dir = Path(run_dir)
    prev = json.loads((run_dir / "results.json").read_text())
    device = resolve_device(cfg["run"]["device"])
    model, _ = load_checkpoint_model(run_dir / "best.pth", device=device, cfg=cfg)
    if cfg["train"]["cache_backbone"]:
        from .feature_cache import attach_from_config
        attach_from_config(model, cfg)
    _, record = final_evaluation(model, cfg, eval_protocol(cfg), eval_factory(cfg), best=prev["best"],
                                 train_seconds=prev.get("train_seconds"), device=device)
    record["from_checkpoint"] = True
    return record
