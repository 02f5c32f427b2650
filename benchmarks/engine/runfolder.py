"""One run folder, one run: the lock and the check that keep a second run out of a folder, and atomic
writes through uniquely named temporary files.

:func:`claim_run_folder` (rank 0 of every :class:`~benchmarks.engine.trainer.Trainer`, before anything is
written) takes the folder's lock, then

* resuming (``--resume``): keeps the folder as it is; the run continues its files;
* starting: refuses a folder that already holds a run (any of :data:`RUN_FILES`) with
  :class:`~benchmarks.engine.errors.RunFolderTaken`, unless ``move_aside`` (config ``run.move_aside=true``,
  ``train_dpcn.py --move-aside``) is set: then the folder is renamed to a fresh sibling
  (:func:`move_aside`: ``<name>.old-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``, ... when that name exists)
  and the run starts in a new folder. Nothing is deleted or overwritten. One case is the same run
  started again: a folder that holds no checkpoint and no result (only ``config.yaml``, ``log.jsonl``,
  ``reference.json``, ``tb/``) and whose ``config.yaml`` equals the new run's config outside the ``run``
  section (a run stopped before its first checkpoint, e.g. under ``plug_in.py --resume``) is used again,
  its ``log.jsonl`` continued as a resumed run's is.

:class:`RunLock` is an exclusive, non-blocking ``fcntl.flock`` on ``<run>/.lock``, held by rank 0 from the
construction of the Trainer to the end of :func:`~benchmarks.engine.trainer.train` (training and final
evaluation); the file holds the PID and host of its holder, and a second process gets
:class:`~benchmarks.engine.errors.RunFolderLocked` naming them. The kernel releases a ``flock`` when the
last descriptor of it closes, i.e. when its process ends however it ends (SIGKILL included), so a lock file
left by a killed run never blocks ``--resume``; the file itself stays. The lock is re-entrant within a
process (one descriptor per folder, counted). Forked DataLoader workers inherit the descriptor and exit
with their parent. ``flock`` on network file systems may be local to each host.

:func:`atomic_write` writes through a temporary file with a unique name in the destination's folder and
``os.replace`` (optionally ``fsync``'d first): concurrent writers never share a temporary file, a reader
sees the old or the new file, never a truncated one, and a failed write removes its temporary file. Every
atomic write of the harness goes through it: checkpoints, configs, the feature store's shards and
single-file caches, the GPU matrix's files. This module imports nothing heavier than
:mod:`benchmarks.engine.errors`.
"""
from __future__ import annotations

import errno
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from .errors import RunFolderError, RunFolderLocked, RunFolderTaken

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

__all__ = ["RUN_FILES", "LOCK_NAME", "RunLock", "claim_run_folder", "run_files", "move_aside", "atomic_write"]

#: the files whose presence means that a folder holds a run
RUN_FILES = ("config.yaml", "log.jsonl", "last.pth", "best.pth", "results.json", "reference.json")
#: files of a run that has trained or evaluated something (never started again in place)
_PROGRESS_FILES = ("last.pth", "best.pth", "results.json")
LOCK_NAME = ".lock"

_HELD: Dict[str, list] = {}  # realpath of a lock file -> [descriptor, holders in this process]
_GUARD = threading.Lock()


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None], *, fsync: bool = False,
                 tmp: Union[str, os.PathLike, None] = None) -> Path:
    """``write(tmp)`` writes the content to the file ``tmp``, which then replaces ``path`` (``os.replace``);
    on failure the temporary file is removed and the error re-raised.

    Args:
        tmp: the temporary file, in ``path``'s folder and unique to this write (default
            ``<name>.<pid>-<random hex>.tmp`` beside ``path``); ``write`` creates it with the usual permissions.
        fsync: ``os.fsync`` the temporary file before the rename, so that the new content is on the disk
            before any reader can see it (survives a crash of the machine, not only of the process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(tmp) if tmp is not None else str(path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"))
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


class RunLock:
    """The exclusive lock of a run folder (``<run_dir>/.lock``); :meth:`acquire` raises
    :class:`~benchmarks.engine.errors.RunFolderLocked` when another process holds it. Usable as a context
    manager."""

    def __init__(self, run_dir: Union[str, os.PathLike]):
        self.path = Path(run_dir) / LOCK_NAME
        self._key: Optional[str] = None
        self.moved_aside: Optional[Path] = None  # set by claim_run_folder: where the folder's earlier run went

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> "RunLock":
        if self.held or fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with _GUARD:
            entry = _HELD.get(key)
            if entry is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _holder(fd)
                    os.close(fd)
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise RunFolderLocked(
                        f"run folder '{self.path.parent}' is in use by {holder} (lock '{self.path}'); wait until "
                        f"that run ends or stop it, or start this run in another folder (--name / --out)",
                        self.path.parent, holder) from None
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                entry = _HELD[key] = [fd, 0]
            entry[1] += 1
        self._key = key
        return self

    def release(self) -> None:
        if not self.held:
            return
        with _GUARD:
            key, self._key = self._key, None
            entry = _HELD.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _HELD[key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])

    def _shared(self) -> bool:
        """Whether another holder in this process holds the same lock."""
        with _GUARD:
            entry = _HELD.get(self._key) if self.held else None
            return entry is not None and entry[1] > 1

    def _moved(self, new_run_dir: Path) -> None:
        """The folder was renamed to ``new_run_dir``: the descriptor (still locked) now belongs there."""
        if not self.held:
            self.path = Path(new_run_dir) / LOCK_NAME
            return
        with _GUARD:
            entry = _HELD.pop(self._key)
            self.path = Path(new_run_dir) / LOCK_NAME
            self._key = os.path.realpath(self.path)
            _HELD[self._key] = entry

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """``process <pid> on <host>`` from a lock file's content (``another process`` when unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        parts = os.read(fd, 200).decode(errors="replace").split()
    except OSError:
        parts = []
    if parts and parts[0].isdigit():
        return f"process {parts[0]}" + (f" on {parts[1]}" if len(parts) > 1 and parts[1] != socket.gethostname() else "")
    return "another process"


def run_files(run_dir: Union[str, os.PathLike]) -> List[str]:
    """The :data:`RUN_FILES` present in ``run_dir`` (empty: the folder holds no run)."""
    run_dir = Path(run_dir)
    return [f for f in RUN_FILES if (run_dir / f).exists()]


def move_aside(run_dir: Union[str, os.PathLike]) -> Path:
    """Rename ``run_dir`` to a sibling that does not exist yet, ``<name>.old-<YYYYmmdd-HHMMSS>`` (``-2``,
    ``-3``, ... appended when taken); returns the new path."""
    run_dir = Path(run_dir)
    stem = f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 10000):
        new = run_dir.with_name(stem if i == 1 else f"{stem}-{i}")
        if new.exists():
            continue
        try:
            os.rename(run_dir, new)  # a sibling created meanwhile: not empty -> OSError, try the next name
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        return new
    raise FileExistsError(f"no free name to move '{run_dir}' aside ('{stem}-N' up to 9999 exist)")


def _same_run(run_dir: Path, cfg: Optional[dict]) -> bool:
    """The folder holds no checkpoint and no result, and its config.yaml is ``cfg`` outside ``run``."""
    if cfg is None or any((run_dir / f).exists() for f in _PROGRESS_FILES) or not (run_dir / "config.yaml").is_file():
        return False
    import yaml

    from .config import dump_config
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    new = yaml.safe_load(dump_config(cfg))
    if not isinstance(saved, dict):
        return False
    if isinstance(saved.get("model"), dict):  # a config of an earlier release: its model in this release's form
        from models.migrate import migrate_model_config
        try:
            saved["model"] = migrate_model_config(saved["model"], warn=False)
        except (ValueError, TypeError):
            return False
    return {k: v for k, v in saved.items() if k != "run"} == {k: v for k, v in new.items() if k != "run"}


def claim_run_folder(run_dir: Union[str, os.PathLike], *, resume: bool, cfg: Optional[dict] = None,
                     move: bool = False, echo: Callable[[str], None] = print) -> RunLock:
    """Lock ``run_dir`` for this run and check that it may start there (module docstring).

    Returns the held :class:`RunLock` (``release()`` it when the run ends). Raises
    :class:`~benchmarks.engine.errors.RunFolderLocked` (another process holds the folder) or
    :class:`~benchmarks.engine.errors.RunFolderTaken` (a new run, the folder holds another run, ``move`` not
    set). With ``move`` such a folder is renamed (:func:`move_aside`) and the returned lock is the new folder's.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder '{run_dir}' is a file, not a folder; choose another --name / --out", run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        found = [] if resume else run_files(run_dir)
        if not found or _same_run(run_dir, cfg):
            return lock
        if not move:
            raise RunFolderTaken(
                f"run folder '{run_dir}' already holds another run ({', '.join(found)}); continue it with --resume, "
                f"start this run in another folder (--name / --out), or move the old folder aside to "
                f"'{run_dir.name}.old-<time>' with --move-aside or --set run.move_aside=true", run_dir, found)
        if lock._shared():
            raise RunFolderLocked(f"run folder '{run_dir}' is in use by this process; it cannot be moved aside",
                                  run_dir, "this process")
        old = move_aside(run_dir)
        lock._moved(old)
        echo(f"moved the earlier run in '{run_dir}' ({', '.join(found)}) to '{old}'")
        fresh = RunLock(run_dir).acquire()
        fresh.moved_aside = old
        lock.release()
        return fresh
    except BaseException:
        lock.release()
        raise
