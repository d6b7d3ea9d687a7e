"""The launchers' --dry-run prints exactly the commands they run: each launcher runs once
with --dry-run and once against fake gcloud / srun that log their arguments."""

import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Logs each call's argv as one JSON line; `describe` answers the next state of $STATES.
FAKE = """#!/usr/bin/env bash
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$(basename "$0")" "$@" >> "$CALLS"
if [ "${4:-}" = describe ]; then
  state=$(head -n 1 "$STATES"); sed -i 1d "$STATES"; echo "$state"
fi
"""


@pytest.fixture
def fake_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "srun"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"),
               STATES=str(tmp_path / "states"), TMPDIR=str(tmp_path), POLL_SECONDS="0")

    def run(*args, states=(), check=True):
        (tmp_path / "states").write_text("".join(s + "\n" for s in states))
        (tmp_path / "calls").write_text("")
        proc = subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        if check:
            assert proc.returncode == 0, proc.stderr
        calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
        return proc, calls

    return run


def _printed(stdout, tools=("gcloud", "srun")):
    """The printed commands of the given tools, split as the shell would."""
    commands = [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith(("#", "Logs:"))]
    return [c for c in commands if c[0] in tools]


def _remote_train(ssh_call):
    command = ssh_call[ssh_call.index("--command") + 1]
    words = shlex.split(command)
    return words[words.index("swav-jax"):]


POD = ["my-tpu", "us-east5-a", "swav_800ep", "gs://bucket/it's run", "--config.batch_size=4096"]
TRAIN = ["swav-jax", "train", "--config", "swav_800ep", "--workdir", "gs://bucket/it's run",
         "--distributed", "auto", "--config.batch_size=4096"]


def test_tpu_pod_existing_vm(fake_tools):
    dry, none = fake_tools("launch/tpu_pod.sh", "--dry-run", *POD)
    assert none == []  # --dry-run calls no gcloud
    _, calls = fake_tools("launch/tpu_pod.sh", *POD)
    assert _printed(dry.stdout) == calls
    assert [c[:4] for c in calls] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 2
    assert calls[0][4] == "scp" and calls[1][4] == "ssh" and "--worker=all" in calls[1]
    # Training in the background on every worker, with the tpu extra installed first.
    assert _remote_train(calls[1])[: len(TRAIN)] == TRAIN
    assert "pip install -q -e '.[tpu]'" in calls[1][-1] and "nohup swav-jax train" in calls[1][-1]


def test_tpu_pod_queued_resource(fake_tools):
    args = ["launch/tpu_pod.sh", "--queued", "v5p-128", "--spot", *POD]
    dry, _ = fake_tools(args[0], "--dry-run", *args[1:])
    proc, calls = fake_tools(*args, states=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu-qr", "--zone", "us-east5-a",
                "--format", "value(state.state)"]
    assert calls == [calls[0]] + [describe] * 3 + calls[4:]
    assert _printed(dry.stdout) == [calls[0], describe] + calls[4:]  # the poll is printed once
    assert calls[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu-qr", "--node-id", "my-tpu",
                        "--zone", "us-east5-a", "--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5",
                        "--spot"]
    assert [c[4] for c in calls[4:]] == ["scp", "ssh", "delete"]
    assert _remote_train(calls[5]) == TRAIN  # in the foreground: the delete waits for it
    assert "ACTIVE" in proc.stdout


def test_tpu_pod_queued_resource_is_deleted_when_it_fails(fake_tools):
    proc, calls = fake_tools("launch/tpu_pod.sh", "--queued", "v6e-64", *POD, states=["FAILED"], check=False)
    assert proc.returncode == 1 and "is FAILED" in proc.stderr
    assert [c[4] for c in calls] == ["create", "describe", "delete"]
    assert calls[0][calls[0].index("--runtime-version") + 1] == "v2-alpha-tpuv6e"


def test_tpu_pod_usage_errors(fake_tools):
    proc, calls = fake_tools("launch/tpu_pod.sh", "my-tpu", "zone", check=False)
    assert proc.returncode == 2 and "usage:" in proc.stderr and calls == []
    proc, calls = fake_tools("launch/tpu_pod.sh", "--queued", "v3-8", *POD, check=False)
    assert proc.returncode == 2 and "--runtime-version" in proc.stderr and calls == []


def test_slurm(fake_tools, tmp_path):
    workdir = str(tmp_path / "my run")
    args = ["launch/slurm_gpu.sbatch", "swav_800ep", workdir, "--config.batch_size=4096"]
    dry, _ = fake_tools(args[0], "--dry-run", *args[1:])
    assert not os.path.exists(workdir)
    _, calls = fake_tools(*args)
    assert os.path.isdir(workdir)
    assert _printed(dry.stdout) == calls == [[
        "srun", "--kill-on-bad-exit=1", f"--output={workdir}/%j-%t.log", "swav-jax", "train",
        "--config", "swav_800ep", "--workdir", workdir, "--distributed", "auto", "--config.batch_size=4096",
    ]]


def test_local_multiprocess(fake_tools):
    # One write per process, so the two outputs cannot interleave.
    show = ("import os, sys; e = os.environ; "
            "os.write(1, f\"{e['JAX_PROCESS_ID']} {e['JAX_NUM_PROCESSES']} {sys.argv[1:]}\\n\".encode())")
    args = ["launch/local_multiprocess.sh", "2", "3", "--", sys.executable, "-c", show, "x y"]
    dry, _ = fake_tools(args[0], "--dry-run", *args[1:])
    printed = [shlex.split(line.rstrip("&")) for line in dry.stdout.splitlines()]
    assert [c[c.index(sys.executable):] for c in printed] == [[sys.executable, "-c", show, "x y", "--distributed", "auto"]] * 2
    assert [[w for w in c if w.startswith("JAX_PROCESS_ID=")] for c in printed] == [["JAX_PROCESS_ID=0"], ["JAX_PROCESS_ID=1"]]
    run, _ = fake_tools(*args)
    assert sorted(run.stdout.splitlines()) == ["0 2 ['x y', '--distributed', 'auto']", "1 2 ['x y', '--distributed', 'auto']"]
