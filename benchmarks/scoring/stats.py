"""Statistics of a comparison: mean ± std over training seeds, paired differences with two 95 % intervals.

Every comparison script (``benchmarks/plug_in.py``) trains each network with several seeds on
identical episodes and reports, per fold, the seeds' values, their mean ± sample std, and the paired
difference ``b − a`` (seed ``s`` of ``b`` minus seed ``s`` of ``a``) with two intervals:

* **seed interval** (:func:`paired_difference`): a Student-t 95 % interval over the training seeds, the
  test episodes held fixed. Over folds the difference is the mean of the fold means; its standard
  error comes from the within-fold seed variances, ``SE² = Σ_f v_f / F²`` with ``v_f = s_f² / n_f``
  (folds are fixed strata, not samples), and the degrees of freedom are Welch–Satterthwaite's,
  ``df = (Σ_f v_f)² / Σ_f v_f² / (n_f − 1)`` (fractional; the t quantile comes from ``scipy.stats``).
  With one seed in a fold no interval exists (``None``).
* **seed × test-image interval** (:func:`bootstrap_difference`): a paired two-level bootstrap from
  the runs' per-episode intersections and unions. Each replicate resamples, in every fold, the query
  images within each class (one draw shared by every seed and every arm: they all see the same
  episodes) and the training seeds (one draw shared by both arms), recomputes every class IoU as
  ``ΣI / ΣU`` over the resampled episodes and the fold's class mIoU, and takes the difference of the
  arms' mean over the resampled seeds; over folds, the mean of the fold differences. The interval is
  the 2.5 / 97.5 % percentiles of the replicates.

A claim is decided by the wider of the two (:func:`wider`).

Example:
    >>> a = {1: {0: 40.0, 1: 42.0, 2: 41.0}, 2: {0: 30.0, 1: 31.0, 2: 29.0}}
    >>> b = {1: {0: 42.0, 1: 43.0, 2: 44.0}, 2: {0: 31.0, 1: 33.0, 2: 30.0}}
    >>> d = paired_difference(a, b)
    >>> round(d["mean"], 3), round(d["df"], 2), [round(x, 2) for x in d["ci95"]]
    (1.667, 3.2, [0.64, 2.69])
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["t_quantile_975", "welch_df", "mean_std", "paired_difference", "bootstrap_difference", "wider",
           "fold_average", "format_interval", "restate"]

EPS = 1e-10  # the class-IoU denominator's epsilon of benchmarks.scoring.metrics


def t_quantile_975(df: float) -> float:
    """``t_{0.975}`` of Student's t with ``df > 0`` (possibly fractional) degrees of freedom (``scipy.stats.t``)."""
    from scipy.stats import t
    if not df > 0:
        raise ValueError(f"df: expected > 0, got {df}")
    return float(t.ppf(0.975, df))


def welch_df(variances: Sequence[float], ns: Sequence[int]) -> float:
    """Welch–Satterthwaite degrees of freedom of ``Σ_f v_f`` with ``v_f = variances[f] / ns[f]``.

    ``variances`` are the strata's sample variances, ``ns`` their sizes (each >= 2). When every variance
    is 0 the sum has no spread and any df gives a zero-width interval: ``Σ (n_f − 1)`` is returned.
    """
    if len(variances) != len(ns) or not ns:
        raise ValueError("welch_df: expected one variance per stratum and at least one stratum")
    if any(n < 2 for n in ns):
        raise ValueError(f"welch_df: every stratum needs >= 2 values, got sizes {list(ns)}")
    v = [float(s2) / n for s2, n in zip(variances, ns)]
    den = sum(x * x / (n - 1) for x, n in zip(v, ns))
    if den == 0.0:
        return float(sum(n - 1 for n in ns))
    return sum(v) ** 2 / den


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std" (sample, None for one value), "n"}``."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std: no values")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return {"mean": m, "std": sd, "n": len(v)}


def _interval(mean: float, se: Optional[float], df: Optional[float]) -> Optional[List[float]]:
    if se is None or df is None or not df > 0:
        return None
    h = t_quantile_975(df) * se
    return [mean - h, mean + h]


def paired_difference(a: Mapping[int, Mapping[int, float]], b: Mapping[int, Mapping[int, float]]) -> dict:
    """``b − a`` from ``{fold: {seed: value}}`` tables, paired by seed (only seeds present in both), with
    the seed interval of the module docstring.

    Returns ``{"folds": {fold: {"seeds", "values", "mean", "std", "n", "ci95"}}, "mean", "se", "df", "ci95"}``
    (``df`` Welch–Satterthwaite across folds, ``n − 1`` within a fold; ``None`` with one seed in a fold).
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
    if all(per[f]["std"] is not None for f in folds):
        se = math.sqrt(sum(per[f]["std"] ** 2 / per[f]["n"] for f in folds)) / F
        df: Optional[float] = welch_df([per[f]["std"] ** 2 for f in folds], [per[f]["n"] for f in folds])
    else:
        se, df = None, None
    return {"folds": per, "mean": mean, "se": se, "df": df, "ci95": _interval(mean, se, df)}


def _fold_arrays(ep: Mapping, runs_a: Mapping, runs_b: Mapping, fold) -> tuple:
    """Checked arrays of one fold: class index per episode, unit (class, query image) per episode, the
    units of each class, the common seeds, and ``I, U`` ``[arm, seed, episode]``."""
    cls = np.asarray(ep["class"])
    query = list(ep["query"])
    E = len(cls)
    if E == 0 or len(query) != E:
        raise ValueError(f"bootstrap_difference: fold {fold}: expected one class and one query per episode, "
                         f"got {E} classes and {len(query)} queries")
    seeds = sorted(s for s in runs_a if s in runs_b)
    if not seeds:
        raise ValueError(f"bootstrap_difference: fold {fold} has no seed in common")
    classes, cidx = np.unique(cls, return_inverse=True)
    units: Dict[tuple, int] = {}
    unit = np.array([units.setdefault((int(c), q), len(units)) for c, q in zip(cidx, query)])
    unit_class = np.empty(len(units), dtype=np.int64)
    for (c, _), u in units.items():
        unit_class[u] = c
    by_class = [np.flatnonzero(unit_class == c) for c in range(len(classes))]
    IU = np.empty((2, 2, len(seeds), E))
    for k, runs in enumerate((runs_a, runs_b)):
        for j, s in enumerate(seeds):
            r = runs[s]
            i, u = np.asarray(r["inter"], dtype=np.float64), np.asarray(r["union"], dtype=np.float64)
            if i.shape != (E,) or u.shape != (E,):
                raise ValueError(f"bootstrap_difference: fold {fold} seed {s}: expected {E} intersections and "
                                 f"unions (one per episode), got {i.shape[0] if i.ndim else 0} and "
                                 f"{u.shape[0] if u.ndim else 0}")
            if not (np.isfinite(i).all() and np.isfinite(u).all()) or (i < 0).any() or (i > u).any():
                raise ValueError(f"bootstrap_difference: fold {fold} seed {s}: intersections and unions must be "
                                 f"finite with 0 <= I <= U")
            IU[0, k, j], IU[1, k, j] = i, u
    return cidx, len(classes), unit, by_class, seeds, IU


def _class_miou(W: np.ndarray, cidx: np.ndarray, C: int, I: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Class mIoU (%) ``[R, S]`` for episode weights ``W [R, E]`` and per-seed ``I, U [S, E]``."""
    onehot = np.zeros((len(cidx), C))
    onehot[np.arange(len(cidx)), cidx] = 1.0
    S = I.shape[0]
    num = W @ (I.T[:, :, None] * onehot[:, None, :]).reshape(len(cidx), S * C)
    den = W @ (U.T[:, :, None] * onehot[:, None, :]).reshape(len(cidx), S * C)
    return 100.0 * (num / (den + EPS)).reshape(W.shape[0], S, C).mean(-1)


def bootstrap_difference(a: Mapping, b: Mapping, episodes: Mapping, *, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict:
    """The seed × test-image interval of ``b − a`` (class mIoU, %): the paired two-level bootstrap of the
    module docstring.

    Args:
        a, b: ``{fold: {seed: {"inter": [...], "union": [...]}}}``: each run's foreground intersection and
            union (pixels) per test episode, in the episode order of ``episodes``.
        episodes: ``{fold: {"class": [...], "query": [...]}}``: each episode's class and query image, the
            same for every run of the fold.
        n_boot, seed: replicates and the seed of their generator (the same seed gives the same draws,
            so several differences of one table are resampled alike).
        level: the interval's coverage.
    Returns:
        ``{"folds": {fold: {"mean", "ci95"}}, "mean", "ci95", "n_boot", "seed", "level"}``; ``mean`` is the
        difference on the episodes as run (no resampling), equal to the mean of the seeds' paired
        differences of the reported class mIoU.

    Example:
        >>> ep = {1: {"class": [3, 3, 5, 5], "query": ["x", "y", "z", "z"]}}
        >>> a = {1: {0: {"inter": [5, 0, 4, 4], "union": [10, 10, 8, 8]}, 1: {"inter": [6, 1, 4, 3], "union": [10, 10, 8, 8]}}}
        >>> b = {1: {0: {"inter": [6, 1, 5, 4], "union": [10, 10, 8, 8]}, 1: {"inter": [7, 1, 4, 4], "union": [10, 10, 8, 8]}}}
        >>> r = bootstrap_difference(a, b, ep, n_boot=200)
        >>> round(r["mean"], 3), r["ci95"][0] <= r["mean"] <= r["ci95"][1]
        (6.875, True)
    """
    if n_boot < 10:
        raise ValueError(f"n_boot: expected >= 10, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected in (0, 1), got {level}")
    folds = [f for f in a if f in b]
    if not folds:
        raise ValueError("bootstrap_difference: no fold in common")
    missing = [f for f in folds if f not in episodes]
    if missing:
        raise ValueError(f"bootstrap_difference: no episode table for fold(s) {missing}")
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
    per: Dict[object, dict] = {}
    reps = []
    for f in folds:
        cidx, C, unit, by_class, seeds, IU = _fold_arrays(episodes[f], a[f], b[f], f)
        n_units, S = int(unit.max()) + 1, len(seeds)
        # image draws: within each class, as many (class, image) units as the class has, with replacement
        uw = np.zeros((n_boot, n_units))
        rows = np.arange(n_boot)[:, None]
        for members in by_class:
            pick = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
            np.add.at(uw, (np.broadcast_to(rows, pick.shape), pick), 1.0)
        W = uw[:, unit]
        sidx = rng.integers(0, S, size=(n_boot, S))
        diff_seed = _class_miou(W, cidx, C, IU[0, 1], IU[1, 1]) - _class_miou(W, cidx, C, IU[0, 0], IU[1, 0])
        rep = np.take_along_axis(diff_seed, sidx, axis=1).mean(1)
        ones = np.ones((1, len(cidx)))
        observed = float((_class_miou(ones, cidx, C, IU[0, 1], IU[1, 1])
                          - _class_miou(ones, cidx, C, IU[0, 0], IU[1, 0])).mean())
        lo, hi = np.quantile(rep, [lo_q, hi_q])
        per[f] = {"mean": observed, "ci95": [float(lo), float(hi)], "seeds": seeds}
        reps.append(rep)
    total = np.mean(reps, axis=0)
    lo, hi = np.quantile(total, [lo_q, hi_q])
    return {"folds": per, "mean": float(np.mean([per[f]["mean"] for f in folds])), "ci95": [float(lo), float(hi)],
            "n_boot": int(n_boot), "seed": int(seed), "level": float(level)}


def wider(*intervals: Optional[Sequence[float]]) -> Optional[List[float]]:
    """The widest of ``intervals`` (the one a claim is decided by); ``None`` if any is missing, since an
    interval that could not be computed cannot be ruled narrower."""
    if not intervals or any(ci is None for ci in intervals):
        return None
    return list(max(intervals, key=lambda ci: ci[1] - ci[0]))


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


def restate(table: dict, episodes: Optional[dict] = None) -> Dict[str, dict]:
    """Recompute both intervals of every difference of a ``plug_in.py`` table (its JSON as a dict) from the
    stored per-seed values (and, given the table's ``*_episodes.json``, the per-episode results):
    ``{difference: {"mean", "seed_ci", "df", "boot_ci", "decide", "folds": {fold: mean}}}``."""
    res = table["results"]
    out = {}
    for name, d in table["summary"]["differences"].items():
        a, b = d["a"], d["b"]
        seed = paired_difference(res[a]["miou"], res[b]["miou"])
        boot = None
        if episodes is not None and all(episodes["episodes"].get(str(f)) for f in table["folds"]):
            ea, eb = episodes["episode_iu"][a], episodes["episode_iu"][b]
            boot = bootstrap_difference(ea, eb, episodes["episodes"], n_boot=int(episodes["bootstrap"]["n_boot"]),
                                        seed=int(episodes["bootstrap"]["seed"]))
        out[name] = {"mean": seed["mean"], "seed_ci": seed["ci95"], "df": seed["df"],
                     "boot_ci": boot["ci95"] if boot else None,
                     "decide": wider(seed["ci95"], boot["ci95"]) if boot else None,
                     "folds": {f: v["mean"] for f, v in seed["folds"].items()}}
    return out
