"""PNG plots of a run's metrics.jsonl, drawn to go into a paper draft: the loss against
ln K, the learning rate, prototype usage, ExCB's cluster balance, throughput, the
evaluations against their random-init and raw-pixel levels, and a one-page summary.

metrics.jsonl holds one JSON object per line, each with an integer 'step' and metric keys
such as 'train/loss', 'train/lr', 'train/empty_prototypes', 'train/assignment_entropy',
'train/min_relative_size' (ExCB), 'train/images_per_sec', 'train/epoch',
'eval/knn_top1', 'eval/linear_top1'. Reading is forgiving: blank, truncated or non-JSON
lines (a run killed mid-write), lines without a numeric 'step', and non-numeric or
non-finite values (NaN, inf) are skipped. A step logged twice (a run resumed from an
earlier checkpoint) keeps its last value. A figure is written only when at least one of
its keys is present. Evaluation keys ending in '_random_init' or '_raw_pixels' are
baselines measured once: drawn as levels beside the curve they belong to.

`RunInfo` (from the run's config.json, when there is one) adds what metrics.jsonl does
not hold: K for the ln K lines and the titles, the method, the batch, kNN's k. Figures
are drawn with matplotlib's Agg canvas without pyplot (no display, no global state).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

from matplotlib.figure import Figure

Series = dict[str, tuple[list[int], list[float]]]

BASELINE_SUFFIXES = {"_random_init": ("random init", "--"), "_raw_pixels": ("raw pixels", ":")}


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the plots say about the run beyond its metrics (all optional)."""

    method: str = ""
    num_clusters: int = 0  # K: prototypes (SwAV) or clusters (ExCB)
    batch_size: int = 0
    knn_k: int = 0  # the k of the plain 'eval/knn_top1' key

    def describe(self) -> str:
        parts = [self.method or ""]
        if self.num_clusters:
            parts.append(f"K = {self.num_clusters:,}")
        if self.batch_size:
            parts.append(f"batch {self.batch_size:,}")
        return ", ".join(p for p in parts if p)


_METHOD_NAMES = {"swav": "SwAV", "excb": "ExCB", "deepclusterv2": "DeepCluster-v2"}


def run_info(config) -> RunInfo:
    """RunInfo of a run's resolved config (an ml_collections.ConfigDict, e.g. of config.json)."""
    from swav_jax.methods import get_method

    return RunInfo(
        method=_METHOD_NAMES.get(config.method, config.method),
        num_clusters=int(get_method(config.method).num_clusters(config)),
        batch_size=int(config.batch_size),
        knn_k=int(config.eval.knn_k[0]),
    )


def read_metrics(path: str | os.PathLike) -> Series:
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
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
                continue
            for key, value in record.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value):
                    continue
                series.setdefault(key, {})[int(step)] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in series.items()}


# ---- labels -----------------------------------------------------------------------------


def _split_baseline(key: str) -> tuple[str, str | None]:
    """'eval/knn_top1_random_init' -> ('eval/knn_top1', '_random_init'); others (key, None)."""
    for suffix in BASELINE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, None


def eval_label(key: str, info: RunInfo) -> str:
    """'eval/knn_top1@200' -> 'kNN top-1 (k = 200)'; unknown keys keep their name."""
    name = key.removeprefix("eval/")
    k = None
    if "@" in name:
        name, k = name.split("@", 1)
    elif name.startswith("knn_") and info.knn_k:
        k = str(info.knn_k)
    words = {"knn": "kNN", "linear": "linear probe", "finetune": "fine-tuned"}
    head, _, rest = name.partition("_")
    label = f"{words.get(head, head)} {rest.replace('top1', 'top-1').replace('top5', 'top-5').replace('_', ' ')}"
    return label.strip() + (f" (k = {k})" if k else "")


# ---- drawing ------------------------------------------------------------------------------


def _step_axis(ax, series: Series) -> None:
    """'step' below, over the whole run (so that panels line up); 'epoch' above when the
    run logged train/epoch."""
    ax.set_xlabel("step")
    ax.set_xlim(0, max(steps[-1] for steps, _ in series.values()) * 1.02)
    ax.grid(alpha=0.3)
    if "train/epoch" in series:
        steps, epochs = series["train/epoch"]
        if steps and steps[-1] > 0 and epochs[-1] > 0:
            per_epoch = steps[-1] / epochs[-1]
            top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
            top.set_xlabel("epoch")


def _legend(ax) -> None:
    # Outside the axes, on the right: a legend never covers data.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", frameon=False)


def _curve(ax, series: Series, key: str, label: str, color: str) -> None:
    steps, values = series[key]
    ax.plot(steps, values, color=color, marker="o" if len(steps) < 30 else None, markersize=3, label=label)


def _log_k_line(ax, info: RunInfo, what: str) -> None:
    if info.num_clusters > 1:
        value = math.log(info.num_clusters)
        ax.axhline(value, color="0.4", linestyle="--", linewidth=1, label=f"ln K = {value:.2f} ({what})")
        # Keep the line clear of the top edge when the curves stay below it.
        low, high = ax.get_ylim()
        top = value + 0.05 * (value - low)
        if top > high:
            ax.set_ylim(low, top)


def draw_loss(ax, series: Series, info: RunInfo) -> None:
    _curve(ax, series, "train/loss", "training loss", "C0")
    _log_k_line(ax, info, "uniform prediction")
    ax.set_ylabel("loss (nats)")
    ax.set_title("Training loss")
    _step_axis(ax, series)
    _legend(ax)


def draw_lr(ax, series: Series, info: RunInfo) -> None:
    del info
    _curve(ax, series, "train/lr", "learning rate", "C0")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule")
    _step_axis(ax, series)
    _legend(ax)


def draw_entropy(ax, series: Series, info: RunInfo) -> None:
    _curve(ax, series, "train/assignment_entropy", "entropy of the batch's assignments", "C0")
    ax.set_ylim(bottom=0)  # before the ln K line, which leaves room above itself
    _log_k_line(ax, info, "every prototype used equally")
    ax.set_ylabel("entropy (nats)")
    ax.set_title("Prototype usage" + (f", K = {info.num_clusters:,}" if info.num_clusters else ""))
    _step_axis(ax, series)
    _legend(ax)


def draw_empty(ax, series: Series, info: RunInfo, key: str = "train/empty_prototypes") -> None:
    noun = "prototypes" if "prototypes" in key else "clusters"
    _curve(ax, series, key, f"{noun} no sample of the batch picks", "C3")
    of_k = f" (of K = {info.num_clusters:,})" if info.num_clusters else ""
    ax.set_ylabel(f"empty {noun} per batch")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Empty {noun}{of_k}")
    _step_axis(ax, series)
    _legend(ax)


def draw_cluster_sizes(ax, series: Series, info: RunInfo) -> None:
    for key, label, color in (
        ("train/max_relative_size", "largest cluster", "C1"),
        ("train/min_relative_size", "smallest cluster", "C0"),
    ):
        if key in series:
            _curve(ax, series, key, label, color)
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="average size")
    ax.set_yscale("log")
    ax.set_ylabel("tracked size / average size")
    ax.set_title("Cluster balance" + (f", K = {info.num_clusters:,}" if info.num_clusters else ""))
    _step_axis(ax, series)
    _legend(ax)


def draw_teacher(ax, series: Series, info: RunInfo) -> None:
    for key, label, color in (
        ("train/teacher_confidence", "teacher confidence (mean max probability)", "C2"),
        ("train/view_agreement", "view agreement (same cluster in both views)", "C4"),
    ):
        if key in series:
            _curve(ax, series, key, label, color)
    if info.num_clusters:
        ax.axhline(1.0 / info.num_clusters, color="0.4", linestyle="--", linewidth=1, label="1 / K (chance)")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction")
    ax.set_title("Teacher targets")
    _step_axis(ax, series)
    _legend(ax)


def draw_throughput(ax, series: Series, info: RunInfo) -> None:
    del info
    steps, values = series["train/images_per_sec"]
    ax.plot(steps, values, color="C0", label="training")
    ax.set_ylabel("images / s (training only)")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput (compilation and evaluations excluded)")
    _step_axis(ax, series)
    _legend(ax)


def draw_eval(ax, series: Series, info: RunInfo, keys: Sequence[str], ylabel: str) -> None:
    """Curves of `keys`, each baseline as a level in the colour of its curve."""
    curves = [k for k in keys if _split_baseline(k)[1] is None]
    colors = {k: f"C{i}" for i, k in enumerate(curves)}
    for key in curves:
        steps, values = series[key]
        ax.plot(steps, values, color=colors[key], marker="o", markersize=4,
                label=f"{eval_label(key, info)}: {values[-1]:.1f}% at step {steps[-1]:,}")
    for key in keys:
        base, suffix = _split_baseline(key)
        if suffix is None:
            continue
        what, style = BASELINE_SUFFIXES[suffix]
        color = colors.get(base, f"C{len(colors) + list(BASELINE_SUFFIXES).index(suffix)}")
        value = series[key][1][-1]
        ax.axhline(value, color=color, linestyle=style, linewidth=1.2,
                   label=f"{eval_label(base, info)}, {what}: {value:.1f}%")
    ax.set_ylabel(ylabel)
    ax.set_title("Frozen-feature evaluation")
    _step_axis(ax, series)
    _legend(ax)


# ---- figures -------------------------------------------------------------------------------


def _eval_panels(series: Series) -> list[tuple[list[str], str]]:
    keys = sorted(k for k in series if k.startswith("eval/"))
    panels = [
        ([k for k in keys if "top1" in k], "top-1 accuracy (%)"),
        ([k for k in keys if "top5" in k], "top-5 accuracy (%)"),
        ([k for k in keys if "top1" not in k and "top5" not in k], "value"),
    ]
    return [(ks, label) for ks, label in panels if ks]


def _figures(series: Series) -> dict[str, list]:
    """File name -> panels (each a function of an axes), only those with data."""
    has = series.__contains__
    figures = {
        "loss.png": [draw_loss] if has("train/loss") else [],
        "lr.png": [draw_lr] if has("train/lr") else [],
        "prototypes.png": ([draw_empty] if has("train/empty_prototypes") else [])
        + ([draw_entropy] if has("train/assignment_entropy") else []),
        "clusters.png": (
            [draw_cluster_sizes] if has("train/min_relative_size") or has("train/max_relative_size") else []
        )
        + ([lambda ax, s, i: draw_empty(ax, s, i, "train/empty_clusters")] if has("train/empty_clusters") else [])
        + ([draw_teacher] if has("train/teacher_confidence") or has("train/view_agreement") else []),
        "throughput.png": [draw_throughput] if has("train/images_per_sec") else [],
        "eval.png": [
            (lambda ax, s, i, ks=ks, label=label: draw_eval(ax, s, i, ks, label)) for ks, label in _eval_panels(series)
        ],
    }
    return {name: panels for name, panels in figures.items() if panels}


def _summary_panels(series: Series) -> list:
    has = series.__contains__
    panels = []
    if has("train/loss"):
        panels.append(draw_loss)
    top1 = [p for p in _eval_panels(series) if p[1].startswith("top-1")]
    if top1:
        panels.append(lambda ax, s, i, ks=top1[0][0]: draw_eval(ax, s, i, ks, "top-1 accuracy (%)"))
    if has("train/assignment_entropy"):
        panels.append(draw_entropy)
    if has("train/min_relative_size") or has("train/max_relative_size"):
        panels.append(draw_cluster_sizes)
    elif has("train/empty_prototypes"):
        panels.append(draw_empty)
    if has("train/lr"):
        panels.append(draw_lr)
    if has("train/images_per_sec"):
        panels.append(draw_throughput)
    return panels


def _save(panels: list, series: Series, info: RunInfo, path: str, columns: int = 1) -> None:
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(7.5 * columns, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, draw in zip(axes, panels):
        draw(ax, series, info)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if info.describe():
        fig.suptitle(info.describe())
    fig.savefig(path, dpi=110)


def plot_metrics(
    metrics_jsonl_path: str | os.PathLike, out_dir: str | os.PathLike, info: RunInfo = RunInfo()
) -> list[str]:
    """Writes PNGs of the metrics in `metrics_jsonl_path` into `out_dir` (created).

    Returns:
      The paths written, in the order loss, lr, prototypes, clusters, throughput, eval,
      summary; figures with none of their keys in the file are skipped.
    """
    if not os.path.isfile(metrics_jsonl_path):
        raise ValueError(f"metrics_jsonl_path {str(metrics_jsonl_path)!r} is not a file")
    series = read_metrics(metrics_jsonl_path)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, panels in _figures(series).items():
        path = os.path.join(out_dir, name)
        _save(panels, series, info, path)
        written.append(path)
    summary = _summary_panels(series)
    if summary:
        path = os.path.join(out_dir, "summary.png")
        _save(summary, series, info, path, columns=2)
        written.append(path)
    return written
