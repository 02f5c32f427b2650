"""benchmarks.scoring.stats: the Welch seed interval and the paired two-level (seed x test-image) bootstrap,
each checked against values computed independently here."""
import math

import numpy as np
import pytest
import torch

from benchmarks.scoring.metrics import FewShotIoU
from benchmarks.scoring.stats import bootstrap_difference, paired_difference, welch_df, wider

# CANet vs CANet+DCM (raw input, residual), development test split, folds 1-3, seeds 0-2
# (docs/results/canet_rawin_test_folds123.json), as literals
CANET = {1: {0: 35.33248666265892, 1: 37.49805245873839, 2: 38.45606765200018},
         2: {0: 37.548926943576475, 1: 37.81433099056037, 2: 37.532644516761074},
         3: {0: 16.188453824221575, 1: 16.280220028268115, 2: 16.466094999662477}}
CANET_DCM = {1: {0: 42.64568321177307, 1: 51.60159152881501, 2: 45.99964504781625},
             2: {0: 40.20354547086733, 1: 39.444572229928035, 2: 37.452760624290306},
             3: {0: 17.047939382087478, 1: 16.60777865512744, 2: 19.476873920703326}}


def test_welch_interval_of_unequal_fold_variances_literal():
    d = paired_difference(CANET, CANET_DCM)
    assert round(d["df"], 1) == 3.1
    assert [round(x, 2) for x in d["ci95"]] == [1.54, 6.76]
    assert round(d["mean"], 2) == 4.15


def test_welch_df_and_interval_by_hand():
    # fold variances 9 (fold 1) vs 0.04 (fold 2), three seeds each
    a = {1: {0: 0.0, 1: 0.0, 2: 0.0}, 2: {0: 0.0, 1: 0.0, 2: 0.0}}
    b = {1: {0: 1.0, 1: 4.0, 2: 7.0}, 2: {0: 0.8, 1: 1.0, 2: 1.2}}
    d = paired_difference(a, b)
    v1, v2 = 9.0 / 3, 0.04 / 3
    df = (v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 2)
    assert math.isclose(d["df"], df, rel_tol=1e-12) and 2.0 < d["df"] < 2.02  # pooled would say 4
    se = math.sqrt(v1 + v2) / 2
    from scipy.special import stdtrit  # an independent route to the t quantile
    h = float(stdtrit(df, 0.975)) * se
    assert d["ci95"] == pytest.approx([2.5 - h, 2.5 + h], rel=1e-9)
    assert welch_df([9.0, 0.04], [3, 3]) == pytest.approx(df, rel=1e-12)
    assert welch_df([0.0, 0.0], [3, 4]) == 5.0  # no spread: any df, the interval has zero width
    with pytest.raises(ValueError, match="2"):
        welch_df([1.0], [1])


def test_one_fold_interval_is_the_paired_t_test_interval():
    from scipy.stats import ttest_rel
    a = {2: {0: 40.0, 1: 41.5, 2: 39.0, 3: 42.0}}
    b = {2: {0: 41.0, 1: 43.0, 2: 39.5, 3: 44.5}}
    d = paired_difference(a, b)
    ci = ttest_rel([b[2][s] for s in range(4)], [a[2][s] for s in range(4)]).confidence_interval(0.95)
    assert d["df"] == 3 and d["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)


def _episodes(rng, classes=(3, 5, 8), images=(6, 2, 4), per_class=10):
    cls, query = [], []
    for c, n in zip(classes, images):
        for e in range(per_class):
            cls.append(c)
            query.append(f"img{c}_{e % n}")
    return {"class": cls, "query": query}


def _runs(rng, ep, seeds, shift=0.0):
    E = len(ep["class"])
    out = {}
    for s in seeds:
        u = rng.integers(200, 400, size=E)
        i = np.minimum(u, np.round(u * np.clip(rng.uniform(0.2, 0.8, size=E) + shift, 0, 1))).astype(int)
        out[s] = {"inter": i.tolist(), "union": u.tolist()}
    return out


def _miou(ep, run):
    classes = sorted(set(ep["class"]))
    m = FewShotIoU(classes)
    for c, i, u in zip(ep["class"], run["inter"], run["union"]):
        # a 1 x (u + 1) strip: i pixels predicted and true, u - i true only, one background pixel
        target = torch.zeros(1, u + 1, dtype=torch.long)
        target[0, :u] = 1
        pred = torch.zeros_like(target)
        pred[0, :i] = 1
        m.update(pred, target, classes.index(c))
    return 100 * m.compute()["miou"]


def test_bootstrap_mean_is_the_paired_difference_of_the_reported_miou():
    rng = np.random.default_rng(0)
    ep = {f: _episodes(rng) for f in (1, 2)}
    a = {f: _runs(rng, ep[f], (0, 1)) for f in ep}
    b = {f: _runs(rng, ep[f], (0, 1), shift=0.05) for f in ep}
    r = bootstrap_difference(a, b, ep, n_boot=100)
    miou_a = {f: {s: _miou(ep[f], a[f][s]) for s in a[f]} for f in ep}
    miou_b = {f: {s: _miou(ep[f], b[f][s]) for s in b[f]} for f in ep}
    ref = paired_difference(miou_a, miou_b)
    assert r["mean"] == pytest.approx(ref["mean"], abs=1e-9)
    for f in ep:
        assert r["folds"][f]["mean"] == pytest.approx(ref["folds"][f]["mean"], abs=1e-9)


def test_bootstrap_with_nothing_to_resample_is_a_point():
    # one query image per class and identical seeds: every replicate is the data itself
    ep = {1: {"class": [3, 3, 5], "query": ["a", "a", "b"]}}
    a = {1: {s: {"inter": [1, 2, 3], "union": [4, 4, 4]} for s in (0, 1)}}
    b = {1: {s: {"inter": [2, 2, 4], "union": [4, 4, 4]} for s in (0, 1)}}
    r = bootstrap_difference(a, b, ep, n_boot=50)
    # class 3: 3/8 -> 4/8, class 5: 3/4 -> 4/4
    assert r["mean"] == pytest.approx(100 * ((0.5 - 0.375) + (1.0 - 0.75)) / 2)
    assert r["ci95"] == pytest.approx([r["mean"], r["mean"]])


def _slow_bootstrap(a, b, ep, n_boot, seed):
    """A literal loop: per replicate and fold, draw images per class and seeds, sum I and U per class."""
    rng = np.random.default_rng(seed)
    folds = sorted(ep)
    reps = []
    for _ in range(n_boot):
        diffs = []
        for f in folds:
            cls, query = ep[f]["class"], ep[f]["query"]
            classes = sorted(set(cls))
            drawn = []  # (class, image) with multiplicity
            for c in classes:
                imgs = sorted({q for cc, q in zip(cls, query) if cc == c})
                drawn += [(c, imgs[k]) for k in rng.integers(0, len(imgs), size=len(imgs))]
            seeds = sorted(a[f])
            picked = [seeds[k] for k in rng.integers(0, len(seeds), size=len(seeds))]
            d = []
            for s in picked:
                m = []
                for run in (a[f][s], b[f][s]):
                    ious = []
                    for c in classes:
                        I = sum(run["inter"][e] for (cc, img) in drawn if cc == c
                                for e in range(len(cls)) if cls[e] == c and query[e] == img)
                        U = sum(run["union"][e] for (cc, img) in drawn if cc == c
                                for e in range(len(cls)) if cls[e] == c and query[e] == img)
                        ious.append(I / (U + 1e-10))
                    m.append(100 * sum(ious) / len(ious))
                d.append(m[1] - m[0])
            diffs.append(sum(d) / len(d))
        reps.append(sum(diffs) / len(diffs))
    return np.quantile(reps, [0.025, 0.975])


def test_bootstrap_interval_agrees_with_a_literal_loop():
    # the same estimator, drawn by two different programs: the intervals agree to Monte-Carlo error
    rng = np.random.default_rng(1)
    ep = {1: _episodes(rng, classes=(1, 2), images=(5, 3), per_class=6),
          2: _episodes(rng, classes=(4, 6), images=(2, 4), per_class=6)}
    a = {f: _runs(rng, ep[f], (0, 1, 2)) for f in ep}
    b = {f: _runs(rng, ep[f], (0, 1, 2), shift=0.03) for f in ep}
    fast = bootstrap_difference(a, b, ep, n_boot=3000, seed=5)["ci95"]
    slow = _slow_bootstrap(a, b, ep, n_boot=600, seed=11)
    width = slow[1] - slow[0]
    assert width > 1.0
    assert abs(fast[0] - slow[0]) < 0.2 * width and abs(fast[1] - slow[1]) < 0.2 * width


def test_bootstrap_sees_a_class_carried_by_one_image():
    # fold: class 3 has 20 images where b = a; class 5 has 3 images and b gains on one of them only.
    # The seed interval (identical seeds) is a point; the test-image interval is not.
    cls = [3] * 20 + [5] * 3
    query = [f"c3_{i}" for i in range(20)] + ["c5_0", "c5_1", "c5_2"]
    ep = {1: {"class": cls, "query": query}}
    base = {"inter": [50] * 23, "union": [100] * 23}
    gain = {"inter": [50] * 20 + [95, 50, 50], "union": [100] * 23}
    a = {1: {0: base, 1: base}}
    b = {1: {0: gain, 1: gain}}
    seed_ci = paired_difference({1: {0: 0.0, 1: 0.0}}, {1: {0: 7.5, 1: 7.5}})["ci95"]
    boot = bootstrap_difference(a, b, ep, n_boot=2000)
    assert boot["mean"] == pytest.approx(7.5)  # class 5: 150/300 -> 195/300, half of 15 points
    assert seed_ci == pytest.approx([7.5, 7.5])
    assert boot["ci95"][0] == pytest.approx(0.0) and boot["ci95"][1] == pytest.approx(22.5)
    assert wider(seed_ci, boot["ci95"]) == boot["ci95"] and wider(seed_ci, None) is None


def test_bootstrap_rejects_bad_input():
    ep = {1: {"class": [1, 1], "query": ["a", "b"]}}
    ok = {1: {0: {"inter": [1, 1], "union": [2, 2]}}}
    with pytest.raises(ValueError, match="one per episode"):
        bootstrap_difference(ok, {1: {0: {"inter": [1], "union": [2]}}}, ep)
    with pytest.raises(ValueError, match="0 <= I <= U"):
        bootstrap_difference(ok, {1: {0: {"inter": [3, 1], "union": [2, 2]}}}, ep)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_difference(ok, {1: {0: {"inter": [float("nan"), 1], "union": [2, 2]}}}, ep)
    with pytest.raises(ValueError, match="episode table"):
        bootstrap_difference(ok, ok, {2: ep[1]})
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_difference(ok, ok, ep, n_boot=1)


def test_stats_command_restates_a_table(tmp_path, capsys):
    import json as _json
    from benchmarks.intervals import main
    table = {"folds": [1, 2, 3], "split": "test", "seeds": [0, 1, 2],
             "results": {"canet": {"miou": {str(f): {str(s): v for s, v in CANET[f].items()} for f in CANET}},
                         "canet+dcm": {"miou": {str(f): {str(s): v for s, v in CANET_DCM[f].items()} for f in CANET}}},
             "summary": {"differences": {"canet+dcm - canet": {"a": "canet", "b": "canet+dcm"}}}}
    (tmp_path / "t.json").write_text(_json.dumps(table))
    assert main([str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "+4.15  seeds [+1.54, +6.76] (Welch df 3.1)" in out and "no per-episode results stored" in out
    (tmp_path / "bad.json").write_text("{")
    assert main([str(tmp_path / "bad.json")]) == 2
