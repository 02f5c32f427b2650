"""benchmarks/dcm_diagnose.py on two tiny finished runs: per-class differences equal the runs' own
class IoU, per-episode measures line up with the stored episodes, the gate per epoch is read."""
import json
import math
import subprocess
import sys

from _scripts import ROOT

SETS = ["data.args={image_size: 32, num_images: 120}", "data.train_episodes=8", "data.num_workers=0",
        "train.epochs=2", "train.batch_size=4", "train.val_episodes=4", "eval.episodes=12",
        "model.flags.reduce_dim=8"]


def test_diagnose_two_tiny_runs(tmp_path):
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "benchmarks/plug_in.py"), "--host", "canet", "--out", str(tmp_path),
           "--no-progress", "--seeds", "1", "--arms", "canet", "canet+dcm", "--backbone-weights", "random"]
    for o in SETS:
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    runs = tmp_path / "plug_in_canet"
    host, dcm = runs / "canet_f0_seed321", runs / "canet_dcm_f0_seed321"
    out = tmp_path / "diag" / "x"
    q = subprocess.run([sys.executable, str(ROOT / "benchmarks/dcm_diagnose.py"), "--host-run", str(host),
                        "--dcm-run", str(dcm), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-2000:]
    d = json.loads(out.with_suffix(".json").read_text())
    rows = {r: json.loads((run / "results_val.json").read_text())["rows"][-1] for r, run in (("h", host), ("d", dcm))}
    for c, r in d["classes"].items():
        assert math.isclose(r["host_iou"], rows["h"]["class_iou"][c], abs_tol=1e-6)
        assert math.isclose(r["difference"], rows["d"]["class_iou"][c] - rows["h"]["class_iou"][c], abs_tol=1e-6)
        assert 0.0 <= r["fit"] <= 1.0 and r["contribution"] >= 0.0
    assert len(d["episodes"]["fit"]) == 12 and len(d["episodes"]["delta_iou"]) == 12
    assert [g["epoch"] for g in d["gate"]] == [1, 2] and all(g["dcm_gamma"]["dcm_fuse"] > 0 for g in d["gate"])
    assert "Gate over training" in out.with_suffix(".md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/dcm_diagnose.py"), "--host-run", str(tmp_path),
                          "--dcm-run", str(dcm), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "best.pth" in bad.stderr and "Traceback" not in bad.stderr


def test_gate_marks_only_the_chosen_epoch(tmp_path):
    """Every epoch line whose validation improved says ``best``; best.pth is the last of them, so only that
    epoch is the chosen one."""
    from benchmarks.dcm_diagnose import _gates
    lines = [{"event": "start"}]
    for ep, best in ((1, True), (2, True), (3, False)):
        lines.append({"event": "epoch", "epoch": ep, "dcm_gamma": {"f": 0.01 * ep}, "val_miou": 40.0,
                      **({"best": True} if best else {})})
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    g = _gates(tmp_path)
    assert [x["epoch"] for x in g] == [1, 2, 3] and [x["best"] for x in g] == [False, True, False]
    assert _gates(tmp_path / "missing") == []
