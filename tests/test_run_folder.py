"""One run per folder: a second start refuses (or moves the old run aside), a lock keeps a second process
out (and never outlives a killed one), atomic writes use unique temporary files, and a plug_in comparison's
table file is keyed by its arm list."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from benchmarks.engine.config import load_config, save_config
from benchmarks.engine import (RunFolderLocked, RunFolderTaken, RunLock, Trainer, TrainingInterrupted, atomic_save,
                               train)
from benchmarks.engine.runfolder import atomic_write

from _scripts import ROOT, ok, one_line_error, run, sets, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(*_):
    pass


def cfg_of(*extra):
    return load_config("synthetic", tiny(1, "run.progress=false", *extra))


def _snapshot(folder):
    """Every file of a run folder with its bytes (the lock file, which names its latest holder, left out)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- atomic writes
def test_concurrent_atomic_writers_of_one_path_never_crash(tmp_path):
    """Six writers of one checkpoint (and of one config.yaml) at once: each write goes through its own
    temporary file, so none fails and the final files load; no temporary file is left."""
    target, cfg_file = tmp_path / "last.pth", tmp_path / "config.yaml"
    state = {"w": torch.zeros(20000)}
    cfg = load_config("synthetic", [])
    start, errors = threading.Barrier(6), []

    def writer(i):
        try:
            start.wait()
            for _ in range(15):
                atomic_save({**state, "i": i}, target)
                save_config(cfg, cfg_file)
        except Exception as e:  # noqa: BLE001 -- collected, the test reports it
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.load(target, weights_only=False)["i"] in range(6)
    assert load_config(cfg_file) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "last.pth"]


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "results.json"
    f.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as h:
            h.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(f, broken)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_write_fsyncs_before_the_rename_and_uses_the_given_temporary(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    f = tmp_path / "shard.bin"
    atomic_write(f, lambda tmp: Path(tmp).write_bytes(b"abc"), fsync=True, tmp=tmp_path / ".part-1")
    assert events == [("fsync", 3), ("replace", str(tmp_path / ".part-1"), str(f))] and f.read_bytes() == b"abc"
    events.clear()
    atomic_write(f, lambda tmp: Path(tmp).write_bytes(b"de"))
    assert [e[0] for e in events] == ["replace"] and f.read_bytes() == b"de"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin"]


# ----------------------------------------------------------------------------- one run per folder
def test_a_new_run_refuses_a_folder_that_holds_another_run(tmp_path):
    run_dir = tmp_path / "x"
    for name in ("config.yaml", "log.jsonl", "last.pth", "results.json"):
        run_dir.mkdir(exist_ok=True)
        for f in run_dir.iterdir():
            f.unlink()
        (run_dir / name).write_text("of the first run")
        with pytest.raises(RunFolderTaken) as e:
            Trainer(cfg_of("train.seed=5"), run_dir, echo=quiet)
        msg = str(e.value)
        assert "\n" not in msg and str(run_dir) in msg and name in msg, msg
        assert all(w in msg for w in ("--resume", "--name", "--move-aside", "run.move_aside=true")), msg
        assert (run_dir / name).read_text() == "of the first run"
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", name]
    with pytest.raises(RunFolderTaken):  # train() too (every entry point goes through it)
        train(cfg_of("train.seed=5"), run_dir, echo=quiet)
    # run.move_aside: the old folder is renamed to a fresh sibling, untouched; the new run gets an empty one
    before = _snapshot(run_dir)
    t = Trainer(cfg_of("train.seed=5", "run.move_aside=true"), run_dir, echo=quiet)
    t.release()
    t2 = Trainer(cfg_of("train.seed=6", "run.move_aside=true"), run_dir, echo=quiet)  # empty: nothing to move
    t2.release()
    (run_dir / "config.yaml").write_text("of the second run")
    t3 = Trainer(cfg_of("train.seed=6", "run.move_aside=true"), run_dir, echo=quiet)
    t3.release()
    old = sorted(p for p in tmp_path.iterdir() if p.name.startswith("x.old-"))
    assert len(old) == 2 and t.moved_aside == str(old[0]) and t3.moved_aside == str(old[1]), old
    assert _snapshot(old[0]) == before
    assert (old[1] / "config.yaml").read_text() == "of the second run"
    assert [p.name for p in run_dir.iterdir()] == [".lock"]


def test_a_run_stopped_before_its_first_checkpoint_starts_again_only_with_its_own_config(tmp_path):
    """No checkpoint, no result and the same config (outside ``run``): the same run, started again in
    place (what plug_in.py --resume does with such a folder); another config is refused."""
    cfg = cfg_of()
    save_config(cfg, tmp_path / "r" / "config.yaml")
    (tmp_path / "r" / "log.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(RunFolderTaken):
        Trainer(cfg_of("train.seed=5"), tmp_path / "r", echo=quiet)
    Trainer(cfg_of("run.log_every=3"), tmp_path / "r", echo=quiet).release()
    (tmp_path / "r" / "last.pth").write_text("x")
    with pytest.raises(RunFolderTaken):
        Trainer(cfg, tmp_path / "r", echo=quiet)


def test_second_cli_start_refuses_and_move_aside_keeps_both_runs(tmp_path):
    args = ["--out", tmp_path, "--name", "x", "--no-progress", *sets(tiny(1))]
    ok(run("examples/train_dpcn.py", *args))
    before = _snapshot(tmp_path / "x")
    assert {"config.yaml", "log.jsonl", "last.pth", "best.pth", "results.json"} <= set(before)
    p = run("examples/train_dpcn.py", *args, "--seed", "5")
    one_line_error(p, str(tmp_path / "x"), "already holds another run", "--resume", "--name", "--move-aside")
    assert _snapshot(tmp_path / "x") == before  # nothing overwritten, nothing appended
    ok(run("examples/train_dpcn.py", *args, "--seed", "5", "--move-aside"))
    old = [p for p in tmp_path.iterdir() if p.name.startswith("x.old-")]
    assert len(old) == 1 and _snapshot(old[0]) == before
    assert "seed: 5" in (tmp_path / "x" / "config.yaml").read_text()
    events = [json.loads(line) for line in (tmp_path / "x" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1 and events[0]["moved_aside"] == str(old[0])


# ----------------------------------------------------------------------------- the lock
_HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from benchmarks.engine.runfolder import RunLock
RunLock({folder!r}).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(folder):
    p = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=str(ROOT), folder=str(folder))],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_keeps_a_second_process_out_and_dies_with_its_holder(tmp_path):
    cfg = cfg_of("train.checkpoint_every_iters=2")
    t = Trainer(cfg, tmp_path / "r", stop_after_iters=2, echo=quiet)
    with pytest.raises(TrainingInterrupted):
        t.fit()
    t.release()
    assert (tmp_path / "r" / "last.pth").is_file()
    holder = _hold_lock(tmp_path / "r")
    try:
        with pytest.raises(RunFolderLocked) as e:
            Trainer(cfg, tmp_path / "r", resume=True, echo=quiet)
        assert f"process {holder.pid}" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(RunFolderLocked):
            RunLock(tmp_path / "r").acquire()
        one_line_error(run("examples/train_dpcn.py", "--resume", tmp_path / "r", "--no-eval"),
                       str(tmp_path / "r"), f"in use by process {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert holder.returncode == -signal.SIGKILL
    # the lock died with its holder: the run resumes (the lock file stays, holding the dead PID)
    resumed = Trainer(cfg, tmp_path / "r", resume=True, echo=quiet)
    resumed.fit()
    resumed.release()
    assert resumed.global_step == 4


def test_train_holds_the_lock_through_training_and_evaluation(tmp_path, monkeypatch):
    """Another process cannot take the lock while train() validates or evaluates; afterwards it can."""
    import benchmarks.engine.final_eval as final_eval_mod
    import benchmarks.engine.trainer as trainer_mod
    probe = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
             f"from benchmarks.engine.runfolder import RunLock; RunLock({str(tmp_path / 'r')!r}).acquire()"]
    seen = []
    real = trainer_mod.evaluate_model

    def evaluate_and_probe(*a, **k):
        seen.append(subprocess.run(probe, capture_output=True, text=True, timeout=120))
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "evaluate_model", evaluate_and_probe)  # the validations
    monkeypatch.setattr(final_eval_mod, "evaluate_model", evaluate_and_probe)  # the final test
    train(cfg_of(), tmp_path / "r", echo=quiet)
    assert len(seen) == 2  # the epoch's validation and the final test
    for p in seen:
        assert p.returncode != 0 and "RunFolderLocked" in p.stderr and f"process {os.getpid()}" in p.stderr, p.stderr
    assert subprocess.run(probe, capture_output=True, timeout=120).returncode == 0


# ----------------------------------------------------------------------------- plug_in's table file
def _fake_run(folder, miou):
    folder.mkdir(parents=True)
    row = {"label": "trained", "miou": miou, "fbiou": miou + 10.0, "class_iou": {"1": miou}, "per_seed": []}
    (folder / "results_val.json").write_text(json.dumps({"rows": [row], "protocol_text": "synthetic fold 0",
                                                         "train_seconds": 1.0}))


KEYED = "table6_pfenet_val_" + "[0-9a-f]" * 8 + ".json"  # table6_<host>_<split>_<key>.json


def test_plug_in_table_file_is_keyed_by_the_arm_list(tmp_path):
    base = tmp_path / "plug_in_pfenet"
    for tag, m in (("pfenet", 40.0), ("pfenet_dcm", 42.0), ("pfenet_dcm_residual-l1", 43.0)):
        _fake_run(base / f"{tag}_f0_seed321", m)
    cmd = ["benchmarks/plug_in.py", "--host", "pfenet", "--out", tmp_path, "--seeds", "1", "--report-only"]
    ok(run(*cmd))  # the default arm list: table6_pfenet_val.json
    default = base / "table6_pfenet_val.json"
    first = default.read_bytes()
    assert list(json.loads(first)["arms"]) == ["pfenet", "pfenet+dcm"]
    out = ok(run(*cmd, "--arms", "pfenet", "pfenet+dcm[residual+l1]"))
    keyed = list(base.glob(KEYED))
    assert len(keyed) == 1 and keyed[0].name in out and keyed[0].with_suffix(".md").is_file()
    assert list(json.loads(keyed[0].read_text())["arms"]) == ["pfenet", "pfenet+dcm[residual+l1]"]
    assert default.read_bytes() == first  # the other comparison's table is untouched
    ok(run(*cmd, "--arms", "pfenet", "pfenet+dcm[residual+l1]"))  # the same comparison rewrites its own file
    assert list(base.glob(KEYED)) == keyed
    # a default-named file that holds another arm list (an older version's) is not replaced either
    legacy = json.loads(first)
    legacy["arms"] = {"pfenet": {}, "pfenet+dcm[paper]": {}}
    default.write_text(json.dumps(legacy))
    held = default.read_bytes()
    out = ok(run(*cmd))
    assert default.read_bytes() == held and "table6_pfenet_val_" in out
