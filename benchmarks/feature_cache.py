"""Memoised frozen-backbone features: compute each distinct input of a frozen backbone stage once.

With a frozen backbone (BatchNorm in eval mode, no trainable parameter in the stage) ``forward_mid``
and ``forward_high`` are pure functions of their input, and with a deterministic training transform
(``data.augment: flip``: a fixed resize and a horizontal flip) the same few inputs come back every
epoch, in every seed and in every network trained on the same data. :class:`FeatureCache` keys each
*sample* of a batch by a 128-bit BLAKE2b digest of its bytes (plus dtype, shape and a fingerprint of
the backbone's weights), computes the misses of a batch together and returns the stored tensors for
the hits, so a training step pays the backbone only for inputs it has not seen.

The training engine attaches one with ``train.cache_backbone: true`` (one cache per backbone
weights per process, shared by every run of the process: ``benchmarks/plug_in.py`` trains all
arms and seeds of a fold in one process). With ``train.cache_backbone_dir`` a process starts from the
file an earlier process saved there and ``plug_in.py`` saves its cache there when it ends, so that
later processes (other hosts, the test-split evaluation, a resumed comparison) skip the features
already computed. Networks are unchanged: they call ``forward_mid`` /
``forward_high`` as before, and the backbone consults its ``feature_cache`` attribute
(:class:`models.backbones.base.Backbone`).

Exactness: a hit returns the tensor computed for the identical input, possibly in a batch of other
misses, so a cached run equals an uncached one up to the float differences between batch
compositions of the same convolution (tested to 1e-5 on the training losses).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["FeatureCache", "attach_feature_cache", "detach_feature_cache", "weights_fingerprint", "cache_file",
           "save_shared_caches"]

Output = Union[Tensor, Tuple[Tensor, ...]]

_SHARED: Dict[Tuple[str, int], "FeatureCache"] = {}


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


class FeatureCache:
    """Per-sample memo of frozen backbone stages (see the module docstring).

    Args:
        max_bytes: stop storing new entries once the stored tensors take this many bytes (the
            lookups still work; misses are then computed every time).
        namespace: prefix of every key (the backbone's :func:`weights_fingerprint`).

    Attributes:
        hits, misses: per-sample counts since creation.
    """

    def __init__(self, max_bytes: int = 8 << 30, namespace: str = ""):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.namespace = namespace
        self._store: Dict[bytes, Output] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    # a deep copy of a model (e.g. to evaluate its best checkpoint) shares the cache: the backbone it
    # copies is frozen and identical
    def __deepcopy__(self, memo):
        return self

    def __len__(self) -> int:
        return len(self._store)

    def _key(self, kind: str, x: Tensor) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.namespace}|{kind}|{x.dtype}|{tuple(x.shape)}".encode())
        h.update(_bytes(x))
        return h.digest()

    def lookup(self, kind: str, x: Tensor, compute: Callable[[Tensor], Output]) -> Output:
        """``compute(x)`` for a batch ``x [B, ...]``, each sample's output taken from the memo when present."""
        keys = [self._key(kind, x[i]) for i in range(x.shape[0])]
        miss = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        fresh: Dict[int, Output] = {}
        if miss:
            out = compute(x[miss] if len(miss) < x.shape[0] else x)
            single = isinstance(out, Tensor)
            outs = (out,) if single else tuple(out)
            for j, i in enumerate(miss):
                entry = tuple(o[j].clone() for o in outs)
                fresh[i] = entry[0] if single else entry
                size = sum(e.numel() * e.element_size() for e in entry)
                if keys[i] not in self._store and self.bytes + size <= self.max_bytes:
                    self._store[keys[i]] = fresh[i]
                    self.bytes += size
        per = [fresh[i] if i in fresh else self._store[k] for i, k in enumerate(keys)]
        if isinstance(per[0], Tensor):
            return torch.stack(per).to(x.device)
        return tuple(torch.stack([p[j] for p in per]).to(x.device) for j in range(len(per[0])))

    def save(self, path) -> Path:
        """Write the stored entries to ``path`` (atomically); :meth:`load` reads them back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": 1, "namespace": self.namespace, "store": self._store}, tmp)
        os.replace(tmp, path)
        return path

    def load(self, path) -> int:
        """Add the entries of a file written by :meth:`save` for the same backbone weights (up to the
        memory cap); returns how many were added. A file of other weights is an error."""
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"feature cache '{path}' cannot be read ({type(e).__name__}); delete it") from None
        if not isinstance(data, dict) or data.get("format") != 1:
            raise ValueError(f"feature cache '{path}' is not a dcm feature-cache file; delete it")
        if data["namespace"] != self.namespace:
            raise ValueError(f"feature cache '{path}' holds features of other backbone weights; delete it or "
                             f"choose another train.cache_backbone_dir")
        added = 0
        for k, v in data["store"].items():
            if k in self._store:
                continue
            entry = (v,) if isinstance(v, Tensor) else tuple(v)
            size = sum(e.numel() * e.element_size() for e in entry)
            if self.bytes + size > self.max_bytes:
                break
            self._store[k] = v if isinstance(v, Tensor) else tuple(v)
            self.bytes += size
            added += 1
        return added

    def stats(self) -> str:
        total = self.hits + self.misses
        rate = 100.0 * self.hits / total if total else 0.0
        return f"{len(self)} entries, {self.bytes / 2**30:.2f} GiB, hit rate {rate:.1f}% of {total} samples"


def cache_file(cache_dir, cache: FeatureCache) -> Path:
    """The file of ``cache`` in ``cache_dir`` (one per backbone weights)."""
    return Path(cache_dir) / f"features_{cache.namespace}.pt"


def attach_feature_cache(model: nn.Module, max_bytes: int = 8 << 30, *, shared: bool = True,
                         cache_dir=None) -> FeatureCache:
    """Give ``model.backbone`` a :class:`FeatureCache`; with ``shared`` the cache of a previous call for a
    backbone with the same weights (in this process) is reused; with ``cache_dir`` a new cache starts
    from the file a previous process saved there (:func:`cache_file`). Raises if the backbone is not
    frozen."""
    bb = getattr(model, "backbone", None)
    if bb is None or not hasattr(bb, "feature_cache"):
        raise ValueError("train.cache_backbone: the model has no models.backbones backbone to cache")
    if not getattr(bb, "freeze_bn", False):
        raise ValueError("train.cache_backbone: needs a backbone with frozen BatchNorm (freeze_backbone_bn=True)")
    if any(p.requires_grad for p in bb.mid_level_parameters()):
        raise ValueError("train.cache_backbone: the backbone's mid-level stages are trainable")
    fp = weights_fingerprint(bb)
    key = (fp, int(max_bytes))
    cache = _SHARED.get(key) if shared else None
    if cache is None:
        cache = FeatureCache(max_bytes, namespace=fp)
        if cache_dir is not None and cache_file(cache_dir, cache).is_file():
            cache.load(cache_file(cache_dir, cache))
        if shared:
            _SHARED[key] = cache
    bb.feature_cache = cache
    return cache


def detach_feature_cache(model: nn.Module) -> Optional[FeatureCache]:
    """Remove the backbone's cache (returned)."""
    bb = getattr(model, "backbone", None)
    cache = getattr(bb, "feature_cache", None)
    if bb is not None and cache is not None:
        bb.feature_cache = None
    return cache


def save_shared_caches(cache_dir) -> list:
    """Save every cache of this process (:func:`attach_feature_cache` with ``shared``) to ``cache_dir``."""
    return [c.save(cache_file(cache_dir, c)) for c in _SHARED.values() if len(c)]
