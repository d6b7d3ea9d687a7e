#!/usr/bin/env bash
# SwAV on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#     On an existing TPU VM: copies this checkout to every worker, installs it with its
#     tpu extra, and starts training in the background on all workers at once (each
#     worker logs to ~/swav-jax.log).
#
#   launch/tpu_pod.sh [--dry-run] --queued ACCELERATOR_TYPE [--spot] [--runtime-version V] \
#       TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#     Through a queued resource: requests ACCELERATOR_TYPE (e.g. v5p-128, v5litepod-64,
#     v6e-64, v4-128) named TPU_NAME, waits until it is ACTIVE, trains on all workers in
#     the foreground (keep this shell alive: tmux, screen or nohup), and deletes the
#     queued resource and its TPU when training ends or anything fails.
#
# --dry-run prints the commands instead of running them (no gcloud needed).
# jax.distributed.initialize() finds the pod's coordinator by itself. WORKDIR should be a
# gs:// path (or a shared disk) so checkpoints are visible to every worker; re-running
# the same command resumes from the latest checkpoint there.
set -euo pipefail
usage="usage: $0 [--dry-run] [--queued ACCELERATOR_TYPE [--spot] [--runtime-version V]] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]"
dry=0; accelerator=; spot=; runtime=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --queued) accelerator=${2:?$usage}; shift 2 ;;
    --spot) spot=--spot; shift ;;
    --runtime-version) runtime=${2:?$usage}; shift 2 ;;
    --*) echo "$usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 4 ]; then echo "$usage" >&2; exit 2; fi
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4

run() {  # the command, or with --dry-run its shell-quoted text
  if [ "$dry" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

here=$(cd "$(dirname "$0")/.." && pwd)
tarball=${TMPDIR:-/tmp}/swav-jax-$tpu.tar.gz
train=$(printf '%q ' swav-jax train --config "$config" --workdir "$workdir" --distributed auto "$@")
install="set -e; mkdir -p ~/swav-jax && tar -C ~/swav-jax -xzf ~/swav-jax.tar.gz && cd ~/swav-jax && python3 -m pip install -q -e '.[tpu]'"

if [ -n "$accelerator" ]; then
  if [ -z "$runtime" ]; then
    case $accelerator in  # TPU VM images with the TPU runtime, per generation
      v4-*) runtime=tpu-ubuntu2204-base ;;
      v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      *) echo "no default runtime version for $accelerator: pass --runtime-version" >&2; exit 2 ;;
    esac
  fi
  qr=$tpu-qr
  run gcloud compute tpus queued-resources create "$qr" --node-id "$tpu" --zone "$zone" \
    --accelerator-type "$accelerator" --runtime-version "$runtime" $spot
  # From here on the queued resource is billed or queued: delete it however we leave.
  cleanup() { run gcloud compute tpus queued-resources delete "$qr" --zone "$zone" --force --quiet; }
  trap cleanup EXIT
  if [ "$dry" = 1 ]; then
    run gcloud compute tpus queued-resources describe "$qr" --zone "$zone" --format 'value(state.state)'
    echo "# ... repeated every ${POLL_SECONDS:-60} s until the state is ACTIVE"
  else
    last=
    while state=$(gcloud compute tpus queued-resources describe "$qr" --zone "$zone" --format 'value(state.state)'); do
      [ "$state" != "$last" ] && echo "$(date +%T) queued resource $qr: $state" && last=$state
      case $state in
        ACTIVE) break ;;
        FAILED|SUSPENDING|SUSPENDED) echo "queued resource $qr is $state" >&2; exit 1 ;;
      esac
      sleep "${POLL_SECONDS:-60}"
    done
    [ "$state" = ACTIVE ]
  fi
fi

run tar -C "$here" --exclude=.git --exclude=.venv -czf "$tarball" .
run gcloud compute tpus tpu-vm scp "$tarball" "$tpu":~/swav-jax.tar.gz --zone "$zone" --worker=all
if [ -n "$accelerator" ]; then
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$install && $train"
else
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
    --command "$install && nohup $train > ~/swav-jax.log 2>&1 & echo started on \$(hostname)"
  echo "Logs: gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=0 --command 'tail -f ~/swav-jax.log'"
fi
run rm -f "$tarball"
