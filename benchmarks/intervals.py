"""Both 95 % intervals of every paired difference of ``plug_in.py`` table files, recomputed from the values they store.

    python benchmarks/intervals.py docs/results/<table>.json [...]

Per table: each difference ``b - a`` with its mean over folds, the seed interval (Student-t, Welch df), the
seed x test-image interval (the paired two-level bootstrap, from the table's ``*_episodes.json`` beside
it; ``n/a`` without one) and the per-fold means (:func:`benchmarks.scoring.stats.restate`).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.scoring.stats import format_interval, restate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tables", nargs="+", help="table JSON files written by benchmarks/plug_in.py")
    args = p.parse_args(argv)
    for f in args.tables:
        path = Path(f)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"error: '{f}' cannot be read as a table JSON ({type(e).__name__})")
            return 2
        ep_file = path.with_name(table.get("episodes_file") or path.stem + "_episodes.json")
        episodes = json.loads(ep_file.read_text()) if ep_file.is_file() else None
        print(f"{path.name} ({table.get('split')}, folds {table.get('folds')}, seeds {table.get('seeds')}):")
        for name, r in restate(table, episodes).items():
            folds = ", ".join(f"{v:+.2f}" for v in r["folds"].values())
            df = "n/a" if r["df"] is None else f"{r['df']:.1f}"
            boot = "n/a (no per-episode results stored)" if r["boot_ci"] is None else format_interval(r["boot_ci"])
            print(f"  {name}: {r['mean']:+.2f}  seeds {format_interval(r['seed_ci'])} (Welch df {df})  "
                  f"seeds x images {boot}  per fold {folds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
