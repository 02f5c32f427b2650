"""CPU CI for the Triton kernels: run ``tests/kernels_interpreted.py`` under Triton's interpreter.

``TRITON_INTERPRET=1`` has to be in the environment before Triton is imported, so the kernel tests run
in a fresh interpreter process; this test fails unless every one of them passes (none skipped).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_under_the_cpu_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (it ships with the CUDA builds of torch)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        "tests/kernels_interpreted.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    tail = p.stdout[-4000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    summary = p.stdout.strip().splitlines()[-1]
    assert re.search(r"\b(\d+) passed", summary) and int(re.search(r"(\d+) passed", summary).group(1)) >= 20, tail
    assert "skipped" not in summary and "failed" not in summary and "error" not in summary, tail
