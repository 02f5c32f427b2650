"""Seed statistics of a comparison: mean ± std over training seeds, paired differences with 95 % intervals.

Every comparison script (``benchmarks/plug_in.py``) trains each network with several seeds on
identical episodes and reports, per fold, the seeds' values, their mean ± sample std, and the paired
difference ``b − a`` (seed ``s`` of ``b`` minus seed ``s`` of ``a``) with a Student-t 95 % interval over
the seeds. Over folds the difference is the mean of the fold means; its standard error comes from
the within-fold seed variances, ``SE = sqrt(Σ_f s_f² / n_f) / F`` with ``Σ_f (n_f − 1)`` degrees of
freedom (folds are fixed strata, not samples). With one seed per fold no interval exists (``None``).

Example:
    >>> a = {1: {0: 40.0, 1: 42.0, 2: 41.0}, 2: {0: 30.0, 1: 31.0, 2: 29.0}}
    >>> b = {1: {0: 42.0, 1: 43.0, 2: 44.0}, 2: {0: 31.0, 1: 33.0, 2: 30.0}}
    >>> d = paired_difference(a, b)
    >>> round(d["mean"], 3), d["df"], [round(x, 2) for x in d["ci95"]]
    (1.667, 4, [0.74, 2.59])
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = ["t_quantile_975", "mean_std", "paired_difference", "fold_average", "format_interval"]

# two-sided 95 % Student-t quantiles t_{0.975, df}
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]


def t_quantile_975(df: int) -> float:
    """``t_{0.975}`` for ``df >= 1`` degrees of freedom (table to 30, then the 1.96 + 2.4/df approximation)."""
    if df < 1:
        raise ValueError(f"df: expected >= 1, got {df}")
    return _T975[df - 1] if df <= 30 else 1.959964 + 2.4 / df


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std" (sample, None for one value), "n"}``."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std: no values")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return {"mean": m, "std": sd, "n": len(v)}


def _interval(mean: float, se: Optional[float], df: int) -> Optional[List[float]]:
    if se is None or df < 1:
        return None
    h = t_quantile_975(df) * se
    return [mean - h, mean + h]


def paired_difference(a: Mapping[int, Mapping[int, float]], b: Mapping[int, Mapping[int, float]]) -> dict:
    """``b − a`` from ``{fold: {seed: value}}`` tables, paired by seed (only seeds present in both).

    Returns ``{"folds": {fold: {"values", "mean", "std", "n", "ci95"}}, "mean", "se", "df", "ci95"}``.
    """
    folds = [f for f in a if f in b]
    if not folds:
        raise ValueError("paired_difference: no fold in common")
    per: Dict[int, dict] = {}
    for f in folds:
        seeds = sorted(s for s in a[f] if s in b[f])
        if not seeds:
            raise ValueError(f"paired_difference: fold {f} has no seed in common")
        d = [float(b[f][s]) - float(a[f][s]) for s in seeds]
        ms = mean_std(d)
        se = ms["std"] / math.sqrt(ms["n"]) if ms["std"] is not None else None
        per[f] = {"seeds": seeds, "values": d, **ms, "ci95": _interval(ms["mean"], se, ms["n"] - 1)}
    F = len(folds)
    mean = sum(per[f]["mean"] for f in folds) / F
    df = sum(per[f]["n"] - 1 for f in folds)
    if all(per[f]["std"] is not None for f in folds):
        se = math.sqrt(sum(per[f]["std"] ** 2 / per[f]["n"] for f in folds)) / F
    else:
        se = None
    return {"folds": per, "mean": mean, "se": se, "df": df, "ci95": _interval(mean, se, df)}


def fold_average(table: Mapping[int, Mapping[int, float]]) -> Dict[str, Optional[float]]:
    """Per-fold mean ± std over seeds and the mean over folds: ``{"folds": {f: mean_std}, "mean", "std"}``
    where ``std`` is the std over seeds of the fold-averaged value (seeds present in every fold)."""
    folds = list(table)
    per = {f: mean_std(list(table[f].values())) for f in folds}
    common = set.intersection(*(set(table[f]) for f in folds)) if folds else set()
    avg = [sum(table[f][s] for f in folds) / len(folds) for s in sorted(common)]
    ms = mean_std(avg) if avg else {"mean": sum(per[f]["mean"] for f in folds) / len(folds), "std": None, "n": 0}
    return {"folds": per, "mean": sum(per[f]["mean"] for f in folds) / len(folds), "std": ms["std"],
            "seeds_in_every_fold": len(common)}


def format_interval(ci: Optional[Sequence[float]]) -> str:
    """``[lo, hi]`` with signs, or ``n/a`` (one seed)."""
    return "n/a" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
