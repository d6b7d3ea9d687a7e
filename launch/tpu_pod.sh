#!/usr/bin/env bash
# SwAV on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
# Copies this checkout to every worker, installs it, and starts training on all workers at
# once; jax.distributed.initialize() finds the pod's coordinator by itself. WORKDIR should be
# a gs:// path (or a shared disk) so checkpoints are visible to every worker; re-running the
# same command resumes from the latest checkpoint there.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}; shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp --suffix=.tar.gz)
tar -C "$here" --exclude=.git --exclude=.venv -czf "$tarball" .
gcloud compute tpus tpu-vm scp "$tarball" "$tpu":~/swav-jax.tar.gz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p ~/swav-jax && tar -C ~/swav-jax -xzf ~/swav-jax.tar.gz
  cd ~/swav-jax
  python3 -m pip install -q -U 'jax[tpu]' -e .
  nohup swav-jax train --config $config --workdir $workdir --distributed auto $* > ~/swav-jax.log 2>&1 &
  echo started on \$(hostname)
"
rm -f "$tarball"
echo "Logs: gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=0 --command 'tail -f ~/swav-jax.log'"
