"""bench/accelerator.sh and its helpers: the GPU run must not fail on something a CPU can catch.

The per-op profile summary is checked against a brute-force reference on synthetic
planes, the report against a fabricated stage folder, and the script itself end to end
in --smoke mode (tiny sizes on this CPU): its cheapest stages always, all of them under
the `slow` marker.
"""

import json
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest

from bench import accel_report, profile_summary
from child_env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_FILES = {"accelerator.log", "summary.json", "table.md", "raw.tar.gz", "profile.tar.gz", "profile_ops.json"}


# --------------------------------------------------------------------------- profile_summary


def _event(name, start, duration, **stats):
    return SimpleNamespace(name=name, start_ns=float(start), duration_ns=float(duration), stats=list(stats.items()))


def _plane(name, lines):
    return SimpleNamespace(name=name, lines=[SimpleNamespace(name=n, events=evs) for n, evs in lines.items()])


def test_busy_time_is_the_union_of_the_intervals():
    rng = np.random.default_rng(0)
    for _ in range(50):
        starts = rng.integers(0, 200, size=rng.integers(1, 12))
        lengths = rng.integers(0, 40, size=starts.size)
        grid = np.zeros(300, bool)  # brute force: mark every covered unit
        for s, d in zip(starts, lengths):
            grid[s:s + d] = True
        got = profile_summary._busy_ns([(float(s), float(s + d)) for s, d in zip(starts, lengths)])
        assert got == grid.sum()


def test_device_plane_counts_stream_events_once_and_groups_them():
    stream = [
        _event("sm90_conv_kernel", 0, 30, hlo_op="custom-call.3"),
        _event("sm90_conv_kernel", 40, 30, hlo_op="custom-call.7"),
        _event("loop_fusion_kernel", 60, 20, hlo_op="fusion.12"),  # overlaps the previous one
        _event("MemcpyD2D", 100, 10),  # no hlo_op: counted under its own name
    ]
    derived = [_event("custom-call.3", 0, 30), _event("fusion.12", 60, 20)]  # the profiler's "XLA Ops"
    plane = _plane("/device:GPU:0", {"Stream #13(compute)": stream, "XLA Ops": derived})
    s = profile_summary.summarize_plane(plane, steps=2)
    assert s["events"] == 4
    assert s["event_ms"] == pytest.approx(90 / 1e6 / 2)
    assert s["span_ms"] == pytest.approx(110 / 1e6 / 2)
    assert s["busy_ms"] == pytest.approx(80 / 1e6 / 2)  # [0,30) + [40,80) + [100,110)
    assert s["busy_fraction"] == pytest.approx(80 / 110)
    ops = {r["name"]: r for r in s["ops"]}
    assert set(ops) == {"custom-call.3", "custom-call.7", "fusion.12", "MemcpyD2D"}
    kinds = {r["name"]: r for r in s["kinds"]}
    assert kinds["custom-call"]["ms"] == pytest.approx(60 / 1e6 / 2)
    assert kinds["custom-call"]["count"] == 1.0 and kinds["custom-call"]["share"] == pytest.approx(60 / 90)
    assert {r["name"]: r["ms"] for r in s["kernels"]}["sm90_conv_kernel"] == pytest.approx(60 / 1e6 / 2)


def test_host_plane_keeps_only_xla_events_and_empty_planes_give_none():
    plane = _plane("/host:CPU", {"python": [_event("$profiler.py:1 trace", 0, 500)],
                                 "tf_XLAEigen": [_event("ynn_fusion", 10, 5, hlo_op="ynn_fusion")]})
    s = profile_summary.summarize_plane(plane)
    assert [r["name"] for r in s["ops"]] == ["ynn_fusion"] and "kernels" not in s
    assert profile_summary.summarize_plane(_plane("/host:CPU", {"python": []})) is None


def test_profile_summary_reads_a_real_jax_trace(tmp_path):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            f(x).block_until_ready()
    summary = profile_summary.summarize(str(tmp_path), steps=2)
    assert summary["files"] and summary["planes"]
    assert all(p["event_ms"] > 0 and 0 < p["busy_fraction"] <= 1 for p in summary["planes"])
    with pytest.raises(FileNotFoundError, match="xplane"):
        profile_summary.summarize(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- accel_report


def _step_json(mode, crops, batch, step_ms, img_s, **extra):
    return {"mode": mode, "crops": crops, "per_device_batch": batch, "step_ms": step_ms, "img_per_s": img_s,
            "dtype": "bfloat16", **extra}


def _fake_work(tmp_path):
    work = tmp_path / "work"
    (work / "profile" / "plugins").mkdir(parents=True)
    stages = [
        ("jax_main_lo", "ok", 0, 70, 180),
        ("torch_main", "ok", 0, 30, 100),
        ("sinkhorn", "ok", 0, 9, 60),
        ("e2e", "timeout", 124, 150, 150),
        ("jax_2crops", "skipped", 0, 0, 20),
    ]
    with open(work / "stages.tsv", "w") as f:
        for name, status, rc, sec, limit in stages:
            f.write(f"{name}\t{status}\t{rc}\t{sec}\t{limit}\tpython bench/x.py --a b\n")
    (work / "jax_main_lo.json").write_text(json.dumps({"info": {"device": "1 x gpu: NVIDIA H200"}, "rows": [
        _step_json("synthetic", "2x224+6x96", 64, 50.0, 1280.0, mfu=0.1, peak_gb=12.5, compile_s=61.0)]}))
    (work / "torch_main.json").write_text(json.dumps({"info": {"device": "1 x cuda: NVIDIA H200"}, "rows": [
        {**_step_json("synthetic", "2x224+6x96", 64, 80.0, 800.0), "dtype": "float16"},
        {"mode": "synthetic", "crops": "2x224+6x96", "per_device_batch": 128, "note": "failed: out of memory"}]}))
    (work / "sinkhorn.json").write_text(json.dumps({"info": {}, "rows": [
        {"implementation": "jax", "ms": 0.15}, {"implementation": "numpy", "ms": 70.0}]}))
    (work / "e2e.json").write_text("{\"info\": ")  # killed while writing
    (work / "jax_main_lo.log").write_text("log\n")
    (work / "profile" / "plugins" / "host.xplane.pb").write_bytes(os.urandom(2000))
    (work / "profile" / "train_step_x.hlo.txt").write_bytes(os.urandom(3000))
    (work / "profile_ops.json").write_text(json.dumps({"planes": []}))
    return work


def _report(work, out, *extra):
    return subprocess.run([sys.executable, "bench/accel_report.py", str(work), str(out), "--budget", "450",
                           "--main-crops", "2x224+6x96", *extra], cwd=ROOT, capture_output=True, text=True, check=True)


def test_report_collects_every_stage_into_six_files_and_states_the_targets(tmp_path):
    work, out = _fake_work(tmp_path), tmp_path / "out"
    printed = _report(work, out, "--print").stdout
    assert set(os.listdir(out)) == OUT_FILES - {"accelerator.log"}  # the log is the script's own
    summary = json.loads((out / "summary.json").read_text())
    assert summary["info"]["device"] == "1 x gpu: NVIDIA H200"
    assert [s["status"] for s in summary["stages"]] == ["ok", "ok", "ok", "timeout", "skipped"]
    assert "unreadable JSON" in summary["stages"][3]["result"]["error"]
    rows = {(r["stage"], r.get("run"), r.get("per_device_batch")): r for r in summary["table"]}
    assert rows[("jax_main_lo", "jax bfloat16", 64)]["mfu_percent"] == pytest.approx(10.0)
    assert rows[("torch_main", "torch float16", 64)]["img_per_s"] == 800.0
    assert "timed out at 150 s" in rows[("e2e", None, None)]["note"]
    assert "skipped" in rows[("jax_2crops", None, None)]["note"]
    assert summary["targets"][0] == ("JAX 2x224+6x96 batch 64: 1280 img/s (target >= 1000), peak 12.50 GB "
                                     "(target < 16 at batch 64); JAX / PyTorch torch float16 = 1.60 (target >= 1.3)")
    assert summary["targets"][1] == "Sinkhorn jax: 0.150 ms (target <= 0.2)"
    assert "| jax_main_lo | jax bfloat16 | 2x224+6x96 | 64 | 50.000 | 1280.0 | 10.0 | 12.50 | 61 |  |" in printed
    assert printed == (out / "table.md").read_text()
    with tarfile.open(out / "raw.tar.gz") as tar:
        assert {"stages.tsv", "jax_main_lo.json", "jax_main_lo.log", "profile_ops.json"} <= set(tar.getnames())
    with tarfile.open(out / "profile.tar.gz") as tar:
        assert {"profile/plugins/host.xplane.pb", "profile/train_step_x.hlo.txt"} <= set(tar.getnames())


def test_profile_pack_leaves_out_the_largest_parts_to_fit(tmp_path, monkeypatch):
    work, out = _fake_work(tmp_path), tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(accel_report, "PROFILE_LIMIT", 2500)  # the random HLO bytes do not compress
    note = accel_report.pack_profile(str(work), str(out))
    assert "xplane.pb trace only" in note
    with tarfile.open(out / "profile.tar.gz") as tar:
        assert tar.getnames() == ["profile/plugins/host.xplane.pb"]
    assert accel_report.pack_profile(str(work), str(out)) == note  # unchanged: not packed again
    monkeypatch.setattr(accel_report, "PROFILE_LIMIT", 100)
    (work / "profile" / "plugins" / "host.xplane.pb").write_bytes(os.urandom(2000))
    assert "left out" in accel_report.pack_profile(str(work), str(out))
    assert not (out / "profile.tar.gz").exists()


# --------------------------------------------------------------------------- accelerator.sh --smoke


def _smoke(out, *extra):
    env = child_env(PYTHON=sys.executable)  # one device, as the GPU run
    return subprocess.run(["nice", "-n", "10", "bash", "bench/accelerator.sh", str(out), "--smoke", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)


def test_accelerator_script_rejects_bad_arguments(tmp_path):
    for args in ([], [str(tmp_path), "--only", "nosuchstage"], [str(tmp_path), "--budget", "8m"],
                 [str(tmp_path), "--bogus"]):
        proc = subprocess.run(["bash", "bench/accelerator.sh", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip(), args


def test_accelerator_smoke_cheapest_stage(tmp_path):
    proc = _smoke(tmp_path, "--only", "sinkhorn")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert set(os.listdir(tmp_path)) == {"accelerator.log", "summary.json", "table.md", "raw.tar.gz"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["info"]["smoke"] and [s["name"] for s in summary["stages"]] == ["sinkhorn"]
    impls = [r["run"] for r in summary["table"]]
    assert impls[0] == "jax" and "numpy" in impls and all(r["ms"] > 0 for r in summary["table"])
    assert "SMOKE RUN" in proc.stdout and "| sinkhorn | jax |" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SWAV_JAX_REHEARSE_ACCELERATOR"),
    reason="the whole accelerator rehearsal (about 7 minutes on 2 cores) runs before a GPU run: "
    "SWAV_JAX_REHEARSE_ACCELERATOR=1 python -m pytest tests/test_bench_accelerator.py",
)
def test_accelerator_smoke_every_stage(tmp_path):
    pytest.importorskip("torch")
    proc = _smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert set(os.listdir(tmp_path)) == OUT_FILES
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["jax_main_lo", "jax_main_hi", "torch_main", "sinkhorn", "profile", "profile_ops", "e2e",
                            "pipeline", "torch_more", "jax_2crops", "jax_midcrops", "torch_bf16"]
    assert all(s["status"] == "ok" for s in stages.values())
    rows = summary["table"]
    assert not [r for r in rows if r.get("note", "").startswith(("failed", "timed out", "no results"))]
    steps = [r for r in rows if r["stage"].startswith(("jax", "torch")) and r.get("img_per_s")]
    assert len(steps) == 10 and all(r["ms"] > 0 for r in steps)
    assert {r["run"] for r in rows if r["stage"] == "e2e"} == {"jax bfloat16", "host", "e2e"}
    assert json.loads((tmp_path / "profile_ops.json").read_text())["planes"][0]["ops"]
    with tarfile.open(tmp_path / "profile.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith(".xplane.pb") for n in names) and any(n.endswith(".hlo.txt") for n in names)
