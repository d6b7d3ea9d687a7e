#!/usr/bin/env bash
# The accelerator run of issue 21 in one script: JAX train step vs PyTorch AMP,
# Sinkhorn, a profile, the real input pipeline end to end, on one GPU.
#
#   bash bench/accelerator.sh OUTDIR [--smoke] [--budget SECONDS] [--only STAGE,STAGE...]
#
# Run from anywhere inside a copy of the repository (it changes to the repository root).
# Stages, in priority order (the most important rows exist even if time runs out); each
# runs under its own time limit, capped by what is left of --budget, and one that would
# start with less than its minimum left is skipped:
#   jax_main_lo   JAX step, ResNet-50, 2x224+6x96, bf16, synthetic crops on device, batch 64
#   jax_main_hi   the same at per-device batch 128
#   torch_main    the same step in PyTorch AMP (float16 + GradScaler), batches 64 and 128
#   sinkhorn      Sinkhorn 4096 x 3000, 3 iterations (JAX, PyTorch, NumPy)
#   profile       jax_main_lo again (compilation cache) + HLO text + jax.profiler trace of 3 steps
#   profile_ops   per-op device times of that trace (bench/profile_summary.py)
#   e2e           JAX step at batch 128 fed by the grain pipeline from generated JPEGs,
#                 12 worker processes ('host' = pipeline alone, 'e2e' = pipeline + step)
#   pipeline      bench/pipeline.py: per-core host rate, grain with 12 workers, device crop/augment
#   torch_more    PyTorch AMP at 2x224 and 2x160+4x96, batch 128
#   jax_2crops    JAX 2x224, batch 128
#   jax_midcrops  JAX 2x160+4x96, batch 128
#   torch_bf16    PyTorch with bfloat16 autocast, 2x224+6x96, batches 64 and 128
# --smoke runs the same stages with tiny sizes (ResNet-18, base width 8, small stem,
# 2x32+4x16 crops, batches 8 and 16, 3 steps) on whatever devices there are, so a typo
# shows on a CPU machine rather than on GPU time.
#
# Environment: XLA_PYTHON_CLIENT_PREALLOCATE=false (peak memory is the step's, not a
# preallocated pool); a persistent compilation cache shared by the stages, so the profile
# and e2e stages (and a rerun on a still-warm machine) load the timed points' executables
# instead of compiling again (JAX_COMPILATION_CACHE_DIR, default
# ${TMPDIR:-/tmp}/swav_jax_compilation_cache: a point's 'compile s' is then a cache load);
# PYTHON (default python3).
# Wheels in .whl/ (bench/fetch_wheels.sh) are installed into a temporary folder and put
# on PYTHONPATH when grain, ml_collections, array_record or portpicker cannot be imported.
#
# OUTDIR receives six files, whatever happens (bench/accel_report.py, after every stage):
# accelerator.log, summary.json, table.md, raw.tar.gz, profile.tar.gz, profile_ops.json.
# Exit status 0 when every stage ran or was skipped for time, 1 when one failed or timed out.
set -uo pipefail

usage() { echo "usage: bash bench/accelerator.sh OUTDIR [--smoke] [--budget SECONDS] [--only STAGE,...]" >&2; exit 2; }

ALL_STAGES=(jax_main_lo jax_main_hi torch_main sinkhorn profile profile_ops e2e pipeline torch_more jax_2crops
            jax_midcrops torch_bf16)
OUTDIR="" SMOKE=0 BUDGET="" ONLY=""
while (($#)); do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --budget) BUDGET="${2:-}"; shift ;;
    --only) ONLY="${2:-}"; shift ;;
    -h|--help) usage ;;
    -*) echo "accelerator.sh: unknown option $1" >&2; usage ;;
    *) [[ -z "$OUTDIR" ]] || usage; OUTDIR="$1" ;;
  esac
  shift
done
[[ -n "$OUTDIR" ]] || usage
[[ -z "$BUDGET" || "$BUDGET" =~ ^[0-9]+$ ]] || { echo "accelerator.sh: --budget takes whole seconds" >&2; exit 2; }
for s in ${ONLY//,/ }; do
  [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || { echo "accelerator.sh: unknown stage '$s' (stages: ${ALL_STAGES[*]})" >&2; exit 2; }
done

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
PYTHON="${PYTHON:-python3}"

if ((SMOKE)); then
  BUDGET="${BUDGET:-2400}"
  MODEL=(--arch resnet18 --base-width 8 --small-stem --hidden-dim 32 --prototypes 30)
  MAIN=2x32+4x16 TWO=2x32 MID=2x24+4x16 B_LO=8 B_HI=16
  STEPS=(--steps 3 --warmup 1)
  SINKHORN=(--n 256 --k 30 --iters 3 --repeats 5 --devices 1)
  E2E=(--e2e --workers 2 --read-threads 1 --images 16 --canvas 64)
  PIPELINE=(--num-images 8 --batch 8 --workers 2 --repeats 1)
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
else
  BUDGET="${BUDGET:-450}"
  MODEL=()  # bench defaults: ResNet-50, hidden 2048, 128-d projection, 3000 prototypes
  MAIN=2x224+6x96 TWO=2x224 MID=2x160+4x96 B_LO=64 B_HI=128
  STEPS=(--steps 20 --warmup 3)
  SINKHORN=(--n 4096 --k 3000 --iters 3 --repeats 50 --devices 1)
  E2E=(--e2e --workers 12 --read-threads 2 --images 256 --canvas 512)
  PIPELINE=(--num-images 128 --batch 128 --workers 12 --repeats 3)
fi

START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK="$(mktemp -d "${TMPDIR:-/tmp}/accelerator.XXXXXX")"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/swav_jax_compilation_cache}"
export PYTHONUNBUFFERED=1
FAILED=0

say() { echo "[accelerator $(date -u +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }

report() {
  timeout -k 5 120 "$PYTHON" bench/accel_report.py "$WORK" "$OUTDIR" --budget "$BUDGET" --started "$START" \
    --main-crops "$MAIN" $( ((SMOKE)) && echo --smoke) "$@" \
    || say "bench/accel_report.py failed (exit $?)"
}

# stage NAME LIMIT_GPU LIMIT_SMOKE MIN_SECONDS COMMAND...: runs COMMAND under
# min(limit, time left), logs to WORK/NAME.log, records the outcome in WORK/stages.tsv.
stage() {
  local name="$1" limit="$2" min="$4"
  ((SMOKE)) && limit="$3"
  shift 4
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then return; fi
  local left=$((DEADLINE - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((left < min)); then
    say "$name: skipped, ${left}s left (needs ${min}s)"
    printf '%s\tskipped\t0\t0\t%s\t%s\n' "$name" "$limit" "$*" >>"$WORK/stages.tsv"
    return
  fi
  say "$name: start, limit ${limit}s: $*"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; FAILED=1 ;;
    *) status=failed; FAILED=1 ;;
  esac
  say "$name: $status (exit $rc) after $(($(date +%s) - t0))s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$limit" "$*" >>"$WORK/stages.tsv"
  report
}

install_wheels() {
  local needed='import grain, ml_collections, array_record, portpicker'
  "$PYTHON" -c "$needed" 2>/dev/null && return
  local wheels=(.whl/*.whl)
  if [[ ! -e "${wheels[0]}" ]]; then
    say "WARNING: '$needed' fails and .whl/ has no wheels (bash bench/fetch_wheels.sh, then carry .whl)"
    return
  fi
  say "installing ${#wheels[@]} wheels from .whl/ into $WORK/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "${wheels[@]}" || say "WARNING: pip install of .whl/ failed"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "$needed" || say "WARNING: still cannot '$needed'"
}

main() {
  say "repository $(pwd), OUTDIR $OUTDIR, work $WORK, budget ${BUDGET}s, smoke=$SMOKE, python $("$PYTHON" -V 2>&1)"
  install_wheels
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv \
      >"$WORK/nvidia_smi.csv" 2>&1
    cat "$WORK/nvidia_smi.csv"
  fi
  "$PYTHON" -m pip list >"$WORK/pip_list.txt" 2>&1
  local py="$PYTHON" T=bench/train_step.py P=bench/torch_train_step.py
  #     name          GPU s  smoke s  min s
  stage jax_main_lo   180    600      60   "$py" $T "${MODEL[@]}" --crops $MAIN --batch $B_LO "${STEPS[@]}" --json "$WORK/jax_main_lo.json"
  stage jax_main_hi   150    600      60   "$py" $T "${MODEL[@]}" --crops $MAIN --batch $B_HI "${STEPS[@]}" --json "$WORK/jax_main_hi.json"
  stage torch_main    100    300      25   "$py" $P "${MODEL[@]}" --crops $MAIN --batch $B_LO $B_HI "${STEPS[@]}" --json "$WORK/torch_main.json"
  stage sinkhorn       60    200      15   "$py" bench/sinkhorn.py "${SINKHORN[@]}" --json "$WORK/sinkhorn.json"
  stage profile        90    400      40   "$py" $T "${MODEL[@]}" --crops $MAIN --batch $B_LO --steps 3 --warmup 2 --profile "$WORK/profile" --profile-steps 3 --json "$WORK/profile.json"
  stage profile_ops    45    120      10   "$py" bench/profile_summary.py "$WORK/profile" --steps 3 --json "$WORK/profile_ops.json"
  stage e2e           150    600      60   "$py" $T "${MODEL[@]}" --crops $MAIN --batch $B_HI "${STEPS[@]}" "${E2E[@]}" --json "$WORK/e2e.json"
  stage pipeline       60    400      25   "$py" bench/pipeline.py "${PIPELINE[@]}" --json "$WORK/pipeline.json"
  stage torch_more     60    300      25   "$py" $P "${MODEL[@]}" --crops $TWO $MID --batch $B_HI "${STEPS[@]}" --json "$WORK/torch_more.json"
  stage jax_2crops    110    600      60   "$py" $T "${MODEL[@]}" --crops $TWO --batch $B_HI "${STEPS[@]}" --json "$WORK/jax_2crops.json"
  stage jax_midcrops  110    600      60   "$py" $T "${MODEL[@]}" --crops $MID --batch $B_HI "${STEPS[@]}" --json "$WORK/jax_midcrops.json"
  stage torch_bf16     60    300      25   "$py" $P "${MODEL[@]}" --amp bfloat16 --crops $MAIN --batch $B_LO $B_HI "${STEPS[@]}" --json "$WORK/torch_bf16.json"
  say "done; tables and files follow"
  report --print
  ls -l "$OUTDIR"
  return $FAILED
}

main 2>&1 | tee -a "$OUTDIR/accelerator.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
