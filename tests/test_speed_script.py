"""benchmarks/speed.py runs end to end on the CPU at tiny sizes and writes its JSON table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_script_cpu_tiny(tmp_path):
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--batch", "1", "--size", "6",
        "--channels", "8", "--channels-high", "16", "--ops", "sam,dynconv,fgpool,ffm", "--quick", "--json", str(out),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["env"]["device"] and data["env"]["backend_ours"] == "torch"
    rows = data["rows"]
    ops = {r["op"].split(" ")[0] for r in rows}
    assert {"support_activation", "dynamic_conv", "foreground", "feature"} <= ops
    for r in rows:
        assert r["mode"] in ("fwd", "fwd+bwd")
        assert r["ms"] is not None and r["ms"] > 0, r
    variants = {(r["op"], r["variant"]) for r in rows}
    assert ("support_activation", "literal") in variants and ("support_activation", "common") in variants
    assert "op " in res.stdout and "floor ms" in res.stdout


def test_speed_script_rejects_unknown_op():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--ops", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "unknown ops" in res.stderr


def test_speed_script_sweep_runs_each_configuration(tmp_path):
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--batch", "1", "--size", "6",
           "--channels", "8", "--ops", "dynconv", "--quick", "--sweep", "DW_ROWS=1,4", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    runs = json.loads(out.read_text())["sweep"]
    assert [r["config"] for r in runs] == [{"DW_ROWS": 1}, {"DW_ROWS": 4}]
    for r in runs:
        assert {(x["op"].split(" ")[0], x["mode"], x["variant"]) for x in r["rows"]} == {
            ("dynamic_conv", "fwd", "ours"), ("dynamic_conv", "fwd+bwd", "ours")}  # ours only
        assert all(x["ms"] > 0 for x in r["rows"])
    table = res.stdout[res.stdout.rindex("DW_ROWS=1"):]
    assert "DW_ROWS=4" in table and table.count("*") >= 2  # the fastest of each line is marked


def test_speed_script_sweep_rejects_unknown_knob_and_bad_values():
    for spec, msg in (("NOPE=1", "unknown knob"), ("DW_ROWS=a", "integer values"), ("DW_ROWS=", "integer values")):
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--sweep", spec],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and msg in res.stderr, (spec, res.stderr[-500:])
    env = dict(__import__("os").environ, DCM_DW_ROWS="9")
    res = subprocess.run([sys.executable, "-c", "import dcm.kernels.dynamic_conv"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "DCM_DW_ROWS='9'" in res.stderr
    res = subprocess.run([sys.executable, "-c", "import dcm.kernels as k; k.available()"], cwd=ROOT,
                         env=dict(env, DCM_DW_ROWS="", DCM_SAM_BP="48"), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "DCM_SAM_BP='48'" in res.stderr  # not a silent fallback to the torch path


def test_speed_script_sweep_exits_nonzero_when_a_configuration_fails(tmp_path):
    # an unknown op in the child runs makes each configuration fail; the sweep reports it and exits 1
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--ops", "nope",
           "--sweep", "DW_ROWS=1,2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "2 of 2 configurations failed" in res.stderr, res.stderr[-1000:]
