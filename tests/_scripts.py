"""Helpers of the tests that run the repository's scripts in a subprocess (one thread, warnings off)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the tiny synthetic recipe of the script tests (seconds per run on one CPU thread)
TINY_BASE = [
    "model.backbone_weights=random", "model.flags={reduce_dim: 8, decoder_dim: 8}",
    "data.args={image_size: 32, num_images: 120}", "data.train_episodes=16", "data.num_workers=0",
    "train.batch_size=4", "train.val_episodes=8", "train.val_batch_size=8",
    "eval.episodes=8", "eval.batch_size=8", "eval.reference=none",
]


def tiny(epochs: int = 2, *extra: str) -> list:
    """:data:`TINY_BASE` with ``train.epochs=epochs`` and the ``extra`` overrides."""
    return [*TINY_BASE, f"train.epochs={epochs}", *extra]


def sets(items):
    """``["--set", o1, "--set", o2, ...]``."""
    return [a for o in items for a in ("--set", o)]


def run(script, *args, timeout=300, env=None):
    """``python ROOT/script args...`` from the repository root, one thread, Python warnings off."""
    e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e)


def ok(p):
    """Exit status 0 (the output tails otherwise); returns stdout."""
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p.stdout


def fails(p, *words):
    """A non-zero exit without a traceback whose output names every one of ``words``."""
    assert p.returncode != 0, p.stdout[-2000:]
    msg = p.stderr + p.stdout
    assert "Traceback" not in msg, msg[-3000:]
    for w in words:
        assert w in msg, msg[-2000:]


def one_line_error(p, *words):
    """Exit status 2, no traceback, the error on one ``error:`` line of stderr that names every one of ``words``."""
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
