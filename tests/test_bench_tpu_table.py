"""bench/tpu_table.py's bookkeeping (no compile: the `plan` subprocess is replaced): which
plans it reuses from --out, which it runs again, and the rows it writes."""

import json
import subprocess

from bench import tpu_table


def _fake_plan(monkeypatch, outcomes: list):
    """Each call to subprocess.run takes the next outcome: a dict is the plan's JSON
    (exit 0), a string is a failure with that stderr (exit 1, no JSON)."""
    calls = []

    def run(cmd, **kwargs):
        outcome = outcomes[len(calls)]
        calls.append(cmd)
        out = cmd[cmd.index("--json") + 1]
        if isinstance(outcome, dict):
            with open(out, "w") as f:
                json.dump(outcome, f)
            return subprocess.CompletedProcess(cmd, 0, stdout="planned\n", stderr="")
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=f"some log line\n{outcome}\n")

    monkeypatch.setattr(tpu_table.subprocess, "run", run)
    return calls


PLAN = {"fits": True, "per_chip_batch": 64, "hbm_per_chip_gib": 7.27, "usable_hbm_gib": 95.74,
        "xla_tflop_per_chip_step": 4.734, "images_per_sec_est": 128112.0, "steps_per_epoch": 312,
        "step_time_s_est": 0.032, "chips": 64}


def test_a_failed_plan_is_run_again_and_a_good_one_reused(monkeypatch, tmp_path):
    out = str(tmp_path / "swav_100ep__v5p-128.json")
    calls = _fake_plan(monkeypatch, ["error: libtpu lockfile held by another process", PLAN])

    first = tpu_table.run_plan("swav_100ep", "v5p:4x4x4", out)
    assert first["error"] == "error: libtpu lockfile held by another process"
    assert tpu_table.row("swav_100ep", 100, "v5p-128", first).startswith(
        "| swav_100ep | v5p-128 | - | does not run: libtpu lockfile")

    second = tpu_table.run_plan("swav_100ep", "v5p:4x4x4", out)  # the error is not kept
    assert second["fits"] and len(calls) == 2
    third = tpu_table.run_plan("swav_100ep", "v5p:4x4x4", out)  # the plan is
    assert third == second and len(calls) == 2
    assert (tmp_path / "swav_100ep__v5p-128.txt").read_text() == "planned\n"


def test_row_hours_scale_with_the_recipes_epochs():
    line = tpu_table.row("swav_800ep", 800, "v5p-128", PLAN)
    cells = [c.strip() for c in line.strip("|").split("|")]
    hours = 800 * 312 * 0.032 / 3600
    assert cells[:6] == ["swav_800ep", "v5p-128", "64", "yes", "7.3 / 95.7", "4.73"]
    assert cells[6] == "128,112"
    assert cells[7] == f"{hours:,.1f} ({hours * 64:,.0f})"
    assert "**no**" in tpu_table.row("w5", 800, "v5e-64", {**PLAN, "fits": False})


def test_documented_rows_keep_planned_rows_only():
    text = "\n".join([
        "intro", tpu_table.BEGIN,
        "| recipe | slice | images per chip | fits | HBM GiB per chip (of usable) | x | y | z |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        tpu_table.row("swav_800ep", 800, "v5p-128", PLAN),
        tpu_table.row("swav_800ep", 800, "v5e-64", None),
        tpu_table.END, "outro",
    ])
    kept = tpu_table.documented_rows(text)
    assert list(kept) == [("swav_800ep", "v5p-128")]
