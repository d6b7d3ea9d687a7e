#!/usr/bin/env bash
# N CPU processes on this machine, each with D host devices, joined by jax.distributed.
#
#   launch/local_multiprocess.sh [--dry-run] N D -- swav-jax train --config demo --workdir DIR
#
# Every process runs the same command with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID set and `--distributed auto` appended to `train`, so the program calls
# jax.distributed.initialize() and feeds its own shard of the data. Exits non-zero if any
# process fails. Used by the tests and by anyone without a cluster. --dry-run prints the
# N commands instead of running them.
set -euo pipefail
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2
  exit 2
fi
n=$1; d=$2; shift 3
port=${JAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  command=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$d ${XLA_FLAGS:-}"
           "JAX_COORDINATOR_ADDRESS=localhost:$port" "JAX_NUM_PROCESSES=$n" "JAX_PROCESS_ID=$i"
           "$@" --distributed auto)
  if [ "$dry" = 1 ]; then printf '%q ' "${command[@]}"; echo "&"; continue; fi
  "${command[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
