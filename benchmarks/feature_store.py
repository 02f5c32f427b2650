"""Inspect, verify or compact the on-disk frozen-backbone feature stores (``train.cache_backbone_dir``).

    python benchmarks/feature_store.py --info DIR                # shards, entries, layouts, unfinished writes
    python benchmarks/feature_store.py --info DIR --verify       # also every entry's checksum
    python benchmarks/feature_store.py --info DIR --compact [--shard-mb 512]

``DIR`` is one store (``features_<fingerprint>``) or a cache folder holding several. The store and its
shard format: :mod:`benchmarks.engine.feature_cache`. Exit status 1 when a shard is invalid or an entry
fails its checksum.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.engine.feature_cache import DEFAULT_SPILL_BYTES, inspect_store, stores_in  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--info", metavar="DIR", required=True,
                   help="a store folder (features_<fingerprint>) or a cache folder holding several")
    p.add_argument("--verify", action="store_true", help="also check every entry's checksum")
    p.add_argument("--compact", action="store_true",
                   help="rewrite each store as few shards without duplicates or invalid shards (safe while "
                        "other processes read or write the store: they keep their mapped shards and pick up "
                        "the new ones)")
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SPILL_BYTES / 2**20,
                   help="size of the shards --compact writes (MiB, default %(default)g)")
    a = p.parse_args(argv)
    root = Path(a.info)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    stores = stores_in(root)
    if not stores:
        print(f"{root}: no feature store (features_<fingerprint> folder) here")
        return 0
    status = 0
    for d in stores:
        status = max(status, inspect_store(d, a.verify, a.compact, int(a.shard_mb * 2**20)))
    return status


if __name__ == "__main__":
    sys.exit(main())
