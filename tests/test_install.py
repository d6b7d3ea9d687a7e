"""The installed user: `pip install .` (not editable) into a fresh virtual environment (its
dependencies borrowed from the test environment), then, from an empty directory, the recipes
by name, a short demo run, its plots and an evaluation; the workdir holds config.json, metrics.jsonl, TensorBoard events and plots."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_non_editable_install_runs_the_demo_by_name_from_an_empty_directory(tmp_path):
    # Build from a copy of the sources, so that nothing is written into the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "workdir*", ".whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, swav_jax = str(venv / "bin" / "python"), str(venv / "bin" / "swav-jax")
    # The dependencies come from this environment (a path line in a .pth file: its editable
    # install of swav_jax is not seen, because .pth files on such a path are not read), so the
    # test measures the package, not a 7-minute download; CI's own fresh install resolves them.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    with open(os.path.join(site, "dependencies_from_the_test_environment.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(source)],
                   check=True, timeout=600)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["JAX_PLATFORMS"] = "cpu"

    def run(*args, timeout=900):
        result = subprocess.run(args, cwd=empty, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    where = run(python, "-c", "import importlib.util, swav_jax; print(swav_jax.__file__); "
                "print(importlib.util.find_spec('tensorflow'))")
    assert str(venv) in where.splitlines()[0] and where.splitlines()[1] == "None"  # installed, no TensorFlow
    listing = run(swav_jax, "configs")
    assert "demo" in listing and "swav_800ep" in listing

    out = run(swav_jax, "train", "--config", "demo", "--workdir", "W", "--max-steps", "3",
              "--config.log_every_steps=1", "--config.checkpoint_every_steps=3")
    assert "compiling the train step ..." in out and "[3/880" in out
    assert "Unable to initialize backend" not in out
    workdir = empty / "W"
    assert (workdir / "config.json").is_file() and (workdir / "metrics.jsonl").is_file()
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))

    out = run(swav_jax, "eval", "knn", "--config", "demo", "--workdir", "W")
    assert "eval/knn_top1 = " in out and "_CHECKPOINT_METADATA" not in out
    # The demo asks for the reference levels: the evaluation prints them beside the kNN.
    assert "eval/knn_top1_random_init = " in out and "eval/knn_top1_raw_pixels = " in out

    out = run(swav_jax, "plot", "--workdir", "W")
    for name in ("loss.png", "eval.png", "summary.png"):
        assert (workdir / "plots" / name).is_file(), out
