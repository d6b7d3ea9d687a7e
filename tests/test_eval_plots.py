"""metrics.jsonl -> PNGs, robust to missing keys, junk and truncated lines; labelled axes,
ln K lines, baselines as levels in their curve's colour, legends outside the data."""

import json
import math
import os

import pytest
from matplotlib.figure import Figure

from swav_jax.eval.plots import (
    RunInfo,
    draw_empty,
    draw_entropy,
    draw_eval,
    draw_loss,
    eval_label,
    plot_metrics,
    read_metrics,
    run_info,
)


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
    assert names == ["loss.png", "lr.png", "prototypes.png", "throughput.png", "eval.png", "summary.png"]
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
    assert [os.path.basename(p) for p in paths] == ["loss.png", "summary.png"]


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="metrics_jsonl_path"):
        plot_metrics(tmp_path / "nope.jsonl", tmp_path)


def _axes(draw, series, info=RunInfo(), *args):
    fig = Figure(layout="constrained")
    ax = fig.subplots()
    draw(ax, series, info, *args)
    fig.canvas.draw()  # lays out the legend
    return ax


def test_baselines_are_levels_in_the_colour_of_their_curve():
    series = {
        "eval/knn_top1": ([100, 200], [70.0, 90.0]),
        "eval/knn_top1_random_init": ([200], [80.0]),
        "eval/knn_top1_raw_pixels": ([200], [60.0]),
        "eval/linear_top1": ([200], [95.0]),
    }
    ax = _axes(draw_eval, series, RunInfo(knn_k=20), list(series), "top-1 accuracy (%)")
    curve, linear, random_init, raw_pixels = ax.lines
    assert list(curve.get_ydata()) == [70.0, 90.0] and list(linear.get_ydata()) == [95.0]
    for line, level, style in ((random_init, 80.0, "--"), (raw_pixels, 60.0, ":")):
        # Spans the whole x range (axes coordinates 0..1) at the baseline's value.
        assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [level, level]
        assert line.get_linestyle() == style and line.get_color() == curve.get_color()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "kNN top-1 (k = 20): 90.0% at step 200",
        "linear probe top-1: 95.0% at step 200",
        "kNN top-1 (k = 20), random init: 80.0%",
        "kNN top-1 (k = 20), raw pixels: 60.0%",
    ]
    assert ax.get_ylabel() == "top-1 accuracy (%)" and ax.get_xlabel() == "step"


def test_ln_k_lines_k_in_titles_units_and_the_legend_beside_the_data():
    series = {
        "train/loss": ([10, 20, 30], [4.3, 4.0, 3.1]),
        "train/assignment_entropy": ([10, 20, 30], [4.1, 4.0, 3.9]),
        "train/epoch": ([10, 20, 30], [1.0, 2.0, 3.0]),
    }
    info = RunInfo(method="SwAV", num_clusters=64, batch_size=128)
    loss = _axes(draw_loss, series, info)
    _, ln_k = loss.lines
    assert ln_k.get_ydata()[0] == pytest.approx(math.log(64))
    assert loss.get_ylabel() == "loss (nats)"
    legend, axes = loss.get_legend().get_window_extent(), loss.get_window_extent()
    assert legend.x0 >= axes.x1  # outside, to the right: never over the curves
    entropy = _axes(draw_entropy, series, info)
    assert "K = 64" in entropy.get_title() and entropy.get_lines()[1].get_ydata()[0] == pytest.approx(math.log(64))
    assert entropy.get_ylabel() == "entropy (nats)"
    empty = _axes(draw_empty, {"train/empty_prototypes": ([10], [3.0])}, info)
    assert "K = 64" in empty.get_title() and empty.get_ylabel() == "empty prototypes per batch"


def test_eval_labels():
    info = RunInfo(knn_k=20)
    assert eval_label("eval/knn_top5", info) == "kNN top-5 (k = 20)"
    assert eval_label("eval/knn_top1@200", info) == "kNN top-1 (k = 200)"
    assert eval_label("eval/linear_top1", info) == "linear probe top-1"
    assert eval_label("eval/linear_top1_best", info) == "linear probe top-1 best"


def test_run_info_from_a_saved_config():
    import ml_collections

    import tiny_config
    from swav_jax.train import run_config

    saved = run_config.to_dict(tiny_config.get_config())  # as config.json holds it
    info = run_info(ml_collections.ConfigDict(saved))
    assert info == RunInfo(method="SwAV", num_clusters=12, batch_size=16, knn_k=20)
    assert info.describe() == "SwAV, K = 12, batch 16"
