"""Small-batch side-by-side on the digits: SwAV without queue, SwAV with queue, ExCB.

Same data (the 1,437 training digits, 16 px), backbone (the demo's narrow ResNet-18),
crops (2 x 16 + 4 x 8), batch, number of clusters K (> batch) and number of steps for
the three methods; each keeps its own recipe's head, optimiser and LR (swav_jax/configs/demo.py
for SwAV, swav_jax/configs/excb_demo.py for ExCB). Then, for each trained network (SwAV's model,
ExCB's EMA teacher):
  - weighted kNN top-1 on the test split (swav_jax.eval.run.knn_eval, k = 20);
  - cluster usage: every training image (evaluation transform) assigned to its
    highest-scoring prototype / centroid (raw scores, no Sinkhorn, no balancing).

Writes docs/COMPARISON.md (settings, command, machine, table) and
docs/compare_small_batch_usage.png (training loss; sorted cluster sizes). Training resumes from
--workdir, so a re-run only evaluates.

    python bench/compare_small_batch.py --workdir /tmp/compare --epochs 80
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # swav_jax from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from swav_jax.configs import demo, excb_demo  # noqa: E402
from swav_jax.data import sources  # noqa: E402
from swav_jax.data.augment import normalize  # noqa: E402
from swav_jax.data.eval_batches import eval_batches  # noqa: E402
from swav_jax.eval.run import knn_eval, load_variables, random_init_variables  # noqa: E402
from swav_jax.models import SwAVModel, build_model, normalize_prototypes  # noqa: E402
from swav_jax.models.excb import ExCBModel, build_excb_model  # noqa: E402
from swav_jax.train.loop import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"swav": "SwAV, no queue", "swav_queue": "SwAV + queue", "excb": "ExCB"}


def configs(args) -> dict:
    """The three configs: same data, backbone, crops, batch, K and steps."""
    out = {}
    for name in ("swav", "swav_queue", "excb"):
        c = (excb_demo if name == "excb" else demo).get_config()
        c.batch_size = args.batch
        c.epochs = args.epochs
        c.seed = args.seed
        c.model.num_prototypes = (args.clusters,)
        c.excb.num_clusters = args.clusters
        c.eval.knn_at_end = False  # evaluated below, the same way for all three
        c.eval.knn_random_init = False
        c.eval.knn_every_epochs = 0
        c.log_every_steps = 20
        c.checkpoint_every_steps = 200
        c.collapse_warning_steps = 10**9  # collapse is one of the outcomes compared here
        if name == "swav_queue":
            c.swav.queue_length = args.queue_length
            c.swav.epoch_queue_starts = args.queue_start_epoch
        out[name] = c
    return out


def _swav_scores(model: SwAVModel, variables, images):
    params = normalize_prototypes(variables["params"])
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    features = model.apply(v, images, method=SwAVModel.features)
    _, scores = model.apply(v, features, False, method=SwAVModel.head)
    return scores[0]


def _excb_scores(model: ExCBModel, variables, images):
    return model.apply(variables, [images[None]], False, method=ExCBModel.teacher_similarities)[0]


def cluster_counts(config, variables) -> np.ndarray:
    """[K] number of training images whose highest score is each cluster (eval transform)."""
    if config.method == "excb":
        model, scores, k = build_excb_model(config), _excb_scores, int(config.excb.num_clusters)
    else:
        model, scores, k = build_model(config.model), _swav_scores, int(config.model.num_prototypes[0])
    mean = np.asarray(config.augment.mean, np.float32)
    std = np.asarray(config.augment.std, np.float32)
    assign = jax.jit(lambda v, x: jnp.argmax(scores(model, v, normalize(x, mean, std)), axis=-1))
    counts = np.zeros(k, np.int64)
    source = sources.make_source(config.data, config.data.split)
    for batch in eval_batches(source, size=int(config.crops.size_crops[0]), batch_size=256):
        choice = np.asarray(assign(variables, jnp.asarray(batch["image"])))
        counts += np.bincount(choice[batch["mask"]], minlength=k)
    return counts


def usage_stats(counts: np.ndarray) -> dict:
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "used": int(np.sum(counts > 0)),
        "largest": 100.0 * float(p.max()),
        "perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),  # effective number of clusters
    }


def plot_usage(all_counts: dict, losses: dict, path: str, k: int) -> None:
    """Training loss against ln K (left) and sorted cluster sizes after training (right)."""
    fig = Figure(figsize=(13, 4.2))
    ax = fig.add_subplot(1, 2, 1)
    for name, (steps, values) in losses.items():
        ax.plot(steps, values, label=LABELS[name])
    ax.axhline(np.log(k), color="grey", linestyle="--", linewidth=1, label=f"ln K = {np.log(k):.3f} (uniform)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.legend(loc="upper right")
    ax = fig.add_subplot(1, 2, 2)
    for name, counts in all_counts.items():
        p = np.sort(counts / counts.sum())[::-1]
        ax.plot(np.arange(1, k + 1), np.maximum(p, 1e-5), label=LABELS[name], drawstyle="steps-mid")
    ax.axhline(1.0 / k, color="grey", linestyle="--", linewidth=1, label=f"uniform (1/K = 1/{k})")
    ax.set_yscale("log")
    ax.set_ylim(5e-5, 1.0)
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("fraction of training images")
    ax.set_title(f"Cluster usage after training, K = {k}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return (
        f"{os.cpu_count()} CPU cores ({model}), {jax.devices()[0].platform} backend, "
        f"{jax.device_count()} device(s); Python {platform.python_version()}, jax {jax.__version__}"
    )


def write_report(path, args, cfgs, results, timings, random_knn, load_range, command) -> None:
    c, sw = cfgs["excb"], cfgs["swav"]
    steps = args.epochs * (1437 // args.batch)
    lines = [
        "# Small-batch comparison: SwAV without queue, SwAV with queue, ExCB",
        "",
        "Written by `bench/compare_small_batch.py` (every number below is measured by that run).",
        "",
        f"Data: scikit-learn's digits, 1,437 training / 360 test images upscaled to {c.data.image_size} px. "
        f"Backbone for all three: the demo's ResNet-18 (base width {c.model.base_width}, small stem). "
        f"Crops: {c.crops.num_crops[0]} x {c.crops.size_crops[0]} px + {c.crops.num_crops[1]} x "
        f"{c.crops.size_crops[1]} px. Batch {args.batch}, K = {args.clusters} clusters (K > batch), "
        f"{args.epochs} epochs = {steps} steps each, seed {args.seed}.",
        "",
        f"- **SwAV, no queue**: swav_jax/configs/demo.py (epsilon {sw.swav.epsilon}, LARS lr {sw.optim.base_lr}, "
        f"prototypes frozen {sw.swav.freeze_prototypes_niters} steps): Sinkhorn balances {args.batch} samples "
        f"over {args.clusters} prototypes.",
        f"- **SwAV + queue**: the same with a queue of {args.queue_length} embeddings "
        f"({args.queue_length // args.batch} batches) from epoch {args.queue_start_epoch}.",
        f"- **ExCB**: swav_jax/configs/excb_demo.py (SGD lr {c.optim.base_lr} x batch / 256, momentum "
        f"{c.optim.momentum}, wd {c.optim.weight_decay}, centroid wd {c.excb.centroid_weight_decay} -> "
        f"{c.excb.centroid_weight_decay_end}, centroids initialised by spherical k-means of the "
        f"teacher's projections of the training images, teacher EMA {c.excb.teacher_momentum} -> 1, tracker momentum "
        f"{c.excb.tracker_momentum}, temperatures {c.excb.teacher_temperature} / {c.excb.student_temperature}, "
        f"head {c.excb.hidden_layers} x {c.excb.hidden_dim} -> {c.excb.proj_dim}, predictor BN -> "
        f"{c.excb.hidden_dim} -> {c.excb.proj_dim}; docs/EXCB_DEMO.md says why these settings). The evaluated "
        "network is the EMA teacher.",
        "",
        "kNN: weighted 20-NN (temperature 0.07) on L2-normalised pooled backbone features, train "
        "split as the bank, test split as queries. Cluster usage: each training image (resize + "
        "centre crop) goes to its highest-scoring prototype / centroid, raw scores (no Sinkhorn, "
        "no balancing); perplexity = exp(entropy) of the cluster sizes, the effective number of "
        f"clusters (at most {args.clusters}). In the plot, empty clusters fall off the log axis.",
        "",
        "| method | kNN top-1 (%) | clusters used (of K) | largest cluster (% of images) | perplexity | final loss | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {LABELS[name]} | {r['knn']:.1f} | {r['used']} | {r['largest']:.1f} | {r['perplexity']:.1f} | "
            f"{r['loss']:.3f} | {timings[name]} |"
        )
    ln_k = math.log(args.clusters)
    near = [LABELS[n] for n, r in results.items() if abs(r["loss"] - ln_k) < 0.01 * ln_k]
    below = [LABELS[n] for n, r in results.items() if r["knn"] < random_knn]
    e = results["excb"]["excb"]
    first, last = 0, -1
    lines += [
        f"| random init (same backbone) | {random_knn:.1f} | | | | | |",
        "",
        f"Final loss within 1% of ln K = {ln_k:.3f} (uniform predictions): {', '.join(near) or 'none'}. "
        f"kNN below the randomly initialised backbone: {', '.join(below) or 'none'}.",
        "",
        "ExCB's monitoring (train/* in its metrics.jsonl, first and last logged step): teacher "
        f"confidence {e['train/teacher_confidence'][first]:.3f} -> {e['train/teacher_confidence'][last]:.3f}, "
        f"agreement of the two global views' teacher argmax {e['train/view_agreement'][first]:.3f} -> "
        f"{e['train/view_agreement'][last]:.3f}, tracked relative cluster sizes "
        f"{e['train/min_relative_size'][last]:.2f} (min) to {e['train/max_relative_size'][last]:.2f} (max) "
        "at the end.",
        "",
        "![cluster usage](compare_small_batch_usage.png)",
        "",
        "Command (from the repository root):",
        "",
        f"    {command}",
        "",
        f"Machine: {machine()}; shared with other jobs (1-minute load average {load_range} at the "
        "start and end of the training runs). "
        "Train time is wall-clock for the training program including compilation; it depends on "
        "the load.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clusters", type=int, default=128)
    parser.add_argument("--queue-length", type=int, default=384)
    parser.add_argument("--queue-start-epoch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = parser.parse_args()

    cfgs = configs(args)
    results, timings, all_counts, losses, loads = {}, {}, {}, {}, []
    for name, config in cfgs.items():
        workdir = os.path.join(args.workdir, name)
        timing = train_and_time(config, workdir)
        timings[name] = f"{timing['minutes']:.1f} min"
        loads += timing["load"]
        variables, _ = load_variables(workdir)  # SwAV: the model; ExCB: the EMA teacher
        knn = knn_eval(config, variables)["eval/knn_top1"]
        counts = cluster_counts(config, variables)
        all_counts[name] = counts
        metrics = train_metrics(workdir)
        losses[name] = metrics["train/loss"]
        results[name] = {"knn": knn, "loss": metrics["train/loss"][1][-1], **usage_stats(counts)}
        if name == "excb":
            results[name]["excb"] = {k: v[1] for k, v in metrics.items()}
        print(name, {k: v for k, v in results[name].items() if k != "excb"}, timings[name], flush=True)
    random_knn = knn_eval(cfgs["swav"], random_init_variables(cfgs["swav"]))["eval/knn_top1"]
    os.makedirs(args.out, exist_ok=True)
    plot_usage(all_counts, losses, os.path.join(args.out, "compare_small_batch_usage.png"), args.clusters)
    command = "python bench/compare_small_batch.py " + " ".join(sys.argv[1:])
    load_range = f"{min(loads):.1f}-{max(loads):.1f}"
    write_report(os.path.join(args.out, "COMPARISON.md"), args, cfgs, results, timings, random_knn, load_range, command)
    print("wrote", os.path.join(args.out, "COMPARISON.md"))


def train_metrics(workdir: str) -> dict:
    """{key: (steps, values)} of the run's train/* metrics."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    keys = sorted({k for r in records for k in r if k.startswith("train/")})
    return {k: ([r["step"] for r in records if k in r], [r[k] for r in records if k in r]) for k in keys}


def train_and_time(config, workdir: str) -> dict:
    """Trains (or finds the finished run); returns {'minutes': wall time, 'load': [1-minute
    load average before, after]}, kept in workdir/train_time.json so that a re-run that
    only evaluates still reports them."""
    path = os.path.join(workdir, "train_time.json")
    start, load = time.time(), os.getloadavg()[0]
    if train(config, workdir):  # empty when the run was already complete
        with open(path, "w") as f:
            json.dump({"minutes": (time.time() - start) / 60, "load": [load, os.getloadavg()[0]]}, f)
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
