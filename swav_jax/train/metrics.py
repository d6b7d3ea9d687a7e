"""Metrics out: `metrics.jsonl` (one JSON object per line), TensorBoard event files,
optionally Weights & Biases; the start-up phases and the progress line (images/s, ETA)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Mapping

from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams

from swav_jax.errors import ConfigError
from swav_jax.train.run_config import flatten, format_compact

WANDB_ID_FILE = "wandb_run_id"


def read_rows(workdir: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` ([] if there is none); a line cut short by a
    killed run is left out."""
    rows = []
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


class MetricsWriter:
    """Appends `{"step": ..., key: value, ...}` lines to `workdir/metrics.jsonl` and
    writes the same scalars to TensorBoard (`workdir/tensorboard/`) and, when
    `wandb_project` is set, to Weights & Biases (the run id kept in
    `workdir/wandb_run_id`, so a resumed run or a later `swav-jax eval` continues it).

    Only the writing process (process 0) should construct one with `enabled=True`. A run
    resumed at `resume_step` first drops the rows past it (written before the restart by
    steps that are now done again), so readers see one row per step.
    """

    def __init__(self, workdir: str, enabled: bool = True, *, wandb_project: str = "",
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if resume_step is not None and os.path.exists(self.path):
                kept = [row for row in read_rows(workdir) if row["step"] <= resume_step]
                with open(self.path + ".tmp", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(row) + "\n" for row in kept)
                os.replace(self.path + ".tmp", self.path)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if wandb_project:
                self._wandb = _wandb_run(workdir, wandb_project)

    def write_config(self, config: dict[str, Any]) -> None:
        """The run's resolved config (`run_config.to_dict`): TensorBoard text and
        hyperparameters, W&B run config."""
        if not self.enabled:
            return
        self._tb.add_text("config", "```\n" + format_compact(config) + "\n```", 0)
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config).items()}
        # The hyperparameter table links to these scalars of the same run.
        metrics = {"train/loss": 0.0, "eval/knn_top1": 0.0, "eval/linear_top1": 0.0}
        for summary in hparams(flat, metrics):
            self._tb.file_writer.add_summary(summary)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.config.update(config, allow_val_change=True)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: float(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        finite = {k: v for k, v in record.items() if k != "step" and math.isfinite(v)}
        for k, v in finite.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({"step": int(step), **finite})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(workdir: str, project: str):
    """A W&B run that a resumed run (same workdir) continues."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            f"config.logging.wandb_project is {project!r} but wandb is not installed: "
            "pip install 'swav-jax[wandb]' (or set it to '')"
        ) from None

    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.isfile(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    run = wandb.init(project=project, id=run_id, resume="allow", dir=workdir,
                     name=os.path.basename(os.path.abspath(workdir)))
    # Our own step key: a resumed run or a later evaluation may log an earlier step.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


@contextlib.contextmanager
def phase(what: str, enabled: bool = True, stream=sys.stdout) -> Iterator[None]:
    """Prints `what ...` before the block and its duration after: 'compiling the train
    step ... 31.2 s'."""
    start = time.perf_counter()
    if enabled:
        print(f"{what} ...", end="", file=stream, flush=True)
    try:
        yield
    except BaseException:
        if enabled:
            print(" failed", file=stream, flush=True)
        raise
    if enabled:
        print(f" {time.perf_counter() - start:.1f} s", file=stream, flush=True)


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Throughput over the steps since the last report, compilation and evaluations
    excluded; an ETA that includes the evaluations still to come."""

    def __init__(
        self,
        total_steps: int,
        images_per_step: int,
        start_step: int,
        *,
        eval_steps: tuple[int, ...] = (),
        stream=sys.stderr,
    ):
        """`eval_steps`: the step after which each remaining evaluation runs (a step
        listed twice runs two)."""
        self.total = total_steps
        self.images_per_step = images_per_step
        self.stream = stream
        self._eval_steps = sorted(eval_steps)
        self._eval_seconds: list[float] = []
        self._mark_step = start_step
        self._mark_time = time.perf_counter()

    def restart_clock(self, step: int) -> None:
        self._mark_step, self._mark_time = step, time.perf_counter()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Times the evaluation in the block, for the ETA, and leaves it out of the
        throughput."""
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self._eval_seconds.append(seconds)
        self._mark_time += seconds

    def rate(self, step: int) -> tuple[float, float]:
        """(steps/s, images/s) since the last report; resets the window."""
        now = time.perf_counter()
        steps = step - self._mark_step
        elapsed = max(now - self._mark_time, 1e-9)
        self._mark_step, self._mark_time = step, now
        return steps / elapsed, steps * self.images_per_step / elapsed

    def eta(self, step: int, steps_per_sec: float) -> str:
        """Time left: the steps at `steps_per_sec`, plus the evaluations after `step` at
        the mean duration of those done so far ('+ N evals' before the first)."""
        if steps_per_sec <= 0:
            return "?"
        seconds = (self.total - step) / steps_per_sec
        evals = sum(1 for s in self._eval_steps if s >= step)
        if not evals:
            return _format_seconds(seconds)
        if self._eval_seconds:
            return _format_seconds(seconds + evals * sum(self._eval_seconds) / len(self._eval_seconds))
        return f"{_format_seconds(seconds)} + {evals} eval{'s' if evals > 1 else ''}"

    def report(self, step: int, steps_per_sec: float, images_per_sec: float, metrics: Mapping[str, float]) -> None:
        shown = " ".join(
            f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k != "train/images_per_sec"
        )
        pct = 100.0 * step / max(self.total, 1)
        print(
            f"[{step}/{self.total} {pct:5.1f}%] {steps_per_sec:.2f} steps/s {images_per_sec:.1f} img/s "
            f"ETA {self.eta(step, steps_per_sec)}" + (f" | {shown}" if shown else ""),
            file=self.stream,
            flush=True,
        )
