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
    # the exact number of tests the file defines, collected the same way, must all have passed
    c = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-p",
                        "no:xdist", "tests/kernels_interpreted.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    m = re.search(r"(\d+) tests? collected", c.stdout)
    assert c.returncode == 0 and m, c.stdout[-2000:] + c.stderr[-2000:]
    expected = int(m.group(1))
    summary = p.stdout.strip().splitlines()[-1]
    got = re.search(r"\b(\d+) passed", summary)
    assert got and int(got.group(1)) == expected, (expected, tail)
    assert "skipped" not in summary and "failed" not in summary and "error" not in summary, tail
