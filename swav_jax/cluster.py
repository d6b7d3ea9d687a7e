"""Arguments of `jax.distributed.initialize` from the launcher's environment.

Three cases, in this order:
- launch/local_multiprocess.sh: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
- SLURM (launch/slurm_gpu.sbatch): everything explicit. jax's own SLURM detection makes
  task i of a node drive GPU i of the GPUs it sees, which assumes every task sees all
  of its node's GPUs. With `--gpus-per-task=1` SLURM binds one GPU to each task, so
  every task but the first of a node would ask for a GPU it cannot see (jax issue
  28194). Here the local devices are the ones the task sees: CUDA_VISIBLE_DEVICES lists
  them and CUDA numbers them from 0. Only when several tasks of a node all see the same
  GPUs (a node-wide `--gres` without binding, no SLURM_GPUS_PER_TASK) does task i take
  the i-th, as jax does. One task per node with all its GPUs works the same way.
- anything else (Cloud TPU pods): {} and jax detects the cluster itself.
"""

from __future__ import annotations

import re
from typing import Any, Mapping


def initialize_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for `jax.distributed.initialize` from environment `env`."""
    if "JAX_NUM_PROCESSES" in env:
        return dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        return _slurm_kwargs(env)
    return {}


def _slurm_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise ValueError("SLURM job without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: start the tasks with srun")
    # The port jax's SLURM detection picks: from the job id, in the ephemeral range.
    port = int(env["SLURM_JOB_ID"]) % 2**12 + 65536 - 2**12
    local_rank = int(env["SLURM_LOCALID"])
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    shared = len(visible) > 1 and len(visible) == _tasks_on_this_node(env) and "SLURM_GPUS_PER_TASK" not in env
    return dict(
        coordinator_address=f"{first_host(nodes)}:{port}",
        num_processes=int(env["SLURM_NTASKS"]),
        process_id=int(env["SLURM_PROCID"]),
        local_device_ids=[local_rank] if not visible or shared else list(range(len(visible))),
    )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-004,007],big1' -> 'gpu003'."""
    first = re.match(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", nodelist.strip()).group()
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ('4(x2),1')."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return 1
    per_node = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot read SLURM tasks per node {spec!r}")
        per_node += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    if node >= len(per_node):
        raise ValueError(f"SLURM_NODEID={node} but SLURM tasks per node {spec!r} lists {len(per_node)} nodes")
    return per_node[node]
