#!/usr/bin/env bash
# One GPU session of dcm: everything a run on one CUDA device should record, within a time budget,
# packed into a few files of one output folder.
#
#   bash benchmarks/gpu_session.sh [--rehearse] [--budget SECONDS] STEP OUTDIR
#
# STEP:   all      the steps below in this order
#         tests    the CUDA tests, tests/test_*cuda*.py: every fast path against float64, CUDA graphs,
#                  torch.compile, one bf16 training step of each of the six networks (pytest-xdist
#                  workers when it is installed; the timing steps below run alone on the GPU). They
#                  run every op's Triton kernels under DCM_BACKEND=auto through a candidate record of
#                  the current sources (DCM_VERIFIED, dcm/verification.py); then the step `record`
#                  writes verified.json: the record of every op whose CUDA tests all passed (its own
#                  and the shared ones), keyed by its source and this GPU's compute-capability major,
#                  merged with the shipped dcm/kernels/verified.json (its records of other sources are
#                  dropped). The steps after it run under that record: "ours" is what DCM_BACKEND=auto
#                  gives once it is committed. Every step runs `record` (without the tests it adds none);
#                  the step `tests` alone gives the tests the whole budget but the record's box.
#         speed    benchmarks/speed.py's tables (sam, dynconv, fgpool, ffm), float32 and bfloat16
#         sweep    the launch knobs of dcm.kernels.KNOBS, one process per line of SWEEP_PLAN below, each
#                  under DCM_BACKEND=triton: the knobs set the kernels, which it times whether or not
#                  the record verifies them (under auto an unrecorded op would time PyTorch)
#         models   DPCN vs PFENet: training step and 1-shot inference (bf16 autocast, speed.py)
# OUTDIR: gets exactly five files, no folders:
#         session.log   every step's full output, with its command, exit status and time
#         results.json  environment, step statuses, test counts and failures, which ops were verified
#                       and why not, the speed tables, the sweep (plan, every configuration's rows),
#                       the model timings
#         summary.txt   the end of session.log: one line per step and the headline numbers
#         verified.json the record in its committed form: cp OUTDIR/verified.json dcm/kernels/verified.json
#         raw.tar.gz    the per-step logs, speed.py's JSON files and the tests' JUnit XML
# Options: --rehearse (or REHEARSE=1) runs on the CPU what can run there, at tiny sizes: the
#         argument parsing, the wheel install, the environment record, the CUDA tests (they skip
#         themselves there), the record (no device: it adds nothing), speed.py on the CPU, the validation of every sweep configuration and the first of
#         each dtype, the model builds, the packing. Without it, a machine where torch sees no CUDA
#         device gets one line on stderr and exit status 3, before anything is written.
#         --budget SECONDS (default 400, or BUDGET=): the whole session's time. Each step runs
#         under `timeout` for the smaller of its box (below) and what the budget leaves after the
#         time kept for the later steps; a step with under 20 s left is skipped. The sweep takes
#         whatever the other steps leave and stops launching configurations at its deadline.
# Environment: PYTHON (default python3), SWEEP_IDS=b5,f2,... (run only these sweep lines).
# A failing step does not stop the others; the exit status is 0 when every step that ran passed,
# 1 otherwise. Wheels found in .whl/ are installed first into /tmp/site (PYTHONPATH), with no index.
# DCM_* variables of the caller's environment are cleared: the tables time dcm's defaults.
set -u -o pipefail

usage="usage: bash benchmarks/gpu_session.sh [--rehearse] [--budget SECONDS] all|tests|speed|sweep|models OUTDIR"
die() { echo "gpu_session.sh: $*" >&2; exit 2; }

# time boxes (seconds) and what each step keeps for the steps after it
BOX_WHEELS=60 BOX_ENV=30 BOX_TESTS=150 BOX_RECORD=30 BOX_SPEED=90 BOX_SWEEP_RUN=60 BOX_MODELS=75
KEEP_SWEEP=90 KEEP_MODELS=75 KEEP_PACK=10 MIN_STEP=20

# The sweep: one fresh process per line, in this order (the most telling first: when the step's
# deadline comes, the lines after it are skipped and reported). Fields: id, dtype, ops, DCM_ knobs.
# Knobs of different ops are independent (each op's kernels read only their own), so one process
# times one configuration of each op; the report makes one table per op from its own knobs. The
# window kernel of SAM is the same in both dtypes (it reads the float32 Gram), so only bfloat16
# lines time it. b1 / f1 are the defaults; f4 repeats f1's dynamic-conv knobs, b9 b1's SAM knobs,
# and each FG_SM_PROGRAMS value recurs (run-to-run spread).
# tests/kernels_interpreted.py reads this plan and runs every kernel variant in it under Triton's
# interpreter.
SWEEP_PLAN='
b1 bfloat16 sam,dynconv,fgpool DW_ROWS=4 DW_PROGRAMS=3168 SAM_BP=32 SAM_BR=64  SAM_WARPS=4 SAM_PROGS=528  FG_SM_PROGRAMS=2
b2 bfloat16 sam,dynconv,fgpool DW_ROWS=1 DW_PROGRAMS=3168 SAM_BP=32 SAM_BR=64  SAM_WARPS=8 SAM_PROGS=528  FG_SM_PROGRAMS=1
b3 bfloat16 sam,dynconv,fgpool DW_ROWS=2 DW_PROGRAMS=3168 SAM_BP=16 SAM_BR=64  SAM_WARPS=4 SAM_PROGS=528  FG_SM_PROGRAMS=4
b4 bfloat16 sam,dynconv,fgpool DW_ROWS=4 DW_PROGRAMS=1584 SAM_BP=16 SAM_BR=64  SAM_WARPS=8 SAM_PROGS=528  FG_SM_PROGRAMS=8
f1 float32  dynconv,fgpool     DW_ROWS=4 DW_PROGRAMS=3168 FG_SM_PROGRAMS=2
f2 float32  dynconv,fgpool     DW_ROWS=1 DW_PROGRAMS=3168 FG_SM_PROGRAMS=1
f3 float32  dynconv,fgpool     DW_ROWS=2 DW_PROGRAMS=3168 FG_SM_PROGRAMS=4
f4 float32  dynconv,fgpool     DW_ROWS=4 DW_PROGRAMS=3168 FG_SM_PROGRAMS=8
b5 bfloat16 sam,dynconv,fgpool DW_ROWS=4 DW_PROGRAMS=6336 SAM_BP=32 SAM_BR=64  SAM_WARPS=8 SAM_PROGS=1056 FG_SM_PROGRAMS=2
b6 bfloat16 sam,dynconv,fgpool DW_ROWS=2 DW_PROGRAMS=1584 SAM_BP=16 SAM_BR=64  SAM_WARPS=4 SAM_PROGS=1056 FG_SM_PROGRAMS=1
b7 bfloat16 sam,dynconv,fgpool DW_ROWS=2 DW_PROGRAMS=6336 SAM_BP=32 SAM_BR=128 SAM_WARPS=8 SAM_PROGS=528  FG_SM_PROGRAMS=4
b8 bfloat16 sam,dynconv,fgpool DW_ROWS=1 DW_PROGRAMS=1584 SAM_BP=32 SAM_BR=32  SAM_WARPS=4 SAM_PROGS=528  FG_SM_PROGRAMS=8
b9 bfloat16 sam,dynconv,fgpool DW_ROWS=1 DW_PROGRAMS=6336 SAM_BP=32 SAM_BR=64  SAM_WARPS=4 SAM_PROGS=528  FG_SM_PROGRAMS=2
'
export SWEEP_PLAN

# ------------------------------------------------------------------------------------------ arguments
rehearse=0
[[ ${REHEARSE:-0} != 0 && -n ${REHEARSE:-} ]] && rehearse=1
budget=${BUDGET:-400}
pos=()
while (($#)); do
  case $1 in
    --rehearse) rehearse=1 ;;
    --budget) (($# >= 2)) || die "--budget needs a value; $usage"; budget=$2; shift ;;
    --budget=*) budget=${1#--budget=} ;;
    -h | --help) echo "$usage"; exit 0 ;;
    -*) die "unknown option '$1'; $usage" ;;
    *) pos+=("$1") ;;
  esac
  shift
done
((${#pos[@]} == 2)) || die "expected STEP and OUTDIR; $usage"
target=${pos[0]} out=${pos[1]}
case $target in all | tests | speed | sweep | models) ;; *) die "unknown step '$target': all, tests, speed, sweep or models" ;; esac
[[ $budget =~ ^[0-9]+$ ]] && ((budget >= 60)) || die "--budget '$budget': expected whole seconds, at least 60"
if [[ -n ${PYTHON:-} ]]; then
  py=$PYTHON
  command -v "$py" >/dev/null 2>&1 || die "PYTHON=$py: not found"
else
  py=python3
  command -v "$py" >/dev/null 2>&1 || py=python
  command -v "$py" >/dev/null 2>&1 || die "no python3 or python: set PYTHON"
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir_out() { mkdir -p "$out" && out=$(cd "$out" && pwd); }

# ------------------------------------------------------------------------------------------ the GPU check
cuda=$("$py" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null | tail -n 1)
if [[ $cuda != 0 && $cuda != 1 ]]; then
  echo "gpu_session.sh: '$py' cannot import torch (set PYTHON to the interpreter that has it)" >&2
  exit 3
fi
if [[ $cuda != 1 && $rehearse != 1 ]]; then
  echo "gpu_session.sh: no CUDA device (torch.cuda.is_available() is False for $py); nothing run -- --rehearse runs the CPU rehearsal" >&2
  exit 3
fi

mkdir_out || die "cannot create OUTDIR '$out'"
cd "$root" || die "cannot enter $root"
log=$out/session.log
rm -f "$out/session.log" "$out/results.json" "$out/summary.txt" "$out/verified.json" "$out/raw.tar.gz"
work=$(mktemp -d "${TMPDIR:-/tmp}/dcm-gpu-session.XXXXXX") || die "cannot create a work folder"
mkdir -p "$work/sweep"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cleared=$(compgen -e | grep '^DCM_' | tr '\n' ' ')
for v in $cleared; do unset "$v"; done
: >"$work/steps.tsv"
deadline=$budget  # SECONDS counts from the start of the script
mode=$([[ $rehearse == 1 ]] && echo rehearse || echo gpu)
tiny=(--device cpu --batch 1 --size 6 --channels 8 --channels-high 16)

say() { echo "$*" | tee -a "$log"; }

# record NAME STATUS RC SECONDS TIMEOUT NOTE
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$work/steps.tsv"; }

# run_box NAME TIMEOUT CMD...: CMD under timeout, output to work/NAME.log and session.log; sets rc
run_box() {
  local name=$1 t=$2; shift 2
  say "=== [$name] $(date -u +%H:%M:%S) (timeout ${t} s): $*"
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" </dev/null 2>&1 | tee "$work/$name.log" >>"$log"
  rc=${PIPESTATUS[0]}
  secs=$((SECONDS - t0))
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  tail -n 6 "$work/$name.log"
  say "=== [$name] exit $rc ($status) after $secs s"
  record "$name" "$status" "$rc" "$secs" "$t" ""
}

# step NAME BOX KEEP CMD...: run_box with the smaller of BOX and what the budget leaves after KEEP
step() {
  local name=$1 box=$2 keep=$3; shift 3
  local left=$((deadline - SECONDS - keep))
  local t=$((box < left ? box : left))
  if ((t < MIN_STEP)); then
    say "=== [$name] skipped: ${left} s left of the budget"
    record "$name" skipped "" 0 0 "budget"
    status=skipped
    return
  fi
  run_box "$name" "$t" "$@"
}

# ------------------------------------------------------------------------------------------- helpers
# the Python parts, written to the work folder (they end up in raw.tar.gz too)
mkdir -p "$work/bin"
cat >"$work/bin/env.py" <<'PY'
"""The environment record: versions, the device, dcm's knob defaults, a hash of the sources."""
import hashlib, json, os, platform, sys
from pathlib import Path

info = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
            pythonpath=os.environ.get("PYTHONPATH"))
for name in ("torch", "triton", "numpy", "einops", "torchvision", "pytest", "xdist", "yaml", "hypothesis"):
    try:
        info[name] = getattr(__import__(name), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - record what is missing
        info[name] = f"missing: {type(e).__name__}: {e}"
import torch  # noqa: E402

info["cuda"] = torch.version.cuda
info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
info["gpu"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = dict(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                       memory_GiB=round(p.total_memory / 2**30, 1), l2_MB=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                       count=torch.cuda.device_count())
import dcm  # noqa: E402
from dcm import kernels  # noqa: E402

info["dcm"] = dcm.__version__
info["kernels_available"] = kernels.available()
from dcm import verification  # noqa: E402

# what DCM_BACKEND=auto runs here under the shipped record (before this session verifies anything)
info["kernel_keys"] = verification.current_keys()
info["auto_with_shipped_record"] = {op: [r["path"], r["why"]] for op, r in verification.backend_report("cuda").items()}
info["knob_defaults"] = {k: v[0] for k, v in kernels.KNOBS.items()}
h = hashlib.sha256()
for f in sorted(Path("dcm").rglob("*.py")) + [Path("benchmarks/speed.py"), Path("benchmarks/gpu_session.sh")]:
    h.update(str(f).encode() + b"\0" + f.read_bytes())
info["source_sha256"] = h.hexdigest()[:16]
Path(sys.argv[1]).write_text(json.dumps(info, indent=1))
for k, v in info.items():
    print(f"{k}: {v}")
PY

cat >"$work/bin/plan.py" <<'PY'
"""SWEEP_PLAN (environment) validated -- every knob known, every value in its range, the ops and dtype
known, the ids unique -- and written as JSON to argv[1]."""
import json, os, sys

from dcm.kernels import KNOBS, tuning

plan, bad = [], []
for line in os.environ["SWEEP_PLAN"].splitlines():
    f = line.split()
    if not f:
        continue
    if len(f) < 3:
        bad.append(f"short line {line!r}")
        continue
    cid, dtype, ops, *kv = f
    knobs = {}
    for x in kv:
        name, _, v = x.partition("=")
        if name not in KNOBS:
            bad.append(f"{cid}: unknown knob {name!r}")
            continue
        os.environ[f"DCM_{name}"] = v
        try:
            knobs[name] = tuning(name)
        except ValueError as e:
            bad.append(f"{cid}: {e}")
        del os.environ[f"DCM_{name}"]
    if dtype not in ("float32", "bfloat16", "float16"):
        bad.append(f"{cid}: dtype {dtype!r}")
    if not ops or set(ops.split(",")) - {"sam", "dynconv", "fgpool", "ffm"}:
        bad.append(f"{cid}: ops {ops!r}")
    plan.append(dict(id=cid, dtype=dtype, ops=ops.split(","), knobs=knobs))
ids = [p["id"] for p in plan]
if len(set(ids)) != len(ids) or not plan:
    bad.append(f"ids {ids}: empty or repeated")
for p in plan:
    print(p["id"], p["dtype"], ",".join(p["ops"]), " ".join(f"{k}={v}" for k, v in p["knobs"].items()))
if bad:
    sys.exit("invalid sweep plan: " + "; ".join(bad))
with open(sys.argv[1], "w") as fh:
    json.dump(plan, fh, indent=1)
print(f"{len(plan)} configurations, all valid")
PY

cat >"$work/bin/sweep_report.py" <<'PY'
"""One table per (dtype, op) from the sweep's JSON files, each column labelled by that op's own knobs."""
import importlib.util, json, sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("speed", "benchmarks/speed.py")
speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speed)
work = Path(sys.argv[1])
FAMILY = {"support_activation": "SAM_", "dynamic_conv": "DW_", "foreground": "FG_"}
tables = {}
for p in json.loads((work / "sweep-plan.json").read_text()):
    f = work / "sweep" / f"{p['id']}.json"
    if not f.exists():
        continue
    data = json.loads(f.read_text())
    for row in data["rows"]:
        fam = row["op"].split(" ")[0]
        knobs = {k: v for k, v in p["knobs"].items() if k.startswith(FAMILY.get(fam, "-"))}
        label = f"{p['id']}:" + ",".join(f"{k}={v}" for k, v in knobs.items())
        runs = tables.setdefault((p["dtype"], fam), {})
        runs.setdefault(label, dict(label=label, config=knobs, env=data["env"], rows=[]))["rows"].append(row)
for (dtype, fam), runs in tables.items():
    print(f"\n--- sweep of {fam}, {dtype} (ms eager / graph; * the fastest)")
    speed._sweep_table(list(runs.values()))
print("" if tables else "no sweep results")
PY

cat >"$work/bin/pack.py" <<'PY'
"""results.json and summary.txt from the work folder (argv: work out mode step budget elapsed cleared).
Exit status 1 when a step failed or ran out of time."""
import json, re, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
mode, step, budget, elapsed, cleared = sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7].split()
FAMILY = {"support_activation": "SAM_", "dynamic_conv": "DW_", "foreground": "FG_"}


def load(name):
    f = work / name
    try:
        return json.loads(f.read_text()) if f.exists() else None
    except ValueError as e:
        return {"unreadable": str(e)}


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, timeout, note = line.split("\t")
    steps.append(dict(name=name, status=status, rc=int(rc) if rc else None, seconds=int(secs), timeout=int(timeout), note=note))

tests = {}
if (work / "tests.xml").exists():
    try:
        root = ET.parse(work / "tests.xml").getroot()
        cnt = dict(tests=0, passed=0, failures=0, errors=0, skipped=0)
        failed, skipped = [], []
        for case in root.iter("testcase"):
            tid = f"{case.get('classname')}::{case.get('name')}"
            cnt["tests"] += 1
            for tag, key in (("failure", "failures"), ("error", "errors")):
                bad = [dict(test=tid, kind=tag, message=(el.get("message") or "")[:300]) for el in case.findall(tag)]
                cnt[key] += bool(bad)
                failed += bad
            sk = [dict(test=tid, message=(el.get("message") or "")[:200]) for el in case.findall("skipped")]
            cnt["skipped"] += bool(sk)
            skipped += sk
            cnt["passed"] += not (sk or case.findall("failure") or case.findall("error"))
        tests = dict(counts=cnt, failed=failed, skipped=skipped[:50])
    except ET.ParseError as e:
        tests = {"unreadable": str(e)}
if (work / "tests.log").exists():
    text = (work / "tests.log").read_text(errors="replace")
    tests["model_train_step_ms"] = {m[0]: float(m[1]) for m in re.findall(
        r"^(\S+): bf16 train step 473x473 batch 8 on .*?: ([\d.]+) ms", text, re.M)}
    last = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|tests? collected)", ln)]
    tests["last_line"] = last[-1].strip() if last else None

status = {s["name"]: s for s in steps}
plan = load("sweep-plan.json") or []
sweep_runs = []
for p in plan:
    s = status.get(f"sweep-{p['id']}")
    data = load(f"sweep/{p['id']}.json") or {}
    sweep_runs.append(dict(p, status=s["status"] if s else "not run", seconds=s["seconds"] if s else None,
                           env=data.get("env"), rows=data.get("rows", [])))

results = dict(
    session=dict(mode=mode, step=step, budget_s=budget, elapsed_s=elapsed, cleared_env=cleared),
    env=load("env.json"), steps=steps, tests=tests or None,
    speed={dt: load(f"speed-{dt}.json") for dt in ("float32", "bfloat16")},
    sweep=dict(plan=plan, runs=sweep_runs), models=load("models-bf16.json"),
    verified=load("verified-summary.json"),
)
(out / "results.json").write_text(json.dumps(results, indent=1))


def ours(rows):
    for r in rows or []:
        if r.get("variant") == "ours" and r.get("ms") is not None:
            yield r["op"], r["mode"], r["ms"], r.get("graph_ms")


L = []
env = results["env"] or {}
gpu = env.get("gpu") or {}
L.append(f"dcm GPU session ({mode}, step {step}): {elapsed} s of a {budget} s budget")
L.append(f"device: {gpu.get('name', 'no GPU')} ({gpu.get('sms', '-')} SMs), torch {env.get('torch')}, triton {env.get('triton')}, "
         f"CUDA {env.get('cuda')}, python {env.get('python')}, sources {env.get('source_sha256')}")
L.append(f"\n{'step':22s} {'status':8s} {'exit':>4s} {'s':>5s} {'box':>5s}  note")
for s in steps:
    L.append(f"{s['name']:22s} {s['status']:8s} {'' if s['rc'] is None else s['rc']:>4} {s['seconds']:5d} {s['timeout']:5d}  {s['note']}")
c = tests.get("counts") if isinstance(tests, dict) else None
if c:
    L.append(f"\ntests: {c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped")
    L += [f"  FAILED {f['test']}: {f['message'][:160]}" for f in tests["failed"][:20]]
    L += [f"  skipped {f['test']}: {f['message'][:100]}" for f in tests["skipped"][:5]]
elif tests.get("last_line"):
    L.append(f"\ntests: {tests['last_line']}")
for name, ms in (tests.get("model_train_step_ms") or {}).items():
    L.append(f"  {name}: bf16 train step {ms:.1f} ms (min of 3, beside other tests)")
for dt, data in results["speed"].items():
    if data and "rows" in data:
        L.append(f"\nspeed {dt} (ours: ms eager / graph):")
        L += [f"  {op[:40]:40s} {m:8s} {ms:9.4f} / {'-' if g is None else f'{g:.4f}'}" for op, m, ms, g in ours(data["rows"])]
best = {}
for r in sweep_runs:
    for op, m, ms, g in ours(r["rows"]):
        knobs = ",".join(f"{k}={v}" for k, v in r["knobs"].items() if k.startswith(FAMILY.get(op.split(" ")[0], "-")))
        best.setdefault((r["dtype"], op, m), []).append((g or ms, r["id"], knobs))
if best:
    L.append("\nsweep: the fastest configuration of each op (graph ms where captured) against the first line that ran:")
    for (dt, op, m), cands in best.items():
        t, cid, knobs = min(cands)
        L.append(f"  {dt:8s} {op[:32]:32s} {m:7s} {t:8.4f} ms {cid}:{knobs} ({t / cands[0][0]:.2f}x of {cands[0][1]}; {len(cands)} runs)")
if plan:
    rest = [r["id"] for r in sweep_runs if r["status"] != "ok"]
    L.append(f"  sweep lines not done: {', '.join(rest) if rest else 'none'}")
mods = results["models"]
if mods and "rows" in mods:
    L.append("\nmodels (bf16 autocast):")
    train = {}
    for r in mods["rows"]:
        if r.get("ms") is None:
            L.append(f"  {r['op']} {r['mode']} {r['variant']}: {r.get('note')}")
            continue
        peak = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"
        L.append(f"  {r['op'][:34]:34s} {r['mode']:16s} {r['variant']:10s} {r['ms']:8.1f} ms  peak {peak} MB")
        if r["mode"] == "train step" and r["variant"] == "ours":
            train[r["op"].split()[1]] = r["ms"]
    if "dpcn" in train and "pfenet" in train:
        L.append(f"  DPCN / PFENet training step: {train['dpcn'] / train['pfenet']:.2f}x")
ver = results["verified"]
if ver and "ops" in ver:
    dev = ver.get("device")
    where = f"{dev['device']} (sm_{dev['cc_major']}x)" if dev else "no CUDA device"
    L.append(f"\nkernels verified on {where}; "
             f"{ver['records']} record(s) in verified.json (to commit: cp OUTDIR/verified.json dcm/kernels/verified.json):")
    for op, s in ver["ops"].items():
        L.append(f"  {op:20s} {'RECORDED' if s['recorded'] else 'not recorded':13s} {s['why']}")
    auto = ver.get("auto") or {}
    if auto:
        L.append("  DCM_BACKEND=auto with it: " + ", ".join(f"{op} {p}" for op, p in auto.items()))
bad = [s["name"] for s in steps if s["status"] in ("failed", "timeout")]
L.append(f"\nresult: {'every step that ran passed' if not bad else 'NOT OK: ' + ', '.join(bad)}")
(out / "summary.txt").write_text("\n".join(L) + "\n")
print("\n".join(L))
sys.exit(1 if bad else 0)
PY

cat >"$work/bin/env.sh" <<'SH'
echo "mode: $1; budget: $2 s; DCM_ variables cleared: ${3:-none}; host: $(hostname); cpus: $(nproc --all); $(uname -sr)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  nvidia-smi
else
  echo "nvidia-smi: not found"
fi
git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -n 40 || echo "git: no repository here"
"$4" "$5/bin/env.py" "$5/env.json"
SH

# --------------------------------------------------------------------------------------------- steps
# each takes KEEP: the seconds the steps after it need from the budget
wheels() {
  local site=/tmp/site
  [[ $rehearse == 1 ]] && site=$work/site
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    say "=== [wheels] no .whl/*.whl: nothing to install"
    return
  fi
  step wheels "$BOX_WHEELS" "$1" "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" .whl/*.whl
  [[ $status == ok ]] && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
}

env_info() {
  step env "$BOX_ENV" "$1" bash "$work/bin/env.sh" "$mode" "$budget" "$cleared" "$py" "$work"
}

tests() {
  local files=(tests/test_*cuda*.py) par=()
  # xdist workers on the one GPU (the Triton and Inductor compiles dominate); the rehearsal runs them
  # in one process, where they skip themselves
  [[ $rehearse == 0 ]] && "$py" -c "import xdist" 2>/dev/null && par=(-n 8)
  # the candidate record: every op's current source on this GPU, so that DCM_BACKEND=auto (what the
  # tests use) runs every kernel; `record` keeps the ops whose tests passed
  say "=== [tests] candidate record: $("$py" -m dcm.verification candidate "$work/candidate.json" 2>&1 | tail -n 1)"
  step tests "$BOX_TESTS" "$1" env DCM_VERIFIED="$work/candidate.json" "$py" -m pytest -q -p no:cacheprovider "${par[@]}" \
    -rfEsP --durations=15 --junitxml="$work/tests.xml" "${files[@]}"
  tests_status=$status
}

# the record of the kernels whose CUDA tests passed (tests_status: the tests step's status, if it ran)
tests_status=missing
kernel_record() {
  step record "$BOX_RECORD" "$1" "$py" -m dcm.verification record --junit "$work/tests.xml" --candidate "$work/candidate.json" \
    --tests-status "$tests_status" --out "$work/verified.json" --summary "$work/verified-summary.json"
  # the steps after this one time what DCM_BACKEND=auto gives with this record committed
  [[ $status == ok && -f $work/verified.json ]] && export DCM_VERIFIED=$work/verified.json
}

speed() {
  local extra=()
  [[ $rehearse == 1 ]] && extra=("${tiny[@]}" --quick)
  step speed-float32 "$BOX_SPEED" "$(($1 + BOX_SPEED / 2))" "$py" benchmarks/speed.py --dtype float32 "${extra[@]}" \
    --json "$work/speed-float32.json"
  step speed-bfloat16 "$BOX_SPEED" "$1" "$py" benchmarks/speed.py --dtype bfloat16 "${extra[@]}" \
    --json "$work/speed-bfloat16.json"
}

sweep() {
  step sweep-plan 60 "$1" "$py" "$work/bin/plan.py" "$work/sweep-plan.json"
  if [[ $status != ok ]]; then
    say "=== [sweep] not run: the plan was not validated ($status)"
    return
  fi
  local end=$((deadline - $1)) n=0 nok=0 seen=" " cid dt ops kv t left x
  while read -r -u 3 cid dt ops kv; do
    [[ -n $cid ]] || continue
    [[ -z ${SWEEP_IDS:-} || ",$SWEEP_IDS," == *",$cid,"* ]] || continue
    [[ $rehearse == 1 && $seen == *" $dt "* ]] && continue  # rehearse: the first line of each dtype
    seen+="$dt "
    left=$((end - SECONDS))
    t=$((BOX_SWEEP_RUN < left ? BOX_SWEEP_RUN : left))
    if ((t < MIN_STEP)); then
      say "=== [sweep-$cid] skipped: the sweep's deadline ($left s left)"
      record "sweep-$cid" skipped "" 0 0 "deadline"
      continue
    fi
    local envs=(DCM_BACKEND=triton) extra=()
    for x in $kv; do envs+=("DCM_$x"); done
    [[ $rehearse == 1 ]] && extra=("${tiny[@]}")
    run_box "sweep-$cid" "$t" env "${envs[@]}" "$py" benchmarks/speed.py --ops "$ops" --dtype "$dt" --quick \
      --variants ours "${extra[@]}" --json "$work/sweep/$cid.json"
    n=$((n + 1))
    [[ $status == ok ]] && nok=$((nok + 1))
  done 3<<<"$SWEEP_PLAN"
  say "=== [sweep] $nok of $n configurations ran"
  step sweep-report 60 "$1" "$py" "$work/bin/sweep_report.py" "$work"
}

models() {
  if [[ $rehearse == 1 ]]; then
    step models "$BOX_MODELS" "$1" "$py" -c "
from models import build_model
for name in ('dpcn', 'pfenet'):
    net = build_model(name, backbone='resnet50', shot=1, backbone_weights='random')
    print(name, sum(p.numel() for p in net.parameters()), 'parameters (rehearse: built, not timed)')"
    return
  fi
  step models "$BOX_MODELS" "$1" "$py" benchmarks/speed.py --ops models --dtype bfloat16 --json "$work/models-bf16.json"
}

# ---------------------------------------------------------------------------------------------- pack
pack() {
  "$py" "$work/bin/pack.py" "$work" "$out" "$mode" "$target" "$budget" "$SECONDS" "$cleared" 2>&1 | tee -a "$log"
  local prc=${PIPESTATUS[0]} f
  [[ -f $work/verified.json ]] && cp "$work/verified.json" "$out/verified.json"
  tar -czf "$out/raw.tar.gz" -C "$work" . 2>>"$log" || say "tar failed"
  for f in "$out"/*; do  # every output file stays under 16 MiB (easy to move and to attach)
    if (($(stat -c %s "$f") > 15 * 1024 * 1024)); then
      say "$f is over 15 MiB: keeping its first and last 7 MiB"
      { head -c 7M "$f"; printf '\n[... cut ...]\n'; tail -c 7M "$f"; } >"$f.cut" && mv "$f.cut" "$f"
    fi
  done
  say "=== outputs in $out:"
  (cd "$out" && ls -l) | tee -a "$log"
  rm -rf "$work"
  return "$prc"
}

interrupted() {
  trap - INT TERM
  say "=== interrupted: packing what there is"
  record interrupted failed 130 0 0 "signal"
  pack
  exit 130
}
trap interrupted INT TERM

say "=== dcm GPU session: step $target, $mode, budget $budget s, output $out, $(date -u +%FT%TZ)"
[[ -n $cleared ]] && say "=== cleared from the environment: $cleared"
keep=$((KEEP_SWEEP + KEEP_MODELS + KEEP_PACK))
case $target in
  all)
    wheels "$keep"
    env_info "$KEEP_PACK"
    tests "$keep"
    kernel_record "$KEEP_PACK"
    speed "$keep"
    sweep $((KEEP_MODELS + KEEP_PACK))
    models "$KEEP_PACK"
    ;;
  *)
    wheels "$KEEP_PACK"
    env_info "$KEEP_PACK"
    if [[ $target == tests ]]; then
      BOX_TESTS=$budget  # alone, the tests get what the budget leaves after the record
      tests $((BOX_RECORD + KEEP_PACK))
      kernel_record "$KEEP_PACK"
    else
      kernel_record "$KEEP_PACK"
      "$target" "$KEEP_PACK"
    fi
    ;;
esac
trap - INT TERM
pack
