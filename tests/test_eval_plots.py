"""metrics.jsonl -> PNGs, robust to missing keys, junk and truncated lines."""

import json
import os

import pytest

from swav_jax.eval.plots import plot_metrics, read_metrics


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines))


def test_writes_non_empty_pngs(tmp_path):
    lines = []
    for step in range(0, 200, 10):
        record = {"step": step, "train/loss": 8.0 - step / 100, "train/lr": 0.1 * step / 200}
        if step % 20 == 0:
            record["train/empty_prototypes"] = 3
            record["train/assignment_entropy"] = 4.5
            record["train/images_per_sec"] = 1000.0
        lines.append(json.dumps(record))
    lines.insert(3, "not json at all")
    lines.insert(5, "")
    lines.append(
        json.dumps({"step": 100, "eval/knn_top1": 91.0, "eval/knn_top1_random_init": 80.0})
    )
    lines.append(
        json.dumps({"step": 190, "eval/linear_top1": 95.0, "eval/note": "text is skipped"})
    )
    lines.append('{"step": 200, "train/loss": 1.')  # the run died mid-write
    _write(tmp_path / "metrics.jsonl", lines)

    paths = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")
    names = [os.path.basename(p) for p in paths]
    assert names == ["loss.png", "lr.png", "prototypes.png", "throughput.png", "eval.png"]
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_missing_keys_skip_figures_and_resumed_steps_keep_the_last_value(tmp_path):
    _write(
        tmp_path / "metrics.jsonl",
        [
            json.dumps({"step": 0, "train/loss": 8.0}),
            json.dumps({"step": 10, "train/loss": 7.0}),
            json.dumps({"step": 10, "train/loss": 6.5, "train/lr": float("nan")}),  # resumed run
            json.dumps({"train/loss": 1.0}),  # no step
            json.dumps([1, 2]),
        ],
    )
    assert read_metrics(tmp_path / "metrics.jsonl") == {"train/loss": ([0, 10], [8.0, 6.5])}
    paths = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "out")
    assert [os.path.basename(p) for p in paths] == ["loss.png"]


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="metrics_jsonl_path"):
        plot_metrics(tmp_path / "nope.jsonl", tmp_path)


def test_random_init_baseline_is_a_level_line(tmp_path):
    from matplotlib.figure import Figure

    from swav_jax.eval.plots import _draw

    series = {
        "eval/knn_top1": ([100, 200], [70.0, 90.0]),
        "eval/knn_top1_random_init": ([200], [80.0]),
    }
    ax = Figure().subplots()
    _draw(ax, series, list(series))
    curve, baseline = ax.lines
    assert list(curve.get_ydata()) == [70.0, 90.0]
    # Spans the whole x range (axes coordinates 0..1) at the baseline's value.
    assert list(baseline.get_xdata()) == [0, 1] and list(baseline.get_ydata()) == [80.0, 80.0]
    assert baseline.get_linestyle() == "--"
