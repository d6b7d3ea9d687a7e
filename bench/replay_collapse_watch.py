"""Replays a run's logged metrics through the trainer's collapse watch: where would it warn?

    python bench/replay_collapse_watch.py WORKDIR [WORKDIR ...]

Reads WORKDIR/config.json and WORKDIR/metrics.jsonl, feeds every logged training record
to `swav_jax.train.collapse.CollapseWatch` as the trainer does, and prints the step of
the warning and its text, or that none fired. For checking a change to the watch against
runs already made (docs/QUEUE.md).
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swav_jax.methods import get_method  # noqa: E402
from swav_jax.train.collapse import CollapseWatch  # noqa: E402


def replay(workdir: str) -> tuple[int | None, str | None]:
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    watch = CollapseWatch(config, get_method(config.method), log_every=int(config.log_every_steps))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "train/loss" in record and (message := watch.update(record)):
                return record["step"], message
    return None, None


def main(argv: list[str]) -> int:
    for workdir in argv:
        step, message = replay(workdir)
        print(f"{workdir}: " + (f"warns at step {step}: {message}" if step is not None else "no warning"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
