"""Training curves of one or more runs: train loss, validation mIoU and FB-IoU per epoch.

::

    python benchmarks/plot_runs.py runs/dpcn_pascal_f0 runs/pfenet_pascal_f0 --out curves.png
    python benchmarks/plot_runs.py runs/pfenet_f1_seed0 runs/pfenet_f1_seed1 runs/pfenet_f1_seed2 --out seeds.png

Each RUN is a run folder with the ``log.jsonl`` the trainer writes (events ``start`` with
``val_protocol``, ``epoch`` with ``epoch``, ``train_loss``, ``val_miou``, ``val_fbiou``; a resumed
run's repeated epochs count once, the last record wins). Runs whose folder names differ only by a
``_seed<N>`` suffix are one line: the mean over the seeds with a min–max band. ``--label`` names the
lines (one per line, in order of first appearance). The validation protocol goes in the title.
Needs matplotlib (``pip install matplotlib``, part of the ``train`` extra).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Tuple  # noqa: E402

_SEED = re.compile(r"_seed\d+$")
METRICS = (("train_loss", "train loss"), ("val_miou", "validation mIoU (%)"), ("val_fbiou", "validation FB-IoU (%)"))


class RunError(ValueError):
    """A run folder or its log cannot be used; the message names it."""


def read_run(folder) -> dict:
    """``{'name', 'epochs': {epoch: record}, 'protocols': [val_protocol, ...]}`` from ``folder/log.jsonl``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"run folder '{folder}' not found" if not folder.exists() else f"'{folder}' is not a folder")
    log = folder / "log.jsonl"
    if not log.is_file():
        raise RunError(f"'{folder}' has no log.jsonl (not a run folder of examples/train_dpcn.py?)")
    epochs: Dict[int, dict] = {}
    protocols: List[str] = []
    lines = log.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):  # a run killed mid-write: the last line may be cut
                continue
            raise RunError(f"{log}:{n}: not a JSON line") from None
        ev = rec.get("event") if isinstance(rec, dict) else None
        if ev == "start" and rec.get("val_protocol") and rec["val_protocol"] not in protocols:
            protocols.append(str(rec["val_protocol"]))
        elif ev == "epoch" and isinstance(rec.get("epoch"), int):
            epochs[int(rec["epoch"])] = rec
    if not epochs:
        raise RunError(f"{log} has no 'epoch' record (did the run finish an epoch?)")
    return {"name": folder.resolve().name, "epochs": epochs, "protocols": protocols}


def group_runs(runs: List[dict]) -> List[Tuple[str, List[dict]]]:
    """Runs grouped by folder name without its ``_seed<N>`` suffix, in order of first appearance."""
    groups: Dict[str, List[dict]] = {}
    for r in runs:
        groups.setdefault(_SEED.sub("", r["name"]), []).append(r)
    return list(groups.items())


def series(group: List[dict], key: str):
    """``(epochs, mean, lo, hi)`` of ``key`` over the runs of a group (epochs where some run has it)."""
    eps = sorted({e for r in group for e, rec in r["epochs"].items() if _num(rec.get(key)) is not None})
    mean, lo, hi = [], [], []
    for e in eps:
        v = [_num(r["epochs"][e].get(key)) for r in group if e in r["epochs"]]
        v = [x for x in v if x is not None]
        mean.append(sum(v) / len(v))
        lo.append(min(v))
        hi.append(max(v))
    return eps, mean, lo, hi


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def plot(groups, labels, out: Path, size: Tuple[int, int], dpi: int = 100) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, h = size
    fig, axes = plt.subplots(1, len(METRICS), figsize=(w / dpi, h / dpi), dpi=dpi)
    for (name, group), label in zip(groups, labels):
        color = None
        for ax, (key, _) in zip(axes, METRICS):
            eps, mean, lo, hi = series(group, key)
            if not eps:
                continue
            tag = label + (f" (mean of {len(group)} seeds, band min-max)" if len(group) > 1 else "")
            (line,) = ax.plot(eps, mean, marker="o" if len(eps) < 30 else None, ms=3, label=tag, color=color)
            color = line.get_color()
            if len(group) > 1:
                ax.fill_between(eps, lo, hi, color=color, alpha=0.2, lw=0)
    for ax, (key, title) in zip(axes, METRICS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    protos = list(dict.fromkeys(p for _, g in groups for r in g for p in r["protocols"]))
    if not protos:
        title = "validation protocol: not recorded in the logs"
    elif len(protos) == 1:
        title = "validation: " + protos[0]
    else:
        title = "validation protocols differ: " + " | ".join(protos)
    wrap = max(40, int(w / 7.5))
    lines = textwrap.wrap(title, wrap)[:3]
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.subplots_adjust(left=min(0.3, 60 / w * len(METRICS) / 3 * 1.5), right=0.98, bottom=min(0.3, 60 / h),
                        wspace=0.25, top=max(0.5, 1 - (16 * len(lines) + 30) / h))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _size(text: str) -> Tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not m or not (200 <= int(m.group(1)) <= 8000 and 150 <= int(m.group(2)) <= 8000):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels (200..8000 x 150..8000), got '{text}'")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with log.jsonl)")
    p.add_argument("--out", "-o", required=True, help="the figure file (.png, .pdf, .svg)")
    p.add_argument("--label", action="append", default=None,
                   help="name of a line (repeat: one per line, seed groups count once); default: the folder name")
    p.add_argument("--size", type=_size, default=(1500, 450), help="figure size in pixels, WIDTHxHEIGHT (1500x450)")
    args = p.parse_args(argv)
    if Path(args.out).is_dir():
        p.error(f"--out: '{args.out}' is a folder; give a file name such as curves.png")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        folders = list(dict.fromkeys(Path(r).resolve() for r in args.runs))  # a folder given twice counts once
        runs = [read_run(r) for r in folders]
        groups = group_runs(runs)
        if args.label is not None and len(args.label) != len(groups):
            raise RunError(f"--label given {len(args.label)} time(s) for {len(groups)} line(s) "
                           f"({', '.join(n for n, _ in groups)}); give one per line")
        labels = args.label or [name for name, _ in groups]
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RunError("plot_runs.py needs matplotlib: pip install matplotlib (or pip install -e '.[train]')") from None
        out = plot(groups, labels, Path(args.out), args.size)
    except (RunError, OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(groups)} line(s) from {len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
