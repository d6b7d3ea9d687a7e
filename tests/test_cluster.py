"""jax.distributed.initialize arguments from faked launcher environments (swav_jax.cluster)."""

import pytest

from swav_jax.cluster import first_host, initialize_kwargs

PORT = 12345 % 4096 + 61440  # jax's choice for job 12345


def _slurm(**env):
    base = dict(SLURM_JOB_ID="12345", SLURM_STEP_NODELIST="gpu[003-004]", SLURM_JOB_NODELIST="gpu[001-009]",
                SLURM_NTASKS="8", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_NODEID="1")
    return {**base, **env}


def test_one_task_per_gpu_bound_by_gpus_per_task():
    """launch/slurm_gpu.sbatch: --gpus-per-task=1, so the task sees one GPU, numbered 0."""
    env = _slurm(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="1")
    assert initialize_kwargs(env) == dict(
        coordinator_address=f"gpu003:{PORT}", num_processes=8, process_id=5, local_device_ids=[0]
    )


def test_one_task_per_node_drives_all_its_gpus():
    env = _slurm(SLURM_NTASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_PROCID="1", SLURM_LOCALID="0",
                 CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert initialize_kwargs(env)["local_device_ids"] == [0, 1, 2, 3]


def test_tasks_sharing_all_gpus_of_a_node_take_their_local_rank():
    """--gres=gpu:4 with 4 tasks a node and no binding: jax's own convention."""
    env = _slurm(SLURM_PROCID="6", SLURM_LOCALID="2", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert initialize_kwargs(env)["local_device_ids"] == [2]
    # The same list with SLURM_GPUS_PER_TASK set: SLURM bound these GPUs to this task.
    env = _slurm(SLURM_PROCID="6", SLURM_LOCALID="2", SLURM_GPUS_PER_TASK="4", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert initialize_kwargs(env)["local_device_ids"] == [0, 1, 2, 3]
    # Nothing says which GPUs the task sees: jax's convention too.
    assert initialize_kwargs(_slurm(SLURM_PROCID="6", SLURM_LOCALID="2"))["local_device_ids"] == [2]


def test_job_nodelist_when_no_step_nodelist():
    env = _slurm(SLURM_PROCID="0", SLURM_LOCALID="0", CUDA_VISIBLE_DEVICES="0", SLURM_GPUS_PER_TASK="1")
    del env["SLURM_STEP_NODELIST"]
    assert initialize_kwargs(env)["coordinator_address"] == f"gpu001:{PORT}"
    del env["SLURM_JOB_NODELIST"]
    with pytest.raises(ValueError, match="start the tasks with srun"):
        initialize_kwargs(env)


@pytest.mark.parametrize("nodes,first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"),
    ("node[007,001-003]", "node007"), ("gpu-a[10-11]", "gpu-a10"), ("rack[2-3]-n[05-06],x", "rack2-n05"),
])
def test_first_host_of_slurm_node_lists(nodes, first):
    assert first_host(nodes) == first


def test_local_launcher_and_cloud_tpu():
    local = dict(JAX_COORDINATOR_ADDRESS="localhost:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    assert initialize_kwargs({**_slurm(SLURM_PROCID="0", SLURM_LOCALID="0"), **local}) == dict(
        coordinator_address="localhost:1234", num_processes=2, process_id=1
    )
    assert initialize_kwargs({"TPU_WORKER_ID": "3"}) == {}  # jax detects Cloud TPU pods itself


def test_unreadable_tasks_per_node_is_a_clear_error():
    env = _slurm(SLURM_PROCID="0", SLURM_LOCALID="0", CUDA_VISIBLE_DEVICES="0,1", SLURM_STEP_TASKS_PER_NODE="two")
    with pytest.raises(ValueError, match="tasks per node 'two'"):
        initialize_kwargs(env)
    env = _slurm(SLURM_PROCID="0", SLURM_LOCALID="0", CUDA_VISIBLE_DEVICES="0,1", SLURM_NODEID="2")
    with pytest.raises(ValueError, match="SLURM_NODEID=2"):
        initialize_kwargs(env)
