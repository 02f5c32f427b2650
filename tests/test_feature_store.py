"""The on-disk feature store of benchmarks/engine/feature_cache.py: shards shared by processes, spilling,
exactness, corrupt shards, unique temporary names, the single-file format and the command line."""
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from benchmarks import feature_store
from benchmarks.engine import feature_cache as fc
from benchmarks.engine.feature_cache import (FeatureCache, FeatureStoreWarning, attach_feature_cache,
                                             cache_file, store_dir)

from _scripts import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD = re.compile(r"^shard-\d+-[0-9a-f]{32}\.fcs$")


def _stage(x):
    """A fake frozen 'mid' stage: two outputs of different dtypes and shapes."""
    return (x * 2 + 1, x.sum(dim=1, keepdim=True).double())


def _never(x):
    raise AssertionError("computed although every sample should be a hit")


def _batches(seed, n=6, b=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 8, 8, generator=g) for _ in range(n)]


def _entry_bytes():
    return sum(t[0].numel() * t.element_size() for t in _stage(torch.zeros(1, 3, 8, 8)))


def _equal(a, b):
    a, b = fc._as_tuple(a), fc._as_tuple(b)
    return len(a) == len(b) and all(u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v)
                                    for u, v in zip(a, b))


# ------------------------------------------------------------------------------ (a) concurrent writers
_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    sys.path.insert(0, sys.argv[4])
    from benchmarks.engine.feature_cache import FeatureCache
    d, seed, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, os.path.join(sys.argv[4], "tests"))
    from test_feature_store import _batches, _stage, _entry_bytes
    c = FeatureCache(namespace="ns", store_dir=d, spill_bytes=3 * _entry_bytes(), rescan_seconds=3600)
    open(os.path.join(ready, str(seed)), "w").close()
    t0 = time.time()
    while len(os.listdir(ready)) < 2 and time.time() - t0 < 60:  # start writing together
        time.sleep(0.01)
    for x in _batches(seed) + _batches(0, n=2):  # seed 0: the same inputs in both processes
        c.lookup("mid", x, _stage)
        c.lookup("high", x[:, :1], lambda y: y * 3)
    c.flush()
    print(len(c.written), c.misses)
""")


def test_two_processes_write_one_store_and_a_third_reads_both(tmp_path):
    d = tmp_path / "store"
    ready = tmp_path / "ready"
    ready.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(d), str(seed), str(ready), str(ROOT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for seed in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Warning" not in err, err[-3000:]
        assert int(out.split()[0]) >= 3  # several shards each, written while the other process wrote
    names = os.listdir(d)
    assert names and all(SHARD.match(n) for n in names), names  # no temporary file left behind
    assert len({n.split("-")[1] for n in names}) == 2  # both writers' shards
    reader = FeatureCache(namespace="ns", store_dir=d)
    assert not reader.store.skipped
    for seed in (1, 2, 0):
        for x in _batches(seed, n=6 if seed else 2):
            assert _equal(reader.lookup("mid", x, _never), _stage(x))
            assert _equal(reader.lookup("high", x[:, :1], _never), x[:, :1] * 3)
    assert reader.misses == 0 and reader.hits == 2 * 4 * (6 + 6 + 2)
    assert len(reader) == 2 * 4 * (6 + 6 + 2)  # the inputs both wrote are stored (maybe twice), counted once


def test_a_writer_picks_up_shards_of_another_process(tmp_path):
    a = FeatureCache(namespace="ns", store_dir=tmp_path, rescan_seconds=3600)
    b = FeatureCache(namespace="ns", store_dir=tmp_path, rescan_seconds=0)
    x = _batches(3, n=1)[0]
    a.lookup("mid", x, _stage)
    a.flush()
    assert _equal(b.lookup("mid", x, _never), _stage(x)) and b.hits == 4  # rescanned on the miss
    y = _batches(4, n=1)[0]
    b.lookup("mid", y, _stage)
    b.flush()
    with pytest.raises(AssertionError, match="computed"):  # a lists the folder at most every hour...
        a.lookup("mid", y, _never)
    a.store.rescan()  # ...or when asked (attach_feature_cache does at each run)
    assert _equal(a.lookup("mid", y, _never), _stage(y))


# ------------------------------------------------------------------------------ (b) spilling
def test_spill_keeps_memory_bounded_and_every_entry_found(tmp_path):
    spill = int(2.5 * _entry_bytes())
    c = FeatureCache(max_bytes=spill, namespace="ns", store_dir=tmp_path, rescan_seconds=3600)
    assert c.spill_bytes == spill
    xs = _batches(5)
    for x in xs:
        out = c.lookup("mid", x, _stage)
        assert _equal(out, _stage(x))
        assert c.bytes <= spill and len(c._mem) <= 2
    c.flush()
    assert c.bytes == 0 and not c._mem
    assert len(c.store.shards) >= len(xs) * 4 // 2 and len(c) == len(xs) * 4  # the cap no longer stops storing
    for x in xs:  # the writer itself and a fresh reader find every entry
        assert _equal(c.lookup("mid", x, _never), _stage(x))
        assert _equal(FeatureCache(namespace="ns", store_dir=tmp_path).lookup("mid", x, _never), _stage(x))
    # an entry larger than the threshold is written at once
    big = FeatureCache(namespace="ns", store_dir=tmp_path / "big", spill_bytes=10)
    big.lookup("mid", xs[0], _stage)
    assert big.bytes == 0 and len(big.written) == 4


def test_mixed_batches_and_duplicates(tmp_path):
    c = FeatureCache(namespace="ns", store_dir=tmp_path, spill_bytes=_entry_bytes())
    x = _batches(6, n=1)[0]
    c.lookup("mid", x[:2], _stage)
    c.flush()
    calls = []

    def stage(y):
        calls.append(y.shape[0])
        return _stage(y)

    z = torch.cat([x[1:3], x[1:2], x[3:]])  # stored, new, stored again, new
    assert _equal(c.lookup("mid", z, stage), _stage(z)) and calls == [2] and (c.hits, c.misses) == (2, 4)
    new = _batches(7, n=1)[0]
    y = torch.cat([new[:1], new[:1], new[1:2]])  # the same new input twice in one batch: stored once
    assert _equal(c.lookup("mid", y, stage), _stage(y)) and calls == [2, 3]
    assert len(c) == 6


# ------------------------------------------------------------------------------ (c) exactness on a backbone
def _lite0():
    from models.backbones import build_backbone
    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", weights="random").eval()


class _Holder(torch.nn.Module):
    def __init__(self, bb):
        super().__init__()
        self.backbone = bb


def test_cached_equals_uncached_on_a_backbone(tmp_path):
    bb = _lite0()
    x = torch.randn(3, 3, 32, 32)
    ref_mid = bb.forward_mid(x)
    ref_high = bb.forward_high(ref_mid[1])
    cache = attach_feature_cache(_Holder(bb), shared=False, cache_dir=tmp_path, spill_bytes=1 << 16)
    assert cache.store.directory == store_dir(tmp_path, cache.namespace)
    mid = bb.forward_mid(x)  # misses: the computed outputs themselves
    assert _equal(mid, ref_mid) and _equal(bb.forward_high(mid[1]), ref_high)
    cache.flush()
    assert cache.misses == 6 and len(cache.store) == 6
    bb2 = _lite0()  # same weights in a "later session": a new cache on the same store
    cache2 = attach_feature_cache(_Holder(bb2), shared=False, cache_dir=tmp_path)
    mid2 = bb2.forward_mid(x)
    assert _equal(mid2, ref_mid) and _equal(bb2.forward_high(mid2[1]), ref_high)  # bitwise, dtypes, shapes
    assert cache2.hits == 6 and cache2.misses == 0
    y = torch.cat([torch.randn(1, 3, 32, 32), x[2:]])
    got = bb2.forward_mid(y)
    bb.feature_cache = None
    want = bb.forward_mid(y)
    assert torch.equal(got[0][1], ref_mid[0][2]) and torch.equal(got[1][1], ref_mid[1][2])
    torch.testing.assert_close(got[0][0], want[0][0], rtol=1e-5, atol=1e-6)  # a batch composition apart


def test_autocast_features_have_their_own_keys(tmp_path):
    c = FeatureCache(namespace="ns", store_dir=tmp_path)
    x = _batches(8, n=1)[0]
    lin = lambda y: (y.flatten(1) @ torch.ones(192, 5),)  # noqa: E731
    plain = c.lookup("mid", x, lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = c.lookup("mid", x, lin)
    assert plain[0].dtype == torch.float32 and low[0].dtype == torch.bfloat16 and c.misses == 8
    c.flush()
    r = FeatureCache(namespace="ns", store_dir=tmp_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _equal(r.lookup("mid", x, _never), low)
    assert _equal(r.lookup("mid", x, _never), plain)


# ------------------------------------------------------------------------------ (d) corrupt shards
def test_corrupt_or_truncated_shards_are_skipped_with_one_warning(tmp_path):
    c = FeatureCache(namespace="ns", store_dir=tmp_path)
    xs = _batches(9, n=2)
    c.lookup("mid", xs[0], _stage)
    good = c.flush()
    c.lookup("mid", xs[1], _stage)
    victim = c.flush()
    data = victim.read_bytes()
    victim.write_bytes(data[:-7])  # truncated
    bad = {victim.name: "describes"}
    for name, blob, why in (("shard-1-" + "a" * 32 + ".fcs", b"garbage" * 20, "bad magic"),
                            ("shard-2-" + "b" * 32 + ".fcs", data[:30] + bytes([data[30] ^ 1]) + data[31:], "checksum"),
                            ("shard-3-" + "c" * 32 + ".fcs", data[:10], "truncated header"),
                            ("shard-4-" + "d" * 32 + ".fcs", b"", "truncated header")):
        (tmp_path / name).write_bytes(blob)
        bad[name] = why
    foreign = fc.write_shard(tmp_path, "other", [(b"k" * 16, torch.ones(2))])
    bad[foreign.name] = "other backbone weights"
    with pytest.warns(FeatureStoreWarning) as rec:
        r = FeatureCache(namespace="ns", store_dir=tmp_path)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == len(bad)
    for name, why in bad.items():
        assert sum(name in m and why in m for m in msgs) == 1, (name, msgs)
    assert set(r.store.skipped) == set(bad) and r.store.shards == [good]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.store.rescan()  # no second warning
        assert _equal(r.lookup("mid", xs[0], _never), _stage(xs[0]))
        assert _equal(r.lookup("mid", xs[1], _stage), _stage(xs[1]))  # recomputed, never read from the bad shard
    assert r.misses == 4


# ------------------------------------------------------------------------------ (e) unique temporary names
def test_shards_and_single_files_use_unique_temporary_names(tmp_path, monkeypatch):
    replaced = []
    real = os.replace
    monkeypatch.setattr(fc.os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real(a, b))[1])
    c = FeatureCache(namespace="ns", store_dir=tmp_path / "s")
    for x in _batches(10, n=2):
        c.lookup("mid", x, _stage)
        c.flush()
    target = cache_file(tmp_path, c)
    c.save(target)
    c.save(target)
    tmps = [a for a, _ in replaced]
    assert len(tmps) == 4 and len(set(tmps)) == 4 and len({b for _, b in replaced[:2]}) == 2
    assert all(str(os.getpid()) in t and not t.endswith(target.name + ".tmp") for t in tmps)
    assert all(SHARD.match(os.path.basename(b)) for _, b in replaced[:2])
    # a failed write leaves no temporary file and drops the entries with a warning
    monkeypatch.setattr(fc.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    c.lookup("mid", _batches(11, n=1)[0], _stage)
    with pytest.warns(FeatureStoreWarning, match="No space left"):
        assert c.flush() is None
    assert sorted(os.listdir(tmp_path / "s")) == sorted(os.path.basename(b) for _, b in replaced[:2])
    assert c.bytes == 0


# ------------------------------------------------------------------------------ single-file caches, CLI
def test_single_file_cache_is_imported_once(tmp_path, capsys):
    bb = _lite0()
    old = attach_feature_cache(_Holder(bb), shared=False)
    x = torch.randn(2, 3, 32, 32)
    ref = bb.forward_mid(x)
    old.save(cache_file(tmp_path, old))
    new = attach_feature_cache(_Holder(_lite0()), shared=False, cache_dir=tmp_path)
    assert "imported the 2 features" in capsys.readouterr().err and len(new.store.shards) == 1
    again = attach_feature_cache(_Holder(_lite0()), shared=False, cache_dir=tmp_path)
    assert capsys.readouterr().err == "" and len(again.store.shards) == 1
    assert _equal(again.lookup("mid", x, _never), ref)


def test_shared_caches_are_saved_to_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "_SHARED", {})
    bb = _lite0()
    c = attach_feature_cache(_Holder(bb), 1 << 30, cache_dir=None)
    bb.forward_mid(torch.randn(2, 3, 32, 32))
    paths = fc.save_shared_caches(tmp_path)
    assert len(paths) == 1 and paths[0].parent == store_dir(tmp_path, c.namespace) and c.bytes == 0
    assert attach_feature_cache(_Holder(bb), 1 << 30) is c  # the same cache, now backed by the store
    assert c.hits == 0 and len(c) == 2
    bb.forward_mid(torch.randn(2, 3, 32, 32))
    d = attach_feature_cache(_Holder(_lite0()), 1 << 30, cache_dir=tmp_path)  # another cache: the store's
    assert d is not c and len(d) == 2


def test_command_line_info_verify_compact(tmp_path, capsys):
    c = FeatureCache(namespace="ns", store_dir=store_dir(tmp_path, "ns"), spill_bytes=_entry_bytes())
    xs = _batches(12, n=2)
    for x in xs:
        c.lookup("mid", x, _stage)
    c.flush()
    key = next(iter(c.store._index))
    fc.write_shard(c.store.directory, "ns", [(key, c.store.get(key))])
    assert feature_store.main(["--info", str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "9 shards, 9 entries (8 distinct)" in out and "verify: 9 of 9" in out and "tuple float32[3, 8, 8]" in out
    assert feature_store.main(["--info", str(tmp_path), "--compact"]) == 0
    assert "compacted: 8 entries in 1 new shard(s), 9 old shard(s) removed" in capsys.readouterr().out
    shards = os.listdir(store_dir(tmp_path, "ns"))
    assert len(shards) == 1
    r = FeatureCache(namespace="ns", store_dir=store_dir(tmp_path, "ns"))
    for x in xs:
        assert _equal(r.lookup("mid", x, _never), _stage(x))
    # a flipped data byte is caught by --verify (the training path validates sizes, not checksums)
    p = store_dir(tmp_path, "ns") / shards[0]
    b = bytearray(p.read_bytes())
    b[-5] ^= 0xFF
    p.write_bytes(bytes(b))
    assert feature_store.main(["--info", str(store_dir(tmp_path, "ns")), "--verify"]) == 1
    assert "1 of 8 entries fail their checksum" in capsys.readouterr().out
    p2 = subprocess.run([sys.executable, str(ROOT / "benchmarks/feature_store.py"), "--info", str(tmp_path)],
                        capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p2.returncode == 0 and "1 shards, 8 entries" in p2.stdout, p2.stderr[-2000:]


def test_training_with_a_store_matches_uncached_and_a_later_session_only_hits(tmp_path, monkeypatch):
    """Uncached, then a cold store, then a warm one in a 'later session' (a process without the shared caches)."""
    import math
    from benchmarks.engine.config import load_config
    from benchmarks.engine import train
    from _scripts import tiny
    runs, caches = [], []
    for i, extra in enumerate([[], ["train.cache_backbone=true", f"train.cache_backbone_dir={tmp_path / 'store'}"]] +
                              [["train.cache_backbone=true", f"train.cache_backbone_dir={tmp_path / 'store'}"]]):
        monkeypatch.setattr(fc, "_SHARED", {})
        cfg = load_config("synthetic", tiny(2, "run.progress=false", *extra))
        runs.append(train(cfg, tmp_path / f"r{i}", echo=lambda *_: None))
        caches.append(list(fc._SHARED.values()))
    cold, warm = caches[1][0], caches[2][0]
    assert cold.misses > 0 and cold.bytes == 0 and cold.written  # flushed when the run ended
    assert warm.misses == 0 and warm.hits == cold.hits + cold.misses and not warm.written
    for r in runs[1:]:
        for hu, hc in zip(runs[0]["history"], r["history"]):
            assert math.isclose(hu["train_loss"], hc["train_loss"], rel_tol=1e-5, abs_tol=1e-6)
            assert math.isclose(hu["val_miou"], hc["val_miou"], abs_tol=1e-3)
        assert math.isclose(runs[0]["results"]["rows"][-1]["miou"], r["results"]["rows"][-1]["miou"], abs_tol=1e-3)
    keys = ("train_loss", "val_miou", "val_fbiou")  # cold and warm store: bitwise the same features
    assert [[h[k] for k in keys] for h in runs[1]["history"]] == [[h[k] for k in keys] for h in runs[2]["history"]]
