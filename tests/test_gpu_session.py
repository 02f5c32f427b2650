"""benchmarks/gpu_session.sh on the CPU: its arguments, the one-line refusal without a GPU, and the
rehearsal (``--rehearse``), which runs the CPU-runnable parts at tiny sizes and packs the outputs in
the layout a GPU run leaves (five files, no folders, among them the record of verified kernels in its
committed form)."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from _gpu_plan import SCRIPT, sweep_plan

ROOT = Path(__file__).resolve().parents[1]

OUTPUTS = {"session.log", "results.json", "summary.txt", "verified.json", "raw.tar.gz"}


def run(args, tmp_path, timeout=60, **env):
    e = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"))
    e.update(env)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, msg", [
    ([], "expected STEP and OUTDIR"), (["all"], "expected STEP and OUTDIR"), (["nope", "out"], "unknown step 'nope'"),
    (["--fast", "all", "out"], "unknown option '--fast'"), (["--budget", "5", "all", "out"], "at least 60"),
    (["--budget"], "--budget needs a value"), (["all", "out", "extra"], "expected STEP and OUTDIR"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, args, msg):
    res = run(args, tmp_path)
    assert res.returncode == 2 and res.stdout == "", (res.returncode, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("gpu_session.sh: ") and msg in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_missing_python_one_line(tmp_path):
    res = run(["all", "out"], tmp_path, PYTHON=str(tmp_path / "no-python"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not found" in res.stderr, res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_fails_fast_with_one_line(tmp_path):
    res = run(["all", "out"], tmp_path)
    assert res.returncode == 3 and res.stdout == "", (res.returncode, res.stdout)
    assert res.stderr.count("\n") == 1, res.stderr
    assert "no CUDA device" in res.stderr and "--rehearse" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_sweep_plan_sweeps_every_knob():
    """Every knob of dcm.kernels.KNOBS takes at least two values in the plan, each one valid; the ids are unique
    and the first line of each dtype is dcm's defaults (the reference column)."""
    from dcm.kernels import KNOBS

    plan = sweep_plan(SCRIPT.read_text())
    assert len({p["id"] for p in plan}) == len(plan) > 0
    for name, (default, lo, hi, pow2, _) in KNOBS.items():
        values = {p["knobs"][name] for p in plan if name in p["knobs"]}
        assert len(values) >= 2, name
        assert all(lo <= v <= hi and not (pow2 and v & (v - 1)) for v in values), (name, values)
    for dtype in {p["dtype"] for p in plan}:
        first = next(p for p in plan if p["dtype"] == dtype)
        assert first["knobs"] == {k: KNOBS[k][0] for k in first["knobs"]}, first
    for p in plan:  # an op's knobs appear exactly when the line times that op
        fams = {"sam": "SAM_", "dynconv": "DW_", "fgpool": "FG_"}
        assert {f for op, f in fams.items() if op in p["ops"]} == {k.split("_")[0] + "_" for k in p["knobs"]}, p


def test_script_speaks_of_the_project_only():
    text = SCRIPT.read_text().lower()
    for word in ("slots?", "lent", "lend", "device machines?", "sends back"):
        assert not re.search(rf"\b{word}\b", text), word


def test_rehearsal_packs_every_step_into_five_files(tmp_path):
    res = run(["--rehearse", "all", "out"], tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    out = tmp_path / "out"
    entries = {p.name for p in out.iterdir()}
    assert entries == OUTPUTS and all((out / n).is_file() and (out / n).stat().st_size < 16 * 2**20 for n in entries)
    assert list((tmp_path / "tmp").glob("dcm-gpu-session.*")) == []  # the work folder is removed

    r = json.loads((out / "results.json").read_text())
    assert r["session"]["mode"] == "rehearse" and r["session"]["step"] == "all"
    assert r["session"]["elapsed_s"] <= r["session"]["budget_s"] == 400
    steps = {s["name"]: s for s in r["steps"]}
    assert list(steps) == ["env", "tests", "record", "speed-float32", "speed-bfloat16", "sweep-plan", "sweep-b1", "sweep-f1",
                           "sweep-report", "models"], list(steps)
    assert all(s["status"] == "ok" and s["rc"] == 0 and 0 < s["timeout"] for s in steps.values()), steps
    assert r["env"]["torch"] == torch.__version__ and r["env"]["gpu"] is None
    assert set(r["env"]["knob_defaults"]) >= {"DW_ROWS", "SAM_BP", "FG_SM_PROGRAMS"}
    from dcm import verification as V

    keys = V.current_keys()
    assert r["env"]["kernel_keys"] == keys and set(r["env"]["auto_with_shipped_record"]) == set(V.OPS)
    # the record: no device, nothing verified; verified.json is the shipped record less its records of other sources
    ver = r["verified"]
    assert ver["device"] is None and ver["auto"] == {}
    assert {op: s["recorded"] for op, s in ver["ops"].items()} == {op: False for op in V.OPS}
    assert {s["why"] for s in ver["ops"].values()} == {"no CUDA device: nothing verified"}
    committed = json.loads((out / "verified.json").read_text())
    shipped = json.loads(V.RECORD_FILE.read_text())
    assert committed["key_scheme"] == shipped["key_scheme"] == V.KEY_SCHEME and committed["about"] == V.ABOUT
    assert committed["records"] == [x for x in shipped["records"] if x["key"] == keys[x["op"]]] == V._document(
        [x for x in shipped["records"] if x["key"] == keys[x["op"]]], V.ABOUT)["records"]
    assert ver["records"] == len(committed["records"])
    # the CUDA tests ran (and skipped themselves: no GPU), counted from their JUnit XML
    c = r["tests"]["counts"]
    assert c["tests"] > 100 and c["skipped"] == c["tests"] and c["failures"] == c["errors"] == 0
    for dt in ("float32", "bfloat16"):
        rows = r["speed"][dt]["rows"]
        assert {x["op"].split(" ")[0] for x in rows} == {"support_activation", "dynamic_conv", "foreground", "feature"}
        assert all(x["ms"] > 0 for x in rows)
    # the sweep: the whole plan validated, the first line of each dtype run (ours only)
    assert r["sweep"]["plan"] == sweep_plan(SCRIPT.read_text())
    runs = {x["id"]: x for x in r["sweep"]["runs"]}
    assert {i for i, x in runs.items() if x["status"] == "ok"} == {"b1", "f1"}
    assert {x["variant"] for x in runs["b1"]["rows"]} == {"ours"}
    assert {x["op"].split(" ")[0] for x in runs["b1"]["rows"]} == {"support_activation", "dynamic_conv", "foreground"}
    assert r["models"] is None  # rehearsal: the networks are built, not timed

    with tarfile.open(out / "raw.tar.gz") as t:
        names = {n.lstrip("./") for n in t.getnames()}
    assert {"env.json", "steps.tsv", "tests.xml", "candidate.json", "verified.json", "verified-summary.json", "speed-float32.json", "speed-bfloat16.json", "sweep-plan.json",
            "sweep/b1.json", "sweep/f1.json", "models.log"} <= names, names
    log = (out / "session.log").read_text()
    for name in steps:
        assert f"=== [{name}] exit 0 (ok)" in log, name
    assert "--- sweep of dynamic_conv, bfloat16" in log and "b1:DW_ROWS=4,DW_PROGRAMS=3168" in log
    summary = (out / "summary.txt").read_text()
    assert summary in log and "every step that ran passed" in summary and summary in res.stdout
    assert "kernels verified on no CUDA device" in summary and "cp OUTDIR/verified.json dcm/kernels/verified.json" in summary
    assert "=== [tests] candidate record: candidate record of 0 ops for no CUDA device" in log
