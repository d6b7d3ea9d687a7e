"""Runs and tabulates the natural-image (CIFAR-size) SwAV experiments of docs/NATURAL_IMAGES.md.

  run    one training run through the CLI (`python -m swav_jax train ...`) under
         `nice -n 10`; records the command, wall time, CPU time, the 1-minute load average
         before and after, the last logged loss and the end-of-run evaluations in LOG (JSONL).
  table  LOG as a markdown table (one row per run, in order).

    python bench/natural_images.py run --log runs.jsonl --name pilot1 --workdir /tmp/r1 -- \\
        --config YOUR_CONFIG --config.data.data_dir=/data/cifar_folder ...
    python bench/natural_images.py table --log runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def last_values(metrics_path: str) -> dict:
    """The last value of every key in a run's metrics.jsonl, and the first logged loss."""
    out: dict = {}
    with open(metrics_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "train/loss" in record and "first_loss" not in out:
                out["first_loss"] = record["train/loss"]
            out.update(record)
    return out


def run(args) -> int:
    if os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
        print(f"error: {args.workdir} already holds a run", file=sys.stderr)
        return 1
    command = [sys.executable, "-m", "swav_jax", "train", "--workdir", args.workdir] + args.train_args
    shown = "python -m swav_jax train --workdir " + args.workdir + " " + " ".join(map(shlex.quote, args.train_args))
    if os.environ.get("XLA_FLAGS"):  # e.g. the host split into several XLA devices
        shown = "XLA_FLAGS=" + shlex.quote(os.environ["XLA_FLAGS"]) + " " + shown
    load_before = load_average()
    start = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "stdout.txt"), "w") as out:
        rc = subprocess.call(["nice", "-n", "10"] + command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = {
        "name": args.name,
        "command": shown,
        "wall_s": round(wall, 1),
        # CPU seconds of the run (user + system, all threads): with the machine to itself a
        # 2-core run's wall time is about this over 2 or a little more; unlike the wall
        # time it hardly depends on what else runs.
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "load_before": load_before,
        "load_after": load_average(),
        "rc": rc,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    metrics = os.path.join(args.workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        values = last_values(metrics)
        for key in ("step", "first_loss", "train/loss", "train/empty_prototypes", "train/assignment_entropy",
                    "eval/knn_top1", "eval/knn_top1_random_init", "eval/knn_top1_raw_pixels"):
            if key in values:
                record[key] = values[key]
    with open(args.log, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return rc


def table(args) -> int:
    rows = [json.loads(line) for line in open(args.log) if line.strip()]
    print("| run | steps | wall (s) | CPU (s) | load before/after | loss first -> last | empty prototypes | "
          "20-NN learned | random init | raw pixels |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda r, k, f="{:.1f}": f.format(r[k]) if k in r else "-"  # noqa: E731
    for r in rows:
        print(f"| {r['name']} | {r.get('step', '-')} | {r['wall_s']:.0f} | {fmt(r, 'cpu_s', '{:.0f}')} | {r['load_before']:.1f} / "
              f"{r['load_after']:.1f} | {fmt(r, 'first_loss', '{:.3f}')} -> {fmt(r, 'train/loss', '{:.3f}')} | "
              f"{fmt(r, 'train/empty_prototypes', '{:.0f}')} | {fmt(r, 'eval/knn_top1')} | "
              f"{fmt(r, 'eval/knn_top1_random_init')} | {fmt(r, 'eval/knn_top1_raw_pixels')} |")
    if args.commands:
        print()
        for r in rows:
            print(f"- {r['name']}: `{r['command']}`")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--log", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments of `swav-jax train`")
    p = sub.add_parser("table")
    p.add_argument("--log", required=True)
    p.add_argument("--commands", action="store_true", help="also list each run's command")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        args.train_args = [a for a in args.train_args if a != "--"] if args.train_args[:1] == ["--"] else args.train_args
        return run(args)
    return table(args)


if __name__ == "__main__":
    sys.exit(main())
