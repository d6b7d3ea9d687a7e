"""Compares groups of training runs ("arms", e.g. with and without small crops) from their
metrics.jsonl: final kNN per seed against the baselines, and the training loss.

    python bench/plot_arms.py --out arms.png \\
        --arm "2x32 + 4x16=/runs/mc_s0,/runs/mc_s1,/runs/mc_s2" \\
        --arm "2x32=/runs/g_s0,/runs/g_s1,/runs/g_s2"

Left: eval/knn_top1 of every run (dots) and each arm's mean (line), with each run's
eval/knn_top1_random_init (crosses) and the mean of eval/knn_top1_raw_pixels (dashed
line). Right: train/loss against the step, one line per run, coloured by arm. Also
prints a markdown table (arm: per-seed values, mean, min-max, top-5 beside the raw
pixels' top-5).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swav_jax.eval.plots import read_metrics  # noqa: E402


def _last(series, key):
    return series[key][1][-1] if key in series else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", action="append", required=True, help="LABEL=DIR,DIR,...")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    arms = []
    for spec in args.arm:
        label, _, dirs = spec.rpartition("=")
        runs = [read_metrics(os.path.join(d, "metrics.jsonl")) for d in dirs.split(",")]
        arms.append((label, runs))

    fig = Figure(figsize=(12, 4.8))
    ax, lax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    raw = []
    print("| arm | learned 20-NN per seed | mean | random init per seed | top-5: learned per seed; raw pixels | final loss per seed |")
    print("|---|---|---|---|---|---|")
    shown = []
    for i, (label, runs) in enumerate(arms):
        learned = np.array([_last(r, "eval/knn_top1") for r in runs])
        random_init = np.array([_last(r, "eval/knn_top1_random_init") for r in runs])
        raw += [_last(r, "eval/knn_top1_raw_pixels") for r in runs]
        shown += [*learned, *random_init]
        top5 = [_last(r, "eval/knn_top5") for r in runs]
        x = i + np.linspace(-0.12, 0.12, len(runs))
        # A line, not a bar: the axis does not start at 0, and a bar's height would mislead.
        ax.hlines(learned.mean(), i - 0.25, i + 0.25, color=f"C{i}", linewidth=3, alpha=0.5,
                  label="learned, mean of the seeds" if i == 0 else None)
        # One legend entry per marker kind: the arms are named on the x axis.
        ax.plot(x, learned, "o", color=f"C{i}", label="learned, each seed" if i == 0 else None)
        ax.plot(x, random_init, "x", color=f"C{i}", label="random init" if i == 0 else None)
        for r in runs:
            steps, loss = r["train/loss"]
            lax.plot(steps, loss, color=f"C{i}", alpha=0.8, linewidth=1,
                     label=label if r is runs[0] else None)
        losses = [_last(r, "train/loss") for r in runs]
        print(f"| {label} | {' / '.join(f'{v:.1f}' for v in learned)} | {learned.mean():.1f} "
              f"({learned.min():.1f}-{learned.max():.1f}) | {' / '.join(f'{v:.1f}' for v in random_init)} | "
              f"{' / '.join(f'{v:.1f}' for v in top5)}; {_last(runs[0], 'eval/knn_top5_raw_pixels'):.1f} | "
              f"{' / '.join(f'{v:.3f}' for v in losses)} |")
    raw = np.array(raw)
    if np.isfinite(raw).any():
        ax.axhline(np.nanmean(raw), color="grey", linestyle="--", linewidth=1,
                   label=f"mean-centred raw pixels ({np.nanmean(raw):.1f})")
    ax.set_xticks(range(len(arms)), [label for label, _ in arms], fontsize="small")
    ax.set_ylabel("weighted 20-NN top-1 on held-out images (%)")
    ax.set_title("kNN after training")
    ax.grid(alpha=0.3, axis="y")
    # Room for the collapsed runs of docs/QUEUE.md and for differences of a few points.
    shown = np.array([v for v in [*shown, *raw] if np.isfinite(v)])
    ax.set_ylim(max(0.0, shown.min() - 8), min(100.0, shown.max() + 8))
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    lax.set_xlabel("step")
    lax.set_ylabel("training loss")
    lax.set_title("Training loss")
    lax.grid(alpha=0.3)
    lax.legend(fontsize="small", loc="center right")
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
