"""What survives what: a non-finite step, damaged checkpoints, a failed save, preemption,
unreadable data, config mistakes, finished and resumed runs, a dead process. Each test
here backs one line of README's "What survives what"."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from PIL import Image

import tiny_config
from child_env import child_env
from swav_jax import cli
from swav_jax.errors import CheckpointError, DataError, NonFiniteLossError
from swav_jax.eval.run import load_variables
from swav_jax.train import loop
from swav_jax.train.agreement import HostAgreement
from swav_jax.train.checkpoint import Checkpointer
from swav_jax.train.loop import train
from toy_method import use_toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return child_env(PYTHONDONTWRITEBYTECODE="1")


def _train_command(workdir, *overrides, toy=False):
    """`swav-jax train` with the tiny config; `toy`: with tests/toy_method.py's Toy."""
    program = ["tests/toy_method.py"] if toy else ["-m", "swav_jax"]
    return [sys.executable, *program, "train", "--config", "tests/tiny_config.py", "--workdir", str(workdir),
            *overrides]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _image_folder(root, good, bad):
    """`good` 16 px PNGs and `bad` undecodable files, in one class folder."""
    folder = root / "images" / "all"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"good{i:03d}.png")
    for i in range(bad):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image")
    return str(root / "images")


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- non-finite steps
def _toy_config(**keys):
    config = tiny_config.get_config()
    config.eval.knn_at_end = False
    for key, value in keys.items():
        setattr(config, key, value)
    return config


def test_a_finite_but_ruined_state_is_not_kept(tmp_path, monkeypatch):
    # The issue's case: step 2's update leaves the parameters finite but huge (1e30), and
    # step 3's loss, computed from them, is not finite. The state saved at step 2 is
    # ruined although every value in it is finite.
    use_toy(monkeypatch, grow=1e15)
    with pytest.raises(NonFiniteLossError, match=r"at step 3.*No checkpoint was saved before it"):
        train(_toy_config(checkpoint_every_steps=1000), str(tmp_path / "never_saved"), max_steps=20)
    with pytest.raises(NonFiniteLossError, match=r"at step 3.*Checkpoint 2, the state it started from, was moved "
                       r"to .*rejected_checkpoints/2\. The last good checkpoint is step 1 in "):
        train(_toy_config(checkpoint_every_steps=1), str(tmp_path / "run"), max_steps=20)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1"]
    assert load_variables(str(tmp_path / "run"))[1] == 1


def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    use_toy(monkeypatch, grow=1e30, loss_from_state=False)  # the loss stays finite; w is inf after step 2
    with pytest.raises(NonFiniteLossError, match=r"Non-finite values in the state after step 2; not saving it\. "
                       r"The last good checkpoint is step 1 in"):
        train(_toy_config(checkpoint_every_steps=1), str(tmp_path), max_steps=20)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


@pytest.mark.slow
def test_non_finite_step_keeps_only_checkpoints_that_train_on(tmp_path):
    # The reproduction on the real network: base_lr=1e30 takes the parameters to
    # ~1e28 (finite) and the next loss is NaN.
    config = tiny_config.get_config()
    config.optim.base_lr = 1e30
    config.checkpoint_every_steps = 1
    with pytest.raises(NonFiniteLossError) as error:
        train(config, str(tmp_path), max_steps=20)
    _, kept = load_variables(str(tmp_path))
    assert f"The last good checkpoint is step {kept} in" in str(error.value)
    assert sorted(os.listdir(tmp_path / "rejected_checkpoints")) == [str(kept + 1)]
    # What is kept trains on: resumed at the tiny config's rate, the losses are finite.
    train(tiny_config.get_config(), str(tmp_path), max_steps=kept + 2)
    resumed = [r for r in _rows(tmp_path) if r["step"] > kept]
    assert [r["step"] for r in resumed] == [kept + 1, kept + 2]
    assert all(np.isfinite(r["train/loss"]) for r in resumed), resumed


# ---------------------------------------------------------------- damaged checkpoints
class _Method:
    name, eval_fields = "swav", ("params", "batch_stats")


def _state(value):
    noise = np.random.default_rng(0).random((64, 64), np.float32)  # incompressible: data files of 16 KiB
    return {"params": {"backbone": {"w": value + noise}},
            "batch_stats": {"backbone": {"mean": np.full((64,), value, np.float32)}}}


def _abstract():
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _state(0.0))


def _damage(step_dir, how):
    if how == "truncated data file":
        data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
                   key=lambda p: p.stat().st_size)
        os.truncate(data, data.stat().st_size // 2)
    elif how == "no _METADATA":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "not committed":  # e.g. an interrupted copy: orbax's commit markers missing
        (step_dir / "_CHECKPOINT_METADATA").unlink()
        (step_dir / "commit_success.txt").unlink()


def _write_checkpoints(workdir, values):
    """checkpoints/<step> as the trainer writes them, with `_state(value)` as the state."""
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"))
    for step, value in values.items():
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state(value)), data=ocp.args.JsonSave({"next_batch": step}),
            method=ocp.args.JsonSave({"name": "swav", "eval_fields": ["params", "batch_stats"]})))
    manager.close()


def test_damaged_checkpoints_are_skipped_with_a_warning_each(tmp_path, caplog):
    _write_checkpoints(tmp_path, {step: float(step) for step in (2, 4, 6, 8)})
    ckpts = tmp_path / "checkpoints"
    for step, how in ((8, "not committed"), (6, "truncated data file"), (4, "no _METADATA")):
        _damage(ckpts / str(step), how)

    # Evaluation reads the newest checkpoint that restores.
    variables, step = load_variables(str(tmp_path))
    assert step == 2
    np.testing.assert_array_equal(variables["params"]["backbone"]["w"], _state(2.0)["params"]["backbone"]["w"])
    for skipped in ("8", "6", "4"):
        assert f"checkpoint {skipped}" in caplog.text

    # Resuming does too, warns naming each one skipped and why, and moves them aside.
    caplog.clear()
    checkpointer = Checkpointer(str(tmp_path), keep=5, method=_Method())
    step, state, data_state = checkpointer.restore_latest(_abstract())
    assert step == 2 and data_state["next_batch"] == 2
    np.testing.assert_array_equal(state["params"]["backbone"]["w"], _state(2.0)["params"]["backbone"]["w"])
    warned = caplog.text
    assert "checkpoint 8" in warned and "not committed" in warned
    assert "checkpoint 6" in warned and "OUT_OF_RANGE" in warned
    assert "checkpoint 4" in warned and "_METADATA" in warned
    assert sorted(os.listdir(ckpts)) == ["2"]
    assert sorted(os.listdir(tmp_path / "rejected_checkpoints")) == ["4", "6", "8"]
    checkpointer.save(4, _state(4.0), {"next_batch": 4})  # training on saves over the old steps
    checkpointer.close()

    # None restores: one clear error.
    for step in ("2", "4"):
        _damage(ckpts / step, "no _METADATA")
    checkpointer = Checkpointer(str(tmp_path), keep=5, method=_Method())
    with pytest.raises(CheckpointError, match=r"none of the checkpoints in .* restores: 4 \(.*\), 2 \(.*\)"):
        checkpointer.restore_latest(_abstract())
    checkpointer.close()
    with pytest.raises(CheckpointError, match="none of the checkpoints in .* restores"):
        load_variables(str(tmp_path))


def test_a_checkpoint_with_non_finite_values_is_skipped(tmp_path, caplog):
    _write_checkpoints(tmp_path, {1: 1.0, 2: float("nan")})
    checkpointer = Checkpointer(str(tmp_path), keep=5, method=_Method())
    step, _, _ = checkpointer.restore_latest(_abstract())
    checkpointer.close()
    assert step == 1 and "checkpoint 2" in caplog.text and "non-finite" in caplog.text


def test_cli_says_in_one_line_when_no_checkpoint_restores(tmp_path):
    _write_checkpoints(tmp_path, {2: 2.0})
    _damage(tmp_path / "checkpoints" / "2", "no _METADATA")
    result = subprocess.run(_train_command(tmp_path), cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [error] = _error_lines(result.stderr)
    assert "none of the checkpoints" in error and "_METADATA" in error


# ---------------------------------------------------------------- a failed save
def test_a_failed_save_stops_the_run_at_once_naming_path_and_error(tmp_path):
    # A write past 100 KiB fails as on a full disk (EFBIG; SIGXFSZ, which would kill the
    # process instead, is ignored). The toy's state is 256 KiB.
    limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 100; exec \"$@\"", "limited"]
    result = subprocess.run(
        limited + _train_command(tmp_path, "--config.checkpoint_every_steps=25", "--max-steps", "80", toy=True),
        cwd=ROOT, env={**_env(), "TOY_SIZE": str(64 * 1024)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    # Orbax logs the failure of its writer thread; the run ends on one line saying what.
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not save checkpoint 25 to " + str(tmp_path / "checkpoints" / "25"))
    assert "File too large" in error
    assert os.listdir(tmp_path / "checkpoints") == []  # no torn folder
    # Stopped as soon as the write failed, not at the next save (which waits for it).
    assert max(r["step"] for r in _rows(tmp_path)) < 50


# ---------------------------------------------------------------- preemption
def test_sigterm_is_answered_within_a_step_whatever_the_log_cadence(tmp_path):
    # The host used to run up to a log interval ahead of the device and finish all of
    # that queued work first. The toy's step sleeps 0.2 s on the device.
    proc = subprocess.Popen(
        _train_command(tmp_path, "--config.log_every_steps=20", "--config.checkpoint_every_steps=100000", toy=True),
        cwd=ROOT, env={**_env(), "TOY_LAG": "0.2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stderr:
            if line.startswith("[20/"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    [saved] = [int(line.split("saved at step ")[1].split(";")[0]) for line in out.splitlines()
               if line.startswith("Preempted")]
    # Step 20 is logged while step 21 runs; 22 is the step after the one the signal met.
    assert 20 < saved <= 23, out
    assert load_variables(str(tmp_path))[1] == saved


def test_the_host_stays_within_a_step_of_the_device(tmp_path, monkeypatch):
    toy = use_toy(monkeypatch, lag=0.3)  # the device, not the host, sets the pace
    polls = []  # (steps dispatched, steps the first device has finished) at each poll

    def stop_requested():
        # The first device: the one the host reads metrics from. (A real step's collectives
        # hold the devices together; the toy's replicas run apart.)
        done = sum(m["train/loss"].addressable_shards[0].data.is_ready() for m in toy.dispatched)
        polls.append((len(toy.dispatched), done))
        return len(polls) == 8

    config = _toy_config(log_every_steps=1000, checkpoint_every_steps=1000)
    train(config, str(tmp_path), stop_requested=stop_requested)
    assert all(dispatched - done <= 1 for dispatched, done in polls), str(polls)
    # Stopped at the step queued when the flag was seen: one step after the device's.
    assert load_variables(str(tmp_path))[1] == len(toy.dispatched) == polls[-1][0] <= polls[-1][1] + 1


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _process_id(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"JAX_PROCESS_ID"])


def _start_two_processes(workdir, *overrides):
    launcher = subprocess.Popen(
        ["bash", "launch/local_multiprocess.sh", "2", "2", "--", *_train_command(workdir, *overrides, toy=True)],
        cwd=ROOT, env={**_env(), "TOY_LAG": "0.1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 400
    while time.time() < deadline and not (os.path.exists(workdir / "metrics.jsonl") and _rows(workdir)):
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.5)
    workers = {_process_id(pid): pid for pid in _children(launcher.pid)}
    assert sorted(workers) == [0, 1]
    return launcher, workers


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step_and_skips_are_totalled(tmp_path):
    data_dir = _image_folder(tmp_path, good=60, bad=4)
    workdir = tmp_path / "run"
    launcher, workers = _start_two_processes(
        workdir, "--config.data.source=folder", f"--config.data.data_dir={data_dir}", "--config.epochs=50",
        "--config.checkpoint_every_steps=100000",
    )
    while max(r["step"] for r in _rows(workdir)) < 6:  # the first pass over the 64 records is done
        time.sleep(0.2)
    os.kill(workers[1], signal.SIGTERM)  # one VM gets the notice
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    stops = [line for line in err.splitlines() if "Stop requested: saved a checkpoint at step" in line]
    assert len(stops) == 2 and len({line.split("step ")[1] for line in stops}) == 1, stops
    rows = _rows(workdir)
    assert [r["data/skipped_records"] for r in rows if r["step"] >= 5] == [4] * (len(rows) - 4)
    assert "4 unreadable records were skipped" in out


@pytest.mark.slow
def test_a_dead_process_ends_the_others_within_150_s(tmp_path):
    launcher, workers = _start_two_processes(tmp_path, "--config.epochs=50")
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    launcher.communicate(timeout=300)
    # The survivor learns of it from jax.distributed's missed heartbeats (100 s).
    assert launcher.returncode != 0
    assert time.time() - start < 150


def test_stop_and_count_are_agreed_through_the_devices():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "bn"))
    agreement = HostAgreement(mesh, deferred=True)
    # Deferred: each call returns the agreed values of the call before.
    assert agreement.exchange(False, 3) == (False, 0)
    assert agreement.exchange(True, 5) == (False, 3)
    assert agreement.exchange(False, 5, wait=True) == (False, 5)
    assert agreement.exchange(True, 6, wait=True) == (True, 6)
    assert HostAgreement(mesh, deferred=False).exchange(True, 2) == (True, 2)


# ---------------------------------------------------------------- unreadable data
def test_data_where_nothing_decodes_fails_in_one_line_before_compiling(tmp_path, monkeypatch):
    data_dir = _image_folder(tmp_path, good=0, bad=20)
    config = tiny_config.get_config()
    config.data.source, config.data.data_dir = "folder", data_dir
    real = loop.get_method(config.method)

    class StepNeverRuns:
        def __getattr__(self, name):
            return getattr(real, name)

        def build(self, *args, **kwargs):
            def never(*_):
                raise AssertionError("compiled before the data check")

            return real.build(*args, **kwargs)._replace(train_step=never, init_state=never)

    monkeypatch.setattr(loop, "get_method", lambda name: StepNeverRuns())
    with pytest.raises(DataError, match="could be decoded"):
        train(config, str(tmp_path / "run"))
    result = subprocess.run(
        _train_command(tmp_path / "cli", "--config.data.source=folder", f"--config.data.data_dir={data_dir}"),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [error] = _error_lines(result.stderr)
    assert "images/all/bad" in error, error
    assert "WARNING" not in result.stderr


def test_skipped_files_are_counted_once_and_resume_leaves_one_row_per_step(tmp_path, monkeypatch, capsys):
    use_toy(monkeypatch)
    data_dir = _image_folder(tmp_path, good=29, bad=3)  # 32 records: 2 steps a pass
    config = _toy_config(epochs=5, keep_checkpoints=5, checkpoint_every_steps=2, log_every_steps=1)
    config.data.source, config.data.data_dir = "folder", data_dir
    workdir = str(tmp_path / "run")
    train(config, workdir, max_steps=5)  # checkpoints 2, 4, 5; each bad file met in 3 passes
    assert [r["step"] for r in _rows(workdir)] == [1, 2, 3, 4, 5]
    assert [r["data/skipped_records"] for r in _rows(workdir)][1:] == [3] * 4
    assert "3 unreadable records were skipped" in capsys.readouterr().out
    # Killed after step 5 was logged but before checkpoints 4 and 5 were written:
    for step in ("4", "5"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", step))
    train(config, workdir, max_steps=6)
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["data/skipped_records"] for r in rows][1:] == [3] * 5


# ---------------------------------------------------------------- config mistakes
def test_unknown_config_key_is_named_with_the_nearest_keys():
    with pytest.raises(SystemExit, match=r"unknown config key 'nonexistent'"):
        cli.load_config(["--config=tests/tiny_config.py", "--config.nonexistent=1"])
    with pytest.raises(SystemExit, match=r"unknown config key 'optim.base_lrr'.*did you mean 'optim.base_lr'"):
        cli.load_config(["--config=tests/tiny_config.py", "--config.optim.base_lrr=1"])


def test_cli_rejects_a_bad_data_key_before_building_anything(tmp_path):
    start = time.time()
    result = subprocess.run(_train_command(tmp_path / "run", "--config.data.canvas_size=0"), cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [error] = _error_lines(result.stderr)
    assert "data.canvas_size" in error
    assert not (tmp_path / "run").exists()  # nothing built, not even the workdir
    print(f"failed after {time.time() - start:.1f} s")


# ---------------------------------------------------------------- finished runs
def test_a_finished_run_says_so_and_redoes_nothing(tmp_path, monkeypatch, capsys):
    use_toy(monkeypatch)
    calls = []

    def knn_stub(config, variables, suffix=""):
        calls.append(suffix)
        return {f"eval/knn_top1{suffix}": 50.0}

    def references_stub(config):
        return {**knn_stub(config, None, "_random_init"), **knn_stub(config, None, "_raw_pixels")}

    monkeypatch.setattr(loop, "knn_eval", knn_stub)
    monkeypatch.setattr(loop, "knn_reference_levels", references_stub)
    config = _toy_config(batch_size=256, log_every_steps=1)  # 5 steps an epoch
    config.eval.knn_at_end = config.eval.knn_random_init = config.eval.knn_raw_pixels = True
    workdir = str(tmp_path)
    train(config, workdir)
    assert calls == ["", "_random_init", "_raw_pixels"]
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5] and "eval/knn_top1" in rows[-1]
    capsys.readouterr()
    train(config, workdir)
    assert "already finished at step 5" in capsys.readouterr().out
    assert calls == ["", "_random_init", "_raw_pixels"] and _rows(workdir) == rows
    # Killed during the final evaluation: a re-run does only that.
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:-1])
    train(config, workdir)
    assert calls == ["", "_random_init", "_raw_pixels"] * 2 and _rows(workdir) == rows
