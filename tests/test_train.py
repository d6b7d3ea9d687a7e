"""The trainer: sharded step equals single device, multi-process equals single process,
freeze and queue semantics, resume bit for bit, config validation. What survives
failures (non-finite steps, preemption, damaged checkpoints, ...): test_reliability.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_config
from child_env import child_env
from train_helpers import (
    assert_within_reordering_noise,
    permuted,
    random_batches,
    run_steps,
    single_device_mesh,
    without_colour_augmentation,
)
from swav_jax.eval.run import load_variables
from swav_jax.errors import ConfigError
from swav_jax.train.loop import train
from swav_jax.mesh import bn_group_axis, make_mesh
from swav_jax.train.validate import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_steps(config, mesh, batches, steps_per_epoch=10):
    """(final host state, host metrics of each step) of one run."""
    [(states, history)] = run_steps(config, mesh, [batches], steps_per_epoch)
    return states[-1], history


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    # The device augmentation's sharding invariance is tested on its own
    # (test_data_augment); without it, permuted batches measure the float32 noise.
    config = without_colour_augmentation(tiny_config.get_config())
    batches = random_batches(config, 2)
    mesh8 = make_mesh(config)
    assert mesh8.devices.size == 8
    [(sharded, m8)] = run_steps(config, mesh8, [batches])
    runs = run_steps(
        config, single_device_mesh(), [batches, permuted(batches, 1), permuted(batches, 3)]
    )
    (single, m1), reorderings = runs[0], runs[1:]
    assert_within_reordering_noise(m8, m1, [history for _, history in reorderings])
    assert_within_reordering_noise(_trained(sharded), _trained(single), [_trained(s) for s, _ in reorderings])


def _trained(states):
    return {"params": states[-1].params, "batch_stats": states[-1].batch_stats}


@pytest.mark.slow
def test_bn_groups_keep_state_replicated_and_train():
    config = tiny_config.get_config()
    config.model.sync_bn_group_size = 4
    mesh = make_mesh(config)
    assert mesh.devices.shape == (2, 4) and bn_group_axis(mesh) == "data"
    state, history = _run_steps(config, mesh, random_batches(config, 2))
    assert all(np.isfinite(m["train/loss"]) for m in history)
    assert state.batch_stats  # replicated (out_specs P()) after the group mean


def test_prototypes_frozen_then_trained():
    config = tiny_config.get_config()
    config.swav.freeze_prototypes_niters = 2
    mesh = make_mesh(config)
    [(states, _)] = run_steps(config, mesh, [random_batches(config, 3)])
    init, state, later = states[0], states[2], states[3]  # before, after 2 steps (frozen), after 3
    # Frozen: only the per-step re-normalisation touches them (float rounding).
    np.testing.assert_allclose(
        state.params["prototypes_0"]["kernel"], init.params["prototypes_0"]["kernel"], atol=1e-6
    )
    assert not np.allclose(state.params["projection_out"]["kernel"], init.params["projection_out"]["kernel"])
    moved = np.abs(later.params["prototypes_0"]["kernel"] - init.params["prototypes_0"]["kernel"]).max()
    assert moved > 1e-5  # LARS steps are small (trust 0.001); frozen drift is ~1e-7


def test_queue_starts_fills_and_is_used_once_full():
    config = tiny_config.get_config()
    config.swav.queue_length = 2 * config.batch_size  # 2 local batches per device
    config.swav.epoch_queue_starts = 1
    mesh = make_mesh(config)
    steps_per_epoch = 2
    [(states, history)] = run_steps(config, mesh, [random_batches(config, 5)], steps_per_epoch)
    # Steps 0-1: before the queue epoch, nothing stored. Steps 2-3 fill it; step 4 uses it.
    assert [m["train/queue_in_use"] for m in history] == [0, 0, 0, 0, 1]
    np.testing.assert_array_equal(states[2].queue, 0.0)
    queue = np.asarray(states[-1].queue)
    assert queue.shape == (2, 2 * config.batch_size, config.model.proj_dim)
    np.testing.assert_allclose(np.linalg.norm(queue, axis=-1), 1.0, rtol=1e-5)


def test_queue_holds_newest_embeddings_in_front():
    """Per device: the newest local batch at the front, the previous one shifted back."""
    config = tiny_config.get_config()
    config.swav.queue_length = 2 * config.batch_size
    config.swav.epoch_queue_starts = 0
    mesh = make_mesh(config)
    [(states, _)] = run_steps(config, mesh, [random_batches(config, 2)])
    one, two = states[1], states[2]  # after the first and the second step
    local_b, local_q = config.batch_size // 8, 2 * config.batch_size // 8
    for d in range(8):
        block1 = np.asarray(one.queue)[:, d * local_q:(d + 1) * local_q]
        block2 = np.asarray(two.queue)[:, d * local_q:(d + 1) * local_q]
        np.testing.assert_array_equal(block1[:, local_b:], 0.0)
        np.testing.assert_allclose(block2[:, local_b:], block1[:, :local_b], atol=1e-6)


@pytest.mark.slow
def test_multiprocess_equals_single_process(tmp_path):
    single = tmp_path / "single.npz"
    subprocess.run(
        [sys.executable, "tests/train_worker.py", str(single), "--reorderings", "2"],
        cwd=ROOT, check=True, timeout=600, env=child_env(devices=4),
    )
    multi = tmp_path / "multi.npz"
    subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "2", "--", sys.executable, "tests/train_worker.py", str(multi)],
        cwd=ROOT, check=True, timeout=600, env=child_env(),
    )
    a, b = np.load(single), np.load(multi)
    assert sorted(_worker_run(b, 0)) == sorted(_worker_run(a, 0)) and len(_worker_run(a, 0)) > 60
    assert_within_reordering_noise(_worker_run(b, 0), _worker_run(a, 0), [_worker_run(a, 1), _worker_run(a, 2)])


def _worker_run(npz, r):
    """Run r of a train_worker.py output: {name: array}."""
    return {k[len(f"r{r}_"):]: npz[k] for k in npz.files if k.startswith(f"r{r}_")}


@pytest.mark.slow
def test_cli_training_across_two_processes_checkpoints_and_resumes(tmp_path):
    env = child_env()
    cmd = [
        "bash", "launch/local_multiprocess.sh", "2", "2", "--", sys.executable, "-m", "swav_jax", "train",
        "--config", "tests/tiny_config.py", "--workdir", str(tmp_path), "--max-steps",
    ]
    subprocess.run(cmd + ["2"], cwd=ROOT, check=True, timeout=600, env=env)
    assert load_variables(str(tmp_path))[1] == 2
    out = subprocess.run(cmd + ["3"], cwd=ROOT, check=True, timeout=600, env=env, capture_output=True, text=True)
    assert "starting at step 2" in out.stdout
    assert load_variables(str(tmp_path))[1] == 3
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_loss_decreases_on_a_short_run(tmp_path):
    config = tiny_config.get_config()
    config.epochs = 3  # 132 steps: the loss falls from about 3.8 to 2.3
    config.batch_size = 32
    config.checkpoint_every_steps = 1000
    train(config, str(tmp_path))
    losses = [m["train/loss"] for m in _metrics(tmp_path)]
    assert len(losses) == 3 * (1437 // 32)
    assert np.mean(losses[-5:]) < losses[0] - 0.1, losses


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    config = tiny_config.get_config()
    config.swav.queue_length = 32
    config.swav.epoch_queue_starts = 0
    train(config, str(tmp_path / "straight"), max_steps=5)
    train(config, str(tmp_path / "resumed"), max_steps=3)
    train(config, str(tmp_path / "resumed"), max_steps=5)
    a, step_a = load_variables(str(tmp_path / "straight"))
    b, step_b = load_variables(str(tmp_path / "resumed"))
    assert step_a == step_b == 5
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    straight = {m["step"]: m["train/loss"] for m in _metrics(tmp_path / "straight")}
    resumed = {m["step"]: m["train/loss"] for m in _metrics(tmp_path / "resumed")}
    assert straight == resumed


@pytest.mark.parametrize(
    "key,value,devices,match",
    [
        ("batch_size", 12, 8, "batch_size"),
        ("batch_size", 0, 1, "batch_size"),
        ("crops.num_crops", (2,), 1, "crops.num_crops"),
        ("crops.min_scale_crops", (0.14, 0.9), 1, r"crops.min_scale_crops\[1\]"),
        ("crops.size_crops", (16, 0), 1, r"crops.size_crops\[1\]"),
        ("swav.crops_for_assign", (0, 9), 1, "swav.crops_for_assign"),
        ("swav.crops_for_assign", (2,), 1, "swav.crops_for_assign"),
        ("swav.queue_length", 8, 1, "swav.queue_length"),
        ("swav.epsilon", 0.0, 1, "swav.epsilon"),
        ("swav.sinkhorn_iterations", 0, 1, "swav.sinkhorn_iterations"),
        ("model.num_prototypes", (12, 0), 1, r"model.num_prototypes\[1\]"),
        ("model.sync_bn_group_size", 3, 8, "model.sync_bn_group_size"),
        ("model.dtype", "float64", 1, "model.dtype"),
    ],
)
def test_config_validation_names_the_key(key, value, devices, match):
    config = tiny_config.get_config()
    section, _, name = key.rpartition(".")
    target = config[section] if section else config
    with config.unlocked():
        target[name] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=devices, num_processes=1)


def test_cli_reports_bad_config_before_compiling(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "swav_jax", "train", "--config", "tests/tiny_config.py",
         "--workdir", str(tmp_path), "--config.batch_size=12"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=child_env(devices=8),
    )
    assert result.returncode != 0
    assert "config.batch_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_splits_the_cpu_into_config_cpu_devices(tmp_path):
    # child_env(): jax's default of one CPU device, which the config's count replaces.
    result = subprocess.run(
        [sys.executable, "-m", "swav_jax", "train", "--config", "tests/tiny_config.py",
         "--workdir", str(tmp_path), "--config.cpu_devices=2", "--max-steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=child_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "global batch 16 on 2 devices / 1 processes" in result.stdout


def test_cli_reports_a_bad_cpu_devices_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "swav_jax", "train", "--config", "tests/tiny_config.py",
         "--workdir", str(tmp_path), "--config.cpu_devices=-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=child_env(),
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: config.cpu_devices: must be an integer >= 0, got -1"
