"""PNG plots of a run's metrics.jsonl (loss, LR, prototype usage, ExCB's cluster balance,
throughput, evaluations).

metrics.jsonl holds one JSON object per line, each with an integer 'step' and metric keys
such as 'train/loss', 'train/lr', 'train/empty_prototypes', 'train/assignment_entropy',
'train/min_relative_size' (ExCB), 'train/images_per_sec', 'eval/knn_top1',
'eval/linear_top1'. Reading is forgiving:
blank, truncated or non-JSON lines (a run killed mid-write), lines without a numeric
'step', and non-numeric or non-finite values (NaN, inf) are skipped. A step logged twice
(a run resumed from an earlier checkpoint) keeps its last value. A figure is written only
when at least one of its keys is present. Figures are drawn with matplotlib's Agg canvas
without pyplot, so no display and no global backend change.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

from matplotlib.figure import Figure

# File name -> (title, metric keys, one panel per key?). Keys under 'eval/' are added to
# 'eval.png' whatever their names.
_FIGURES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "loss.png": ("Training loss", ("train/loss",), False),
    "lr.png": ("Learning rate", ("train/lr",), False),
    "prototypes.png": (
        "Prototype usage",
        ("train/empty_prototypes", "train/assignment_entropy"),
        True,
    ),
    "clusters.png": (
        "Cluster balance (ExCB)",
        (
            "train/min_relative_size",
            "train/max_relative_size",
            "train/empty_clusters",
            "train/teacher_confidence",
            "train/view_agreement",
        ),
        True,
    ),
    "throughput.png": ("Throughput", ("train/images_per_sec",), False),
}


RANDOM_INIT_SUFFIX = "_random_init"


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl -> {key: (steps, values)}, steps increasing, one value per step."""
    series: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            step = record.get("step")
            if (
                isinstance(step, bool)
                or not isinstance(step, (int, float))
                or not math.isfinite(step)
            ):
                continue
            for key, value in record.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value):
                    continue
                series.setdefault(key, {})[int(step)] = float(value)
    return {
        key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in series.items()
    }


def _draw(ax, series, keys: Sequence[str]) -> None:
    for i, key in enumerate(keys):
        steps, values = series[key]
        if key.endswith(RANDOM_INIT_SUFFIX):
            # A baseline measured once (at the end): a level to compare the curves with.
            ax.axhline(values[-1], linestyle="--", linewidth=1, color=f"C{i}", label=key)
            continue
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, color=f"C{i}", label=key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_metrics(metrics_jsonl_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Writes PNGs of the metrics in `metrics_jsonl_path` into `out_dir` (created).

    Returns:
      The paths written, in the order loss, lr, prototypes, clusters, throughput, eval; figures
      with none of their keys in the file are skipped.
    """
    if not os.path.isfile(metrics_jsonl_path):
        raise ValueError(f"metrics_jsonl_path {str(metrics_jsonl_path)!r} is not a file")
    series = read_metrics(metrics_jsonl_path)
    figures = dict(_FIGURES)
    eval_keys = tuple(sorted(k for k in series if k.startswith("eval/")))
    figures["eval.png"] = ("Evaluation", eval_keys, False)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (title, keys, panel_per_key) in figures.items():
        keys = [k for k in keys if k in series]
        if not keys:
            continue
        panels = [[k] for k in keys] if panel_per_key else [keys]
        fig = Figure(figsize=(7, 3.2 * len(panels)))
        axes = fig.subplots(len(panels), 1, squeeze=False)
        for ax, panel in zip(axes[:, 0], panels):
            _draw(ax, series, panel)
        axes[0, 0].set_title(title)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
