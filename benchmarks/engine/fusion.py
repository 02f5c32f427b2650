"""Prediction and evaluation of a network: the K-shot fusion strategies (paper Table 7), the predict
functions that :func:`benchmarks.scoring.protocols.evaluate_many` scores, :func:`evaluate_model` /
:func:`evaluate_fusions` (several strategies in one pass over the episodes) and the no-training
references (:func:`evaluate_reference`, :func:`has_prior`).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..scoring.protocols import EvaluationResult, Protocol, evaluate_many
from .device import amp_context
from .distributed import unwrap

__all__ = ["make_predict_fn", "make_fusions_predict_fn", "evaluate_model", "evaluate_fusions", "evaluate_reference",
           "has_prior"]

_PRIOR_KEYS = ("initial_pseudo_mask", "prior_mask")


def _fuse(probs: torch.Tensor, fusion: str) -> torch.Tensor:
    """``probs`` ``[K, B, H, W]`` foreground probabilities of K 1-shot runs → fused fg probability ``[B, H, W]``.

    ``average``: mean probability; ``vote``: fraction of shots whose argmax is foreground (a strict
    majority wins; a tie is background); ``or``: foreground where any shot says foreground.
    """
    if fusion == "average":
        return probs.mean(0)
    fg = (probs > 0.5).float()
    if fusion == "vote":
        return fg.mean(0)
    if fusion == "or":
        return fg.amax(0)
    raise ValueError(f"fusion: expected native, vote, average or or, got {fusion!r}")


def _prob_to_logits(fg: torch.Tensor) -> torch.Tensor:
    """fg probability ``[B, H, W]`` → log-probabilities ``[B, 2, H, W]`` (softmax gives back ``(1-fg, fg)``)."""
    p = torch.stack([1.0 - fg, fg], 1).clamp_min(1e-6)
    return p.log()


def _fg_prob(model: nn.Module, q, s, sm, *, amp, output: str, threshold: float) -> torch.Tensor:
    """Foreground probability ``[B, H, W]`` of one forward (``output='prior'``: the thresholded prior)."""
    with amp_context(q.device, amp):
        out = model(q, s, sm)
    if output == "logits":
        return torch.softmax(out["logits"].float(), 1)[:, 1]
    prior = next((out[k] for k in _PRIOR_KEYS if out.get(k) is not None), None)
    if prior is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no training-free prior output ({_PRIOR_KEYS})")
    p = F.interpolate(prior.float(), size=q.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
    return (p > threshold).float()


def make_fusions_predict_fn(model: nn.Module, fusions: Sequence[str], *, amp="auto", output: str = "logits",
                            threshold: float = 0.5) -> Callable[[dict], Dict[str, torch.Tensor]]:
    """``predict_fn(batch) -> {fusion: logits [B, 2, H, W]}`` for :func:`benchmarks.scoring.protocols.evaluate_many`.

    K-shot strategies (paper Table 7): ``native`` is the model's own K-shot (DPCN's foreground
    concatenation); ``vote``, ``average`` (mask average) and ``or`` run the model 1-shot once per support
    and fuse the K masks -- the K 1-shot forwards are run once and shared by those three. With one shot
    every strategy is the native prediction. ``output='prior'``: the training-free prior thresholded at
    ``threshold`` instead of the prediction.
    """
    fusions = list(fusions)
    for f in fusions:
        if f not in ("native", "vote", "average", "or"):
            raise ValueError(f"fusion: expected native, vote, average or or, got {f!r}")
    if not fusions:
        raise ValueError("fusions: expected at least one of native, vote, average, or")
    if output not in ("logits", "prior"):
        raise ValueError(f"output: expected 'logits' or 'prior', got {output!r}")

    def predict_fn(batch: dict) -> Dict[str, torch.Tensor]:
        q, s, sm = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        K = s.shape[1]
        kw = dict(amp=amp, output=output, threshold=threshold)
        native = per_shot = None
        out = {}
        for f in fusions:
            if f == "native" or K == 1:
                if native is None:
                    native = _prob_to_logits(_fg_prob(model, q, s, sm, **kw))
                out[f] = native
            else:
                if per_shot is None:
                    per_shot = torch.stack([_fg_prob(model, q, s[:, k:k + 1], sm[:, k:k + 1], **kw) for k in range(K)])
                out[f] = _prob_to_logits(_fuse(per_shot, f))
        return out

    return predict_fn


def make_predict_fn(model: nn.Module, *, fusion: str = "native", amp="auto", output: str = "logits",
                    threshold: float = 0.5) -> Callable[[dict], torch.Tensor]:
    """A ``predict_fn(batch) -> logits [B, 2, H, W]`` for :func:`benchmarks.scoring.protocols.evaluate`: one
    strategy of :func:`make_fusions_predict_fn` (``native``, ``vote``, ``average`` or ``or``)."""
    fn = make_fusions_predict_fn(model, [fusion], amp=amp, output=output, threshold=threshold)
    return lambda batch: fn(batch)[fusion]


def evaluate_model(model: nn.Module, protocol: Protocol, factory: Callable, *, device=None, fusion="native",
                   output="logits", amp="auto", batch_size: int = 1, num_workers: int = 0,
                   progress: bool = False) -> EvaluationResult:
    """:func:`benchmarks.scoring.protocols.evaluate` of ``model`` (put in ``eval()`` mode here, restored after)."""
    return evaluate_fusions(model, protocol, factory, [fusion], device=device, output=output, amp=amp,
                            batch_size=batch_size, num_workers=num_workers, progress=progress)[fusion]


def evaluate_fusions(model: nn.Module, protocol: Protocol, factory: Callable, fusions: Sequence[str], *,
                     device=None, output="logits", amp="auto", batch_size: int = 1, num_workers: int = 0,
                     progress: bool = False) -> Dict[str, EvaluationResult]:
    """Several K-shot strategies of ``model`` on the same episodes in one pass (shared 1-shot forwards)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = device if device is not None else next(net.parameters()).device
    try:
        return evaluate_many(make_fusions_predict_fn(net, fusions, amp=amp, output=output), factory, protocol,
                             batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    finally:
        net.train(was_training)


def has_prior(model: nn.Module) -> bool:
    """Whether the network outputs a training-free prior (DPCN's ``initial_pseudo_mask``, PFENet's ``prior_mask``)."""
    net = unwrap(model)
    name = type(net).__name__
    if name == "PFENet":
        return True
    return name == "DPCN" and bool(getattr(net, "use_prior", False))


def evaluate_reference(model: nn.Module, kind: str, protocol: Protocol, factory: Callable, **kw) -> Tuple[str, EvaluationResult]:
    """The no-training reference: ``prior`` (thresholded training-free prior) or ``untrained`` (the model as built)."""
    if kind == "prior":
        return "no training: prior mask > 0.5", evaluate_model(model, protocol, factory, output="prior", **kw)
    return f"no training: untrained {_model_label(model)}", evaluate_model(model, protocol, factory, **kw)


def _model_label(model) -> str:
    return getattr(unwrap(model), "_registry_name", type(unwrap(model)).__name__.lower())
