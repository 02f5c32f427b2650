"""Memoised frozen-backbone features, stored on disk once per (backbone weights, input sample).

What is cached
    With a frozen backbone (BatchNorm in eval mode, no trainable parameter in the stage) ``forward_mid``
    and ``forward_high`` are pure functions of their input, and with a deterministic training transform
    (``data.augment: flip``: a fixed resize and a horizontal flip) the same few inputs come back every
    epoch, in every seed, in every network trained on the same data and in every later session.
    :class:`FeatureCache` keys each *sample* of a batch by a 128-bit BLAKE2b digest of its bytes (plus the
    stage, dtype, shape, the autocast dtype when autocast is on, and the :func:`weights_fingerprint` of
    the backbone; not the device: a store filled on CPU serves a GPU run, up to float rounding),
    computes the misses of a
    batch together and returns the stored tensors for the hits, so a step pays the backbone only for
    inputs no process has seen before. Networks are unchanged: they call ``forward_mid`` /
    ``forward_high`` as before and the backbone consults its ``feature_cache`` attribute
    (:class:`models.backbones.base.Backbone`).

Where it is stored (``train.cache_backbone_dir``)
    One *store* folder per backbone fingerprint, ``<cache_dir>/features_<fingerprint>/``
    (:class:`FeatureStore`), holding immutable *shard* files ``shard-<pid>-<uuid>.fcs``. A shard is::

        b"DCMFEAT2" | u64 index length | u32 CRC-32 of the index | 4 zero bytes      (24-byte header)
        index: UTF-8 JSON {"format": 2, "namespace", "byteorder", "layouts", "keys", "entries",
                           "data_offset", "data_bytes"}
        zero padding to 64 bytes, then the data: per entry, per output, the raw bytes of the tensor
        (C order, its own dtype: float32 in float32 runs, bf16 under autocast...), each 64-byte aligned

    ``layouts`` lists the distinct output signatures (a single tensor or a tuple, and each output's
    dtype and per-sample shape), ``keys`` the 16-byte sample keys (hex) and ``entries`` per key its
    layout, data offset and the CRC-32 of its bytes. A shard is written by one process to a
    uniquely named temporary file in the store (``.tmp-shard-<pid>-<uuid>.part``), flushed, fsync'd
    and ``os.replace``'d to its unique final name, so concurrent writers (background comparisons,
    DDP ranks, other hosts on a shared file system) never collide and readers never see a partial
    shard. Shards are never modified; the same key written by two processes is harmless (the first
    shard read wins; ``--compact`` deduplicates).

    Reading maps each shard with ``torch.from_file`` (a private, lazily paged ``mmap``): a store of any
    size costs the process only its index (tens of bytes per entry) and the pages the OS cache keeps;
    a hit copies exactly the stored bytes into the returned batch (bitwise). A shard is validated when
    first opened (magic, index CRC, namespace, dtypes, every entry's extent against the data size and
    the file size against the index), and a corrupt or truncated one is skipped with one warning naming
    it (its entries are then recomputed). ``python benchmarks/feature_store.py --verify`` also checks
    the per-entry CRCs (not done on the training path, where it would cost as much as a hit).

Memory and spilling
    New entries of a process stay in its memory until they reach ``spill_bytes`` (default
    ``min(max_bytes, 512 MiB)``), then are written as one new shard and dropped from memory; what is
    left is written when a training run ends (``benchmarks/engine/trainer.py``), when
    ``benchmarks/plug_in.py`` ends (:func:`save_shared_caches`) and at interpreter exit. So memory stays
    bounded and nothing stops being stored: ``train.cache_backbone_gb`` only bounds the spill size.
    Without a store folder (``cache_dir=None``) the cache is memory-only as before and ``max_bytes``
    is its cap (new entries are no longer stored once it is full).

Seeing other processes' features
    A store lists its folder when it is created, at each :func:`attach_feature_cache` of a shared
    cache (every training run of ``plug_in.py``) and, on a miss, at most every ``rescan_seconds``
    (30 s), so concurrent processes pick up each other's shards as they are spilled.

In-process sharing
    ``attach_feature_cache(shared=True)`` gives every backbone with the same weights (same cap and
    folder) the same :class:`FeatureCache` in a process (``plug_in.py`` trains all arms and seeds of
    a fold in one process, and a model's deep copy shares its backbone's cache).

Older single-file caches
    ``features_<fingerprint>.pt`` files written by earlier versions (and by :meth:`FeatureCache.save`)
    are still read: :func:`attach_feature_cache` imports such a file found in ``cache_dir`` into the
    store once (a marker ``imported-<file>-<size>-<mtime>`` in the store records it) and says so on
    stderr; the file is then no longer needed and can be deleted.

Exactness
    A hit returns the bytes computed for the identical input, possibly in a batch of other misses,
    so a cached run equals an uncached one up to the float differences between batch compositions of
    the same convolution (tested to 1e-5 on the training losses); a batch of misses only returns the
    computed outputs themselves.

Command line (inspect / verify / compact a store, or every store of a cache folder)::

    python benchmarks/feature_store.py --info DIR [--verify] [--compact [--shard-mb 512]]
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import struct
import sys
import time
import uuid
import warnings
import weakref
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .runfolder import atomic_write

__all__ = ["FeatureCache", "FeatureStore", "attach_feature_cache", "attach_from_config", "detach_feature_cache",
           "weights_fingerprint", "cache_file", "store_dir", "save_shared_caches", "write_shard", "ShardError",
           "FeatureStoreWarning", "stores_in", "inspect_store"]

Output = Union[Tensor, Tuple[Tensor, ...]]

#: default size of the new entries a process holds before writing them as a shard
DEFAULT_SPILL_BYTES = 512 << 20
#: default seconds between two listings of a store's folder on misses
DEFAULT_RESCAN_SECONDS = 30.0

_MAGIC = b"DCMFEAT2"
_HEADER = struct.Struct("<8sQI4x")  # magic, index length, index CRC-32, padding: 24 bytes
_ALIGN = 64
_FORMAT = 2
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".fcs"
_TMP_PREFIX = ".tmp-shard-"
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
                              torch.int16, torch.int32, torch.int64, torch.bool)}

_SHARED: Dict[Tuple[str, int, Optional[str]], "FeatureCache"] = {}
_LIVE: "weakref.WeakSet[FeatureCache]" = weakref.WeakSet()


class ShardError(ValueError):
    """A shard file that is not a valid feature-store shard (corrupt, truncated, foreign)."""


class FeatureStoreWarning(UserWarning):
    """A shard was skipped, or new features could not be written."""


def weights_fingerprint(module: nn.Module) -> str:
    """BLAKE2b digest (hex, 16 bytes) of a module's parameters and buffers, names included."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _bytes(t: Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy() if t.numel() else b"")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _autocast_tag(device_type: str) -> str:
    """Part of the keys computed under autocast (its outputs have another dtype and precision); empty
    otherwise, so that keys without autocast are those of earlier versions."""
    try:
        if torch.is_autocast_enabled(device_type):
            return f"|autocast={torch.get_autocast_dtype(device_type)}"
    except (TypeError, AttributeError, RuntimeError):  # pragma: no cover - older torch
        pass
    return ""


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _as_tuple(out: Output) -> Tuple[Tensor, ...]:
    return (out,) if isinstance(out, Tensor) else tuple(out)


# ------------------------------------------------------------------------------------------ shards
class _Layout:
    """The signature of one entry: single tensor or tuple, each output's dtype and shape, and where
    each output lies relative to the entry's offset."""

    __slots__ = ("single", "specs", "rel", "sizes", "size")

    def __init__(self, single: bool, specs: Sequence[Tuple[str, Tuple[int, ...]]]):
        self.single = bool(single)
        self.specs = [(_dtype(d), tuple(int(s) for s in shape)) for d, shape in specs]
        if self.single and len(self.specs) != 1:
            raise ShardError("a single-tensor layout with several outputs")
        self.rel, self.sizes, pos = [], [], 0
        for dt, shape in self.specs:
            if any(s < 0 for s in shape):
                raise ShardError(f"negative shape {shape}")
            n = dt.itemsize
            for s in shape:
                n *= s
            self.rel.append(pos)
            self.sizes.append(n)
            pos = _align(pos + n)
        self.size = pos

    def as_json(self) -> list:
        return [self.single, [[str(dt), list(shape)] for dt, shape in self.specs]]


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ShardError(f"unsupported dtype {name!r}") from None


def _signature(out: Output) -> tuple:
    single = isinstance(out, Tensor)
    return (single, tuple((str(t.dtype), tuple(t.shape)) for t in _as_tuple(out)))


def write_shard(directory, namespace: str, entries: Iterable[Tuple[bytes, Output]]) -> Optional[Path]:
    """Write ``(key, output)`` entries (per-sample outputs, any device) as a new shard in ``directory``:
    a unique temporary file, fsync'd, then ``os.replace``'d to a unique ``shard-<pid>-<uuid>.fcs``
    (:func:`~benchmarks.engine.runfolder.atomic_write`).
    Returns its path (``None`` when there is no entry)."""
    entries = list(entries)
    if not entries:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sigs: Dict[tuple, int] = {}
    layouts: List[_Layout] = []
    rows, keys, offset = [], [], 0
    crcs = []
    for key, out in entries:
        sig = _signature(out)
        if sig not in sigs:
            sigs[sig] = len(layouts)
            layouts.append(_Layout(sig[0], sig[1]))
        li = sigs[sig]
        crc = 0
        for t in _as_tuple(out):
            crc = zlib.crc32(_bytes(t), crc)
        crcs.append(crc)
        rows.append([li, offset, crc])
        keys.append(bytes(key).hex())
        offset += layouts[li].size
    index = {"format": _FORMAT, "namespace": namespace, "byteorder": sys.byteorder,
             "layouts": [lay.as_json() for lay in layouts], "keys": keys, "entries": rows,
             "data_offset": 0, "data_bytes": offset}
    # data_offset depends on the index's length, which depends (a little) on data_offset: iterate
    for _ in range(4):
        blob = json.dumps(index, separators=(",", ":")).encode()
        data_offset = _align(_HEADER.size + len(blob))
        if index["data_offset"] == data_offset:
            break
        index["data_offset"] = data_offset
    blob = json.dumps(index, separators=(",", ":")).encode()
    if _align(_HEADER.size + len(blob)) != index["data_offset"]:  # pragma: no cover - converges in 2 rounds
        raise RuntimeError("feature store: index layout did not converge")
    tag = f"{os.getpid()}-{uuid.uuid4().hex}"
    final = directory / f"{_SHARD_PREFIX}{tag}{_SHARD_SUFFIX}"
    pad = bytes(_ALIGN)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, len(blob), zlib.crc32(blob)))
            f.write(blob)
            f.write(pad[: index["data_offset"] - _HEADER.size - len(blob)])
            for (key, out), (li, _, _) in zip(entries, rows):
                lay = layouts[li]
                for t, n in zip(_as_tuple(out), lay.sizes):
                    f.write(_bytes(t))
                    f.write(pad[: _align(n) - n])

    return atomic_write(final, write, fsync=True, tmp=directory / f"{_TMP_PREFIX}{tag}.part")


class _Shard:
    """One shard, validated and memory-mapped (read-only use of a private mapping)."""

    def __init__(self, path: Path, namespace: Optional[str]):
        self.path = Path(path)
        size = os.stat(self.path).st_size
        with open(self.path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise ShardError(f"truncated header ({size} bytes)")
            magic, n_index, crc = _HEADER.unpack(head)
            if magic != _MAGIC:
                raise ShardError("not a feature-store shard (bad magic)")
            if _HEADER.size + n_index > size:
                raise ShardError(f"truncated index ({size} bytes, index needs {_HEADER.size + n_index})")
            blob = f.read(n_index)
        if len(blob) != n_index or zlib.crc32(blob) != crc:
            raise ShardError("index checksum mismatch")
        try:
            index = json.loads(blob)
            if index.get("format") != _FORMAT:
                raise ShardError(f"format {index.get('format')!r}, expected {_FORMAT}")
            if index.get("byteorder") != sys.byteorder:
                raise ShardError(f"written on a {index.get('byteorder')}-endian machine")
            self.namespace = str(index["namespace"])
            if namespace is not None and self.namespace != namespace:
                raise ShardError(f"features of other backbone weights ({self.namespace}, expected {namespace})")
            self.layouts = [_Layout(s, specs) for s, specs in index["layouts"]]
            self.data_offset, data_bytes = int(index["data_offset"]), int(index["data_bytes"])
            self.keys = [bytes.fromhex(k) for k in index["keys"]]
            rows = index["entries"]
        except ShardError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ShardError(f"invalid index ({type(e).__name__}: {e})") from None
        if self.data_offset < _HEADER.size + n_index or self.data_offset % _ALIGN:
            raise ShardError(f"invalid data offset {self.data_offset}")
        if self.data_offset + data_bytes != size:
            raise ShardError(f"file has {size} bytes, its index describes {self.data_offset + data_bytes} (truncated?)")
        if len(rows) != len(self.keys):
            raise ShardError("index has different numbers of keys and entries")
        self.rows: List[Tuple[int, int, int]] = []
        for row in rows:
            try:
                li, off, crc = (int(v) for v in row)
            except (ValueError, TypeError):
                raise ShardError("invalid index entry") from None
            if not 0 <= li < len(self.layouts) or off < 0 or off % _ALIGN or off + self.layouts[li].size > data_bytes:
                raise ShardError(f"entry at offset {off} lies outside the data ({data_bytes} bytes)")
            self.rows.append((li, off, crc))
        self.nbytes = size
        self.data_bytes = data_bytes
        self._buf = torch.from_file(str(self.path), shared=False, size=size, dtype=torch.uint8) if size else None

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, i: int) -> Output:
        """Entry ``i``: views into the mapping (copy them before the shard could be dropped)."""
        li, off, _ = self.rows[i]
        lay = self.layouts[li]
        start = self.data_offset + off
        outs = tuple(self._buf[start + r: start + r + n].view(dt).view(shape)
                     for (dt, shape), r, n in zip(lay.specs, lay.rel, lay.sizes))
        return outs[0] if lay.single else outs

    def crc_ok(self, i: int) -> bool:
        crc = 0
        for t in _as_tuple(self.get(i)):
            crc = zlib.crc32(_bytes(t), crc)
        return crc == self.rows[i][2]


def _shard_names(directory: Path) -> List[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(_SHARD_PREFIX) and n.endswith(_SHARD_SUFFIX))


class FeatureStore:
    """The shards of one backbone fingerprint in one folder (see the module docstring).

    Args:
        directory: the store folder (created when missing).
        namespace: the backbone's :func:`weights_fingerprint`; shards of other weights are skipped.
        rescan_seconds: :meth:`maybe_rescan` lists the folder at most this often.
    """

    def __init__(self, directory, namespace: str, *, rescan_seconds: float = DEFAULT_RESCAN_SECONDS):
        self.directory = Path(directory)
        self.namespace = namespace
        self.rescan_seconds = float(rescan_seconds)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._shards: Dict[str, _Shard] = {}
        self._bad: Dict[str, str] = {}
        self._index: Dict[bytes, Tuple[_Shard, int]] = {}
        self._last_scan = float("-inf")
        self.rescan()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    @property
    def shards(self) -> List[Path]:
        return [s.path for s in self._shards.values()]

    @property
    def skipped(self) -> Dict[str, str]:
        """Shards skipped as invalid: file name -> reason."""
        return dict(self._bad)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._shards.values())

    def rescan(self) -> int:
        """Open the shards written since the last scan; returns how many new keys they brought."""
        self._last_scan = time.monotonic()
        before = len(self._index)
        for name in _shard_names(self.directory):
            if name not in self._shards and name not in self._bad:
                self._open(name)
        return len(self._index) - before

    def maybe_rescan(self) -> int:
        if time.monotonic() - self._last_scan >= self.rescan_seconds:
            return self.rescan()
        return 0

    def _open(self, name: str) -> None:
        path = self.directory / name
        try:
            shard = _Shard(path, self.namespace)
        except FileNotFoundError:  # removed meanwhile (compaction): nothing to warn about
            return
        except (ShardError, OSError, RuntimeError) as e:
            self._bad[name] = str(e)
            warnings.warn(f"feature store: skipping shard {path}: {e} (its features are recomputed; "
                          f"delete the file or run benchmarks/feature_store.py --compact)", FeatureStoreWarning,
                          stacklevel=3)
            return
        self._shards[name] = shard
        for i, key in enumerate(shard.keys):
            self._index.setdefault(key, (shard, i))

    def get(self, key: bytes) -> Optional[Output]:
        """The stored output of ``key`` (views into the shard's mapping) or ``None``."""
        hit = self._index.get(key)
        return None if hit is None else hit[0].get(hit[1])

    def write(self, entries: Iterable[Tuple[bytes, Output]]) -> Optional[Path]:
        """Write a new shard of ``entries`` and serve them from it; returns its path."""
        path = write_shard(self.directory, self.namespace, entries)
        if path is not None:
            self._open(path.name)
        return path

    def items(self) -> Iterator[Tuple[bytes, Output]]:
        for key, (shard, i) in self._index.items():
            yield key, shard.get(i)


# ------------------------------------------------------------------------------------------ the cache
class FeatureCache:
    """Per-sample memo of frozen backbone stages (see the module docstring).

    Args:
        max_bytes: without a store, stop storing new entries once they take this many bytes (the
            lookups still work; misses are then computed every time). With a store, the default
            spill threshold is ``min(max_bytes, 512 MiB)``.
        namespace: prefix of every key (the backbone's :func:`weights_fingerprint`).
        store_dir: folder of the on-disk :class:`FeatureStore` (``None``: memory only).
        spill_bytes: with a store, new entries are written as a shard once they take this many bytes.
        rescan_seconds: with a store, how often a miss may list the folder for other processes' shards.

    Attributes:
        hits, misses: per-sample counts since creation.
        bytes: bytes of the entries held in memory (not yet in a shard).
        store: the :class:`FeatureStore` or ``None``.
    """

    def __init__(self, max_bytes: int = 8 << 30, namespace: str = "", *, store_dir=None,
                 spill_bytes: Optional[int] = None, rescan_seconds: float = DEFAULT_RESCAN_SECONDS):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        if spill_bytes is not None and spill_bytes < 0:
            raise ValueError(f"spill_bytes: expected >= 0, got {spill_bytes}")
        self.max_bytes = int(max_bytes)
        self.spill_bytes = int(min(self.max_bytes, DEFAULT_SPILL_BYTES) if spill_bytes is None else spill_bytes)
        self.namespace = namespace
        self.rescan_seconds = float(rescan_seconds)
        self.store: Optional[FeatureStore] = None
        self._mem: Dict[bytes, Output] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.written: List[Path] = []
        self._pid = os.getpid()
        if store_dir is not None:
            self.use_store(store_dir)
        _LIVE.add(self)

    # a deep copy of a model (e.g. to evaluate its best checkpoint) shares the cache: the backbone it
    # copies is frozen and identical
    def __deepcopy__(self, memo):
        return self

    def __len__(self) -> int:
        if self.store is None:
            return len(self._mem)
        return len(self.store) + sum(1 for k in self._mem if k not in self.store)

    def use_store(self, store_dir) -> "FeatureStore":
        """Back this cache by the store in ``store_dir`` (the entries held in memory are spilled there)."""
        self.store = FeatureStore(store_dir, self.namespace, rescan_seconds=self.rescan_seconds)
        if self.bytes > self.spill_bytes:
            self.flush()
        return self.store

    def _key(self, kind: str, x: Tensor, tag: str = "") -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.namespace}|{kind}|{x.dtype}|{tuple(x.shape)}{tag}".encode())
        h.update(_bytes(x))
        return h.digest()

    def _get(self, key: bytes) -> Optional[Output]:
        v = self._mem.get(key)
        if v is None and self.store is not None:
            v = self.store.get(key)
        return v

    def _known(self, key: bytes) -> bool:
        return key in self._mem or (self.store is not None and key in self.store)

    def _add(self, key: bytes, entry: Output) -> bool:
        """Keep a per-sample output (CPU tensors); spills or respects the cap. Returns whether kept."""
        if self._known(key):
            return False
        size = sum(_nbytes(t) for t in _as_tuple(entry))
        if self.store is None:
            if self.bytes + size > self.max_bytes:
                return False
        elif self._mem and self.bytes + size > self.spill_bytes:
            self.flush()
        self._mem[key] = entry
        self.bytes += size
        if self.store is not None and self.bytes > self.spill_bytes:  # a single entry over the threshold
            self.flush()
        return True

    def lookup(self, kind: str, x: Tensor, compute: Callable[[Tensor], Output]) -> Output:
        """``compute(x)`` for a batch ``x [B, ...]``, each sample's output taken from the memo when present."""
        n = x.shape[0]
        if n == 0:
            return compute(x)
        tag = _autocast_tag(x.device.type)
        keys = [self._key(kind, x[i], tag) for i in range(n)]
        miss = [i for i, k in enumerate(keys) if not self._known(k)]
        if miss and self.store is not None and self.store.maybe_rescan():
            miss = [i for i, k in enumerate(keys) if not self._known(k)]
        self.hits += n - len(miss)
        self.misses += len(miss)
        missing = set(miss)
        hit_entries = [(i, self._get(keys[i])) for i in range(n) if i not in missing]
        outs: Tuple[Tensor, ...] = ()
        single = None
        if miss:
            out = compute(x[miss] if len(miss) < n else x)
            single = isinstance(out, Tensor)
            outs = _as_tuple(out)
            for j, i in enumerate(miss):
                entry = tuple(o[j].detach().clone() if o.device.type == "cpu" else o[j].detach().cpu() for o in outs)
                self._add(keys[i], entry[0] if single else entry)
            if not hit_entries:
                return outs[0] if single else tuple(outs)
        # hit entries are views into a shard's mapping or tensors in memory: copy them out now (a spill
        # during this call drops the in-memory ones)
        first = hit_entries[0][1]
        if single is None:
            single = isinstance(first, Tensor)
        per = [_as_tuple(e) for _, e in hit_entries]
        result = []
        for j in range(len(per[0])):
            stacked = torch.stack([p[j] for p in per]).to(x.device)
            if not miss:
                result.append(stacked)
                continue
            full = torch.empty((n,) + tuple(outs[j].shape[1:]), dtype=outs[j].dtype, device=outs[j].device)
            full[[i for i, _ in hit_entries]] = stacked.to(full.device)
            full[miss] = outs[j]
            result.append(full)
        return result[0] if single else tuple(result)

    def flush(self) -> Optional[Path]:
        """Write the entries held in memory as a new shard of the store and drop them from memory.
        Without a store, does nothing. A failed write (disk full...) drops them with a warning."""
        if self.store is None or not self._mem or os.getpid() != self._pid:
            return None
        entries = list(self._mem.items())
        self._mem.clear()
        self.bytes = 0
        try:
            path = self.store.write(entries)
        except (OSError, ValueError, RuntimeError) as e:
            warnings.warn(f"feature store: could not write {len(entries)} new features to {self.store.directory} "
                          f"({e}); they will be recomputed", FeatureStoreWarning, stacklevel=2)
            return None
        if path is not None:
            self.written.append(path)
        return path

    # ---------------------------------------------------------------- the single-file format (format 1)
    def save(self, path) -> Path:
        """Write every entry (memory and store) to one file at ``path`` in the single-file format of
        earlier versions (holds them all in memory while saving); :meth:`load` reads it back. The file
        is written to a unique temporary name, then renamed (:func:`~benchmarks.engine.runfolder.atomic_write`)."""
        store: Dict[bytes, Output] = {}
        if self.store is not None:
            for k, v in self.store.items():
                store[k] = v.clone() if isinstance(v, Tensor) else tuple(t.clone() for t in v)
        store.update(self._mem)
        return atomic_write(path, lambda tmp: torch.save({"format": 1, "namespace": self.namespace, "store": store}, tmp))

    def load(self, path) -> int:
        """Add the entries of a single-file cache (:meth:`save`, earlier versions) for the same backbone
        weights; returns how many were added. Without a store they count against ``max_bytes``; with
        one they are spilled into it. A file of other weights or an unreadable one is an error."""
        path = Path(path)
        try:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, ValueError, OSError) as e:
                if isinstance(e, FileNotFoundError):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"feature cache '{path}' cannot be read ({type(e).__name__}); delete it") from None
        if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("store"), dict):
            raise ValueError(f"feature cache '{path}' is not a dcm feature-cache file; delete it")
        if data["namespace"] != self.namespace:
            raise ValueError(f"feature cache '{path}' holds features of other backbone weights; delete it or "
                             f"choose another train.cache_backbone_dir")
        added = 0
        for k, v in data["store"].items():
            if self._known(k):
                continue
            entry = v if isinstance(v, Tensor) else tuple(v)
            size = sum(_nbytes(t) for t in _as_tuple(entry))
            if self.store is None and self.bytes + size > self.max_bytes:
                break
            # copy out of the file's mapping (the copy is dropped when spilled)
            self._add(k, entry.clone() if isinstance(entry, Tensor) else tuple(t.clone() for t in entry))
            added += 1
        return added

    def stats(self) -> str:
        total = self.hits + self.misses
        rate = 100.0 * self.hits / total if total else 0.0
        if self.store is None:
            return f"{len(self)} entries, {self.bytes / 2**30:.2f} GiB, hit rate {rate:.1f}% of {total} samples"
        s = self.store
        return (f"{len(self)} entries ({len(s)} on disk in {len(s.shards)} shards, {s.nbytes / 2**30:.2f} GiB; "
                f"{len(self._mem)} in memory, {self.bytes / 2**30:.2f} GiB), hit rate {rate:.1f}% of {total} samples")


# ------------------------------------------------------------------------------------------ attaching
def cache_file(cache_dir, cache: FeatureCache) -> Path:
    """The single-file cache of ``cache`` in ``cache_dir`` (format of earlier versions)."""
    return Path(cache_dir) / f"features_{cache.namespace}.pt"


def store_dir(cache_dir, namespace: str) -> Path:
    """The store folder of the backbone weights ``namespace`` in ``cache_dir``."""
    return Path(cache_dir) / f"features_{namespace}"


def _import_single_file(cache: FeatureCache, cache_dir) -> None:
    """Import ``cache_dir/features_<fp>.pt`` (earlier versions) into the store once."""
    legacy = cache_file(cache_dir, cache)
    try:
        st = legacy.stat()
    except OSError:
        return
    marker = cache.store.directory / f"imported-{legacy.name}-{st.st_size}-{st.st_mtime_ns}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # claims the import (one process)
    except FileExistsError:
        return
    os.close(fd)
    try:
        n = cache.load(legacy)
    except ValueError as e:
        os.unlink(marker)
        warnings.warn(f"feature store: {e}", FeatureStoreWarning, stacklevel=3)
        return
    cache.flush()
    print(f"feature cache: imported the {n} features of the single-file cache {legacy} into the store "
          f"{cache.store.directory}; {legacy.name} is no longer needed (delete it to free "
          f"{st.st_size / 2**30:.2f} GiB)", file=sys.stderr)


def attach_feature_cache(model: nn.Module, max_bytes: int = 8 << 30, *, shared: bool = True, cache_dir=None,
                         spill_bytes: Optional[int] = None,
                         rescan_seconds: float = DEFAULT_RESCAN_SECONDS) -> FeatureCache:
    """Give ``model.backbone`` a :class:`FeatureCache`.

    With ``shared`` the cache of a previous call for a backbone with the same weights, ``max_bytes``
    and ``cache_dir`` (in this process) is reused (its store rescanned for other processes' shards).
    With ``cache_dir`` the cache is backed by the on-disk store :func:`store_dir` ``(cache_dir,
    fingerprint)`` (a single-file cache of earlier versions found there is imported once). Raises if the
    backbone is not frozen."""
    bb = getattr(model, "backbone", None)
    if bb is None or not hasattr(bb, "feature_cache"):
        raise ValueError("train.cache_backbone: the model has no models.backbones backbone to cache")
    if not getattr(bb, "freeze_bn", False):
        raise ValueError("train.cache_backbone: needs a backbone with frozen BatchNorm (freeze_backbone_bn=True)")
    if any(p.requires_grad for p in bb.mid_level_parameters()):
        raise ValueError("train.cache_backbone: the backbone's mid-level stages are trainable")
    fp = weights_fingerprint(bb)
    sdir = store_dir(cache_dir, fp) if cache_dir is not None else None
    key = (fp, int(max_bytes), str(Path(sdir).resolve()) if sdir is not None else None)
    cache = _SHARED.get(key) if shared else None
    if cache is None:
        cache = FeatureCache(max_bytes, namespace=fp, store_dir=sdir, spill_bytes=spill_bytes,
                             rescan_seconds=rescan_seconds)
        if cache_dir is not None:
            _import_single_file(cache, cache_dir)
        if shared:
            _SHARED[key] = cache
    elif cache.store is not None:
        cache.store.rescan()
    bb.feature_cache = cache
    return cache


def attach_from_config(model: nn.Module, cfg: dict) -> Optional[FeatureCache]:
    """The cache a resolved config asks for (``train.cache_backbone``, ``train.cache_backbone_gb``,
    ``train.cache_backbone_dir``) attached to ``model``'s backbone, as training and the evaluation of a
    finished run use it; ``None`` when the config asks for none."""
    t = cfg["train"]
    if not t["cache_backbone"]:
        return None
    return attach_feature_cache(model, int(float(t["cache_backbone_gb"]) * 2 ** 30), cache_dir=t.get("cache_backbone_dir"))


def detach_feature_cache(model: nn.Module) -> Optional[FeatureCache]:
    """Remove the backbone's cache (returned)."""
    bb = getattr(model, "backbone", None)
    cache = getattr(bb, "feature_cache", None)
    if bb is not None and cache is not None:
        bb.feature_cache = None
    return cache


def save_shared_caches(cache_dir) -> list:
    """Write the new entries of every cache of this process (:func:`attach_feature_cache` with
    ``shared``) to the stores in ``cache_dir`` (a memory-only cache gets a store there); returns the
    paths of the shards written."""
    out = []
    for c in list(_SHARED.values()):
        if c.store is None:
            if not c._mem:
                continue
            c.use_store(store_dir(cache_dir, c.namespace))
        p = c.flush()
        if p is not None:
            out.append(p)
    return out


@atexit.register
def _flush_at_exit() -> None:
    for c in list(_LIVE):
        try:
            c.flush()
        except Exception as e:  # pragma: no cover - never fail an exiting interpreter
            print(f"feature cache: could not write the last new features: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ inspecting a store
def stores_in(path: Path) -> List[Path]:
    """The store folders at ``path``: ``path`` itself when it is a store, else its ``features_*`` folders."""
    if _shard_names(path) or (path.name.startswith("features_") and path.is_dir()):
        return [path]
    return sorted(p for p in path.glob("features_*") if p.is_dir())


def inspect_store(directory: Path, verify: bool = False, compact: bool = False,
                  shard_bytes: int = DEFAULT_SPILL_BYTES) -> int:
    """Print a store's shards, entries, layouts, invalid shards and unfinished writes; with ``verify`` also
    check every entry's CRC, with ``compact`` rewrite the store as shards of ``shard_bytes`` without
    duplicates or invalid shards. Returns an exit status: 0, 1 (invalid shards or failed checksums) or 2
    (``compact`` of a store holding several backbones' features)."""
    names = _shard_names(directory)
    shards, bad = [], {}
    for name in names:
        try:
            shards.append(_Shard(directory / name, None))
        except FileNotFoundError:
            continue
        except (ShardError, OSError, RuntimeError) as e:
            bad[name] = str(e)
    namespaces = sorted({s.namespace for s in shards})
    keys = {k for s in shards for k in s.keys}
    total = sum(len(s) for s in shards)
    size = sum(s.nbytes for s in shards)
    tmps = [n for n in os.listdir(directory) if n.startswith(_TMP_PREFIX)]
    print(f"{directory}: {len(shards)} shards, {total} entries ({len(keys)} distinct), {size / 2**30:.3f} GiB"
          f"{', weights ' + ', '.join(namespaces) if namespaces else ''}")
    layouts = {}
    for s in shards:
        for li, _, _ in s.rows:
            lay = s.layouts[li]
            sig = ("tensor " if lay.single else "tuple ") + ", ".join(
                f"{str(dt).replace('torch.', '')}{list(shape)}" for dt, shape in lay.specs)
            layouts[sig] = layouts.get(sig, 0) + 1
    for sig, n in sorted(layouts.items(), key=lambda kv: -kv[1]):
        print(f"  {n:8d} x {sig}")
    for name, why in bad.items():
        print(f"  invalid shard {name}: {why}")
    if tmps:
        print(f"  {len(tmps)} temporary file(s) of unfinished writes: {', '.join(tmps[:5])}")
    status = 1 if bad else 0
    if verify:
        n_bad = 0
        for s in shards:
            wrong = [i for i in range(len(s)) if not s.crc_ok(i)]
            if wrong:
                n_bad += len(wrong)
                print(f"  {s.path.name}: {len(wrong)} of {len(s)} entries fail their checksum")
        print(f"  verify: {total - n_bad} of {total} entries have their checksum")
        status = max(status, 1 if n_bad else 0)
    if compact:
        if len(namespaces) > 1:
            print("  compact: shards of several backbone weights in one store; not compacting", file=sys.stderr)
            return 2
        seen, batch, batch_bytes, written = set(), [], 0, []
        for s in shards:
            for i, k in enumerate(s.keys):
                if k in seen or (verify and not s.crc_ok(i)):
                    continue
                seen.add(k)
                e = s.get(i)
                batch.append((k, e))
                batch_bytes += s.layouts[s.rows[i][0]].size
                if batch_bytes >= shard_bytes:
                    written.append(write_shard(directory, namespaces[0], batch))
                    batch, batch_bytes = [], 0
        if batch:
            written.append(write_shard(directory, namespaces[0], batch))
        now = time.time()
        removed = 0
        for name in [s.path.name for s in shards] + list(bad):
            try:
                os.unlink(directory / name)
                removed += 1
            except FileNotFoundError:
                pass
        for name in tmps:  # unfinished writes older than an hour (their writer has gone)
            p = directory / name
            try:
                if now - p.stat().st_mtime > 3600:
                    p.unlink()
            except OSError:
                pass
        print(f"  compacted: {len(seen)} entries in {len(written)} new shard(s), {removed} old shard(s) removed")
        status = 0
    return status
