#!/usr/bin/env bash
# Everything a GPU run of dcm should record, in steps that each fit a 10-minute slot.
#
#   bash benchmarks/gpu_session.sh STEP [OUTDIR]      (from the repository root, in the dcm environment)
#
# STEP: tests   the CUDA tests (every fast path against float64, compile, CUDA graphs, models)
#       speed   benchmarks/speed.py for the four ops, float32 and bfloat16 (B = 8, and B = 32 for pooling)
#       sweep   the launch-configuration knobs of dcm.kernels.KNOBS that docs/SPEED.md names
#       models  DPCN / PFENet training step and 1-shot inference (bf16 autocast)
#       all     the four in order
# OUTDIR (default ./gpu-run) gets one log per step and the JSON tables of speed.py; nothing else is
# written. Each command's exit status is logged; a failing step does not stop the ones after it.
set -u
step=${1:?usage: bash benchmarks/gpu_session.sh tests|speed|sweep|models|all [OUTDIR]}
out=${2:-gpu-run}
mkdir -p "$out"
py=${PYTHON:-python}

log() { # log NAME CMD...: run CMD, output to OUTDIR/NAME.log (and the last lines to stdout)
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/$name.log"
  local t0=$SECONDS
  "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
  tail -n 25 "$out/$name.log"
  return 0
}

env_info() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    git rev-parse HEAD 2>/dev/null; } >"$out/env.txt"
  cat "$out/env.txt"
}

tests() {
  log tests $py -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_kernels_foreground_cuda.py \
    tests/test_dcm_cuda.py tests/test_models_cuda.py
}

speed() {
  for dt in float32 bfloat16; do
    log "speed-$dt" $py benchmarks/speed.py --ops sam,dynconv,fgpool,ffm --dtype "$dt" --json "$out/speed-$dt.json"
  done
}

sweep() {
  log sweep-dynconv-bf16 $py benchmarks/speed.py --ops dynconv --dtype bfloat16 --quick \
    --sweep DW_ROWS=1,2,4 --sweep DW_PROGRAMS=1584,3168,6336 --json "$out/sweep-dynconv-bf16.json"
  log sweep-dynconv-fp32 $py benchmarks/speed.py --ops dynconv --dtype float32 --quick \
    --sweep DW_ROWS=1,2,4 --json "$out/sweep-dynconv-fp32.json"
  log sweep-sam-bf16 $py benchmarks/speed.py --ops sam --dtype bfloat16 --quick \
    --sweep SAM_WARPS=4,8 --sweep SAM_BP=16,32 --json "$out/sweep-sam-bf16.json"
  for dt in bfloat16 float32; do
    log "sweep-fgpool-$dt" $py benchmarks/speed.py --ops fgpool --dtype "$dt" --quick \
      --sweep FG_SM_PROGRAMS=1,2,4,8 --json "$out/sweep-fgpool-$dt.json"
  done
}

models() {
  log models $py benchmarks/speed.py --ops models --dtype bfloat16 --json "$out/models-bf16.json"
}

case "$step" in
  tests | speed | sweep | models) env_info; "$step" ;;
  all) env_info; tests; speed; sweep; models ;;
  *) echo "unknown step '$step': tests, speed, sweep, models or all" >&2; exit 2 ;;
esac
