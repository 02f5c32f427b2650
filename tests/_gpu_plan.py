"""The SWEEP_PLAN of benchmarks/gpu_session.sh, read from the script (tests/test_gpu_session.py and
tests/kernels_interpreted.py check it)."""
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def sweep_plan(text=None):
    """The plan's lines as ``[{id, dtype, ops: [..], knobs: {name: int}}]`` (``text``: the script's text)."""
    text = SCRIPT.read_text() if text is None else text
    block = text.split("\nSWEEP_PLAN='", 1)[1].split("'", 1)[0]
    plan = []
    for line in block.splitlines():
        f = line.split()
        if f:
            cid, dtype, ops, *kv = f
            plan.append(dict(id=cid, dtype=dtype, ops=ops.split(","),
                             knobs={k: int(v) for k, v in (x.split("=") for x in kv)}))
    return plan
