"""A seeded comparison of networks: the runs' results gathered, summarised and rendered as tables.

Used by ``benchmarks/plug_in.py`` (the paper's Table 6 with seeds) and ``benchmarks/gpu_matrix.py``. The
results of a comparison are ``res[arm] = {"miou": {fold: {seed: value}}, "fbiou": ..., "class_iou": ...,
"episode_iu": ...}``; :func:`collect_episodes` adds a run's per-episode results, :func:`summarise` computes
every arm's fold averages, the paired differences with their seed and seed x test-image intervals
(:mod:`benchmarks.scoring.stats`) and the per-class IoU, and :func:`table` / :func:`markdown` render them
as text and Markdown. :func:`preregistered` and :func:`label_text` label a comparison confirmatory (its
pre-registration file committed before the runs) or exploratory.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

from .stats import bootstrap_difference, fold_average, format_interval, paired_difference, wider

__all__ = ["PAPER_TABLE6", "BOOTSTRAP", "FEW_IMAGES", "INTERVAL_TEXT", "collect_episodes", "summarise", "table",
           "markdown", "preregistered", "label_text"]

#: DPCN Table 6 (1-shot, ResNet-50, PASCAL-5i): per-fold mIoU, mean, FB-IoU (docs/MODELS_HOSTS.md).
#: The paper prints CANet fold 0 as 53.5, but its mean 55.4 (and the CANet paper) imply 52.5.
PAPER_TABLE6 = {
    "canet": {"folds": [53.5, 65.9, 51.3, 51.9], "mean": 55.4, "fbiou": 66.2},
    "canet+dcm": {"folds": [64.7, 66.8, 51.8, 51.9], "mean": 58.8, "fbiou": 69.3},
    "pfenet": {"folds": [61.7, 69.5, 55.4, 56.3], "mean": 60.8, "fbiou": 73.3},
    "pfenet+dcm": {"folds": [62.2, 69.6, 59.2, 58.0], "mean": 62.3, "fbiou": 73.5},
}


def collect_episodes(row: dict, fold: int, seed: int, r: dict, episodes: dict, class_info: dict, run_dir: Path) -> None:
    """Keep a run's per-episode foreground intersections and unions (``r["episode_iu"][fold][seed]``), the
    fold's episode table (class and query image per episode, which every run of the fold must share:
    ``episodes[fold]``) and the fold's test images / episodes per class (``class_info[fold]``). A run
    evaluated before per-episode results were stored, or on several episode seeds, leaves
    ``episodes[fold] = None`` (no test-image interval for that fold)."""
    per_seed = row.get("per_seed") or []
    names = {int(c): n for c, n in (row.get("class_names") or {}).items()}
    if per_seed and fold not in class_info:
        ps = per_seed[0]
        class_info[fold] = {int(c): {"name": names.get(int(c), str(c)),
                                     "episodes": int(ps.get("episodes_per_class", {}).get(c, 0)),
                                     "images": (ps.get("images_per_class") or {}).get(c)}
                            for c in ps.get("class_iou", {})}
    rec = per_seed[0].get("episode_records") if len(per_seed) == 1 else None
    if rec is None:
        episodes[fold] = None
        return
    table_ = {"class": [int(c) for c in rec["class"]], "query": list(rec["query"])}
    if episodes.setdefault(fold, table_) is None:
        return
    if episodes[fold] != table_:
        raise ValueError(f"'{run_dir}': its test episodes differ from the other runs of fold {fold}; the paired "
                         f"comparison needs identical episodes (same recipe, eval.seeds and data)")
    r["episode_iu"].setdefault(fold, {})[seed] = {"inter": list(rec["inter"]), "union": list(rec["union"])}


#: replicates and generator seed of the seed x test-image bootstrap (benchmarks.scoring.stats.bootstrap_difference)
BOOTSTRAP = {"n_boot": 4000, "seed": 0}
FEW_IMAGES = 10  # classes with fewer test images than this are marked in the per-class tables


def summarise(arms: List[str], folds, res: dict, episodes: Optional[dict] = None,
              class_info: Optional[dict] = None) -> dict:
    """Per-arm fold averages, the paired differences of every arm from the first (and the last arm from
    each), each with its seed interval and, where every run stored its per-episode results, its seed x
    test-image interval and the wider of the two (``decide``); and the per-class IoU of every arm."""
    episodes, class_info = episodes or {}, class_info or {}
    summary = {a: {"miou": fold_average(res[a]["miou"]), "fbiou": fold_average(res[a]["fbiou"])} for a in arms}
    pairs = [(arms[0], b) for b in arms[1:]]
    if len(arms) > 2:  # the last arm (e.g. DPCN) against every other one as well
        pairs += [(a, arms[-1]) for a in arms[1:-1]]
    boot_ok = bool(folds) and all(episodes.get(f) is not None for f in folds)
    diffs = {}
    for a, b in pairs:
        d = {"a": a, "b": b, "miou": paired_difference(res[a]["miou"], res[b]["miou"]),
             "fbiou": paired_difference(res[a]["fbiou"], res[b]["fbiou"])}
        if boot_ok:
            d["bootstrap"] = bootstrap_difference({f: res[a]["episode_iu"][f] for f in folds},
                                                  {f: res[b]["episode_iu"][f] for f in folds},
                                                  {f: episodes[f] for f in folds}, **BOOTSTRAP)
        else:
            d["bootstrap"] = None
        d["decide"] = wider(d["miou"]["ci95"], d["bootstrap"]["ci95"] if d["bootstrap"] else None)
        diffs[f"{b} - {a}"] = d
    classes: Dict[int, dict] = {}
    for f in folds:
        info = class_info.get(f, {})
        per = {}
        for c in sorted(set().union(*(set(v) for a in arms for v in res[a]["class_iou"].get(f, {}).values()))):
            iou = {}
            for a in arms:
                vals = [v[c] for v in res[a]["class_iou"].get(f, {}).values()
                        if c in v and v[c] is not None and not math.isnan(v[c])]
                iou[a] = sum(vals) / len(vals) if vals else None
            n_img = (info.get(c) or {}).get("images")
            per[c] = {"name": (info.get(c) or {}).get("name", str(c)), "images": n_img,
                      "episodes": (info.get(c) or {}).get("episodes"), "iou": iou,
                      "few_images": n_img is not None and n_img < FEW_IMAGES,
                      "difference": {name: (None if iou[d["a"]] is None or iou[d["b"]] is None
                                            else iou[d["b"]] - iou[d["a"]]) for name, d in diffs.items()}}
        classes[f] = per
    return {"arms": summary, "differences": diffs, "classes": classes,
            "bootstrap_missing": [] if boot_ok else [f for f in folds if episodes.get(f) is None]}


INTERVAL_TEXT = ("seed interval: 95 % Student-t interval over training seeds of the paired (same seed, same test "
                 "episodes) difference; across folds the mean of the fold means, SE from the within-fold seed "
                 "variances, Welch-Satterthwaite df. Seed x image interval: paired two-level bootstrap (query images "
                 "resampled within each class, seeds within each fold; class IoU recomputed as sum I / sum U), "
                 "2.5-97.5 % percentiles. A claim is decided by the wider of the two")


def _fmt(v) -> str:
    return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"


def _pm(ms) -> str:
    return f"{ms['mean']:.2f}" + (f" ± {ms['std']:.2f}" if ms.get("std") is not None else "")


def _boot(d: dict, f=None) -> str:
    b = d.get("bootstrap")
    if not b:
        return "n/a"
    return format_interval(b["ci95"] if f is None else b["folds"][f]["ci95"])


def _df(m: dict) -> str:
    return "n/a" if m.get("df") is None else f"{m['df']:.1f}"


def _class_lines(folds, stats: dict, arms: List[str], md: bool) -> List[str]:
    """Per-class IoU of every arm, each difference, and the test images / episodes of the class."""
    diffs = list(stats["differences"])
    out = []
    if md:
        out += ["| fold | class | test images | episodes | " + " | ".join(arms) + " | " + " | ".join(diffs) + " |",
                "|---|---|---|---|" + "---|" * (len(arms) + len(diffs))]
    for f in folds:
        for c, r in stats["classes"].get(f, {}).items():
            mark = " (<10 images)" if r["few_images"] else ""
            ious = [_fmt(r["iou"][a]).strip() for a in arms]
            ds = ["-" if r["difference"][n] is None else f"{r['difference'][n]:+.2f}" for n in diffs]
            img = "?" if r["images"] is None else str(r["images"])
            if md:
                out.append(f"| {f} | {r['name']}{mark} | {img} | {r['episodes']} | " + " | ".join(ious) + " | "
                           + " | ".join(ds) + " |")
            else:
                out.append(f"  fold {f} {r['name']:>14}{mark:14} images {img:>4} episodes {r['episodes']!s:>4}  "
                           + "  ".join(ious) + "  |  " + "  ".join(ds))
    return out


def table(host: str, folds, seeds, res: dict, stats: dict, protocol_text: str) -> str:
    arms = list(res)
    w = max(24, max(len(a) for a in arms) + 2)
    head = f"{'':{w}}" + "".join(f"{'fold ' + str(f):>16}" for f in folds) + f"{'mean':>16}{'FB-IoU':>9}"
    lines = [f"Table 6 — {host}: {', '.join(arms)} | seeds {','.join(map(str, seeds))} | {protocol_text}",
             "mIoU, mean ± std over seeds", head]
    for a in arms:
        s = stats["arms"][a]
        lines.append(f"{a:{w}}" + "".join(f"{_pm(s['miou']['folds'][f]):>16}" for f in folds)
                     + f"{_pm(s['miou']):>16}{s['fbiou']['mean']:9.2f}")
    lines.append("")
    lines.append("paired difference (mIoU), mean [seed interval] [seed x image interval]")
    for name, d in stats["differences"].items():
        m = d["miou"]
        lines.append(f"{name:{w}}" + "".join(f"{m['folds'][f]['mean']:+7.2f} {format_interval(m['folds'][f]['ci95'])}"
                                                f" {_boot(d, f)}" for f in folds))
        lines.append(f"{'':{w}}mean {m['mean']:+.2f}  seeds {format_interval(m['ci95'])} (df {_df(m)})  "
                     f"seeds x images {_boot(d)}  decide by {format_interval(d['decide'])}  "
                     f"FB-IoU {d['fbiou']['mean']:+.2f}")
    if stats.get("bootstrap_missing"):
        lines.append(f"(no seed x image interval: fold(s) {stats['bootstrap_missing']} have runs without stored "
                     f"per-episode results)")
    lines.append(f"({INTERVAL_TEXT})")
    lines.append("")
    lines.append("per-class IoU (mean over seeds): " + ", ".join(arms) + " | " + ", ".join(stats["differences"]))
    lines += _class_lines(folds, stats, arms, md=False)
    lines.append("")
    lines.append("per-seed mIoU / FB-IoU")
    for a in arms:
        for f in folds:
            vals = "  ".join(f"s{s}: {res[a]['miou'][f][s]:.2f}/{res[a]['fbiou'][f][s]:.2f}" for s in sorted(res[a]["miou"][f]))
            lines.append(f"  {a} fold {f}: {vals}")
    names = [n for n in (host, host + "+dcm") if n in PAPER_TABLE6]
    if names:
        lines.append("")
        lines.append("paper (1-shot, ResNet-50, PASCAL-5i, one number per fold, no seeds reported):")
        for n in names:
            p = PAPER_TABLE6[n]
            lines.append(f"  {n:12}" + "".join(f"  fold {i} {v:.1f}" for i, v in enumerate(p["folds"]))
                         + f"  mean {p['mean']:.1f}  FB-IoU {p['fbiou']:.1f}")
    return "\n".join(lines)


def markdown(host: str, folds, seeds, res: dict, stats: dict, protocol_text: str, minutes: float, device: str,
             versions: str, label: str = "") -> str:
    arms = list(res)
    out = [f"### {host}: {', '.join(arms)}", ""]
    if label:
        out += [label, ""]
    out += [f"Protocol: {protocol_text}. Seeds {', '.join(map(str, seeds))} per arm and fold, identical test episodes; "
            f"{minutes:.1f} min on {device} ({versions}).", "",
            "mIoU, mean ± std over seeds:", "",
            "| arm | " + " | ".join(f"fold {f}" for f in folds) + " | mean | FB-IoU |",
            "|---|" + "---|" * (len(folds) + 2)]
    for a in arms:
        s = stats["arms"][a]
        out.append(f"| {a} | " + " | ".join(_pm(s["miou"]["folds"][f]) for f in folds)
                   + f" | {_pm(s['miou'])} | {s['fbiou']['mean']:.2f} |")
    out += ["", "Paired difference (mIoU): mean, seed interval, seed × image interval:", "",
            "| difference | " + " | ".join(f"fold {f}" for f in folds)
            + " | mean over folds | seed interval (df) | seed × image interval | decided by | FB-IoU |",
            "|---|" + "---|" * (len(folds) + 5)]
    for name, d in stats["differences"].items():
        m = d["miou"]
        out.append(f"| {name} | " + " | ".join(f"{m['folds'][f]['mean']:+.2f} {format_interval(m['folds'][f]['ci95'])}"
                                              f" {_boot(d, f)}" for f in folds)
                   + f" | **{m['mean']:+.2f}** | {format_interval(m['ci95'])} ({_df(m)}) | {_boot(d)} | "
                     f"{format_interval(d['decide'])} | {d['fbiou']['mean']:+.2f} |")
    out += ["", f"Intervals: {INTERVAL_TEXT}."]
    if stats.get("bootstrap_missing"):
        out += ["", f"No seed × image interval: fold(s) {stats['bootstrap_missing']} have runs without stored "
                    f"per-episode results."]
    out += ["", "Per-class IoU (mean over seeds) and differences; classes with fewer than 10 test images are marked:",
            ""]
    out += _class_lines(folds, stats, arms, md=True)
    out += ["", "Per-seed mIoU:", ""]
    for a in arms:
        for f in folds:
            out.append(f"- {a}, fold {f}: " + ", ".join(f"seed {s} {res[a]['miou'][f][s]:.2f}" for s in sorted(res[a]["miou"][f])))
    return "\n".join(out) + "\n"


def preregistered(path: str) -> dict:
    """``{"file", "commit"}`` of a pre-registration file: the commit that last changed it (it must be
    committed and unchanged since, so that the runs cannot have changed it)."""
    f = Path(path)
    if not f.is_file():
        raise FileNotFoundError(f"--preregistered: '{path}' not found")
    root = Path(__file__).resolve().parents[2]
    import subprocess
    try:
        rel = str(f.resolve().relative_to(root))
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", rel], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", rel], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (ValueError, OSError, subprocess.CalledProcessError):
        raise ValueError(f"--preregistered: '{path}' is not a file of this repository's git history") from None
    if not commit or dirty:
        raise ValueError(f"--preregistered: '{path}' has {'uncommitted changes' if commit else 'never been committed'}; "
                         f"commit it before the runs")
    return {"file": rel, "commit": commit}


def label_text(prereg: Optional[dict]) -> str:
    """The line that labels a comparison's Markdown table: confirmatory, naming the pre-registration file and
    its commit (:func:`preregistered`), or exploratory."""
    return (f"**Confirmatory**: pre-registered in `{prereg['file']}` (commit {prereg['commit'][:10]}) before its "
            f"runs." if prereg else "**Exploratory**: no pre-registration given (`--preregistered`).")
