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
