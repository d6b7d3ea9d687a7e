"""Metrics out: `metrics.jsonl` (one JSON object per line), TensorBoard when available,
and a progress line with images/s and ETA."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping


class MetricsWriter:
    """Appends `{"step": ..., key: value, ...}` lines to `workdir/metrics.jsonl`.

    TensorBoard event files are written too when `tensorboardX` is installed. Only
    the writing process (process 0) should construct one with `enabled=True`.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: float(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Throughput and ETA over the steps since the last report (compilation excluded)."""

    def __init__(self, total_steps: int, images_per_step: int, start_step: int, stream=sys.stderr):
        self.total = total_steps
        self.images_per_step = images_per_step
        self.stream = stream
        self._mark_step = start_step
        self._mark_time = time.perf_counter()

    def restart_clock(self, step: int) -> None:
        self._mark_step, self._mark_time = step, time.perf_counter()

    def rate(self, step: int) -> tuple[float, float]:
        """(steps/s, images/s) since the last report; resets the window."""
        now = time.perf_counter()
        steps = step - self._mark_step
        elapsed = max(now - self._mark_time, 1e-9)
        self._mark_step, self._mark_time = step, now
        return steps / elapsed, steps * self.images_per_step / elapsed

    def report(self, step: int, steps_per_sec: float, images_per_sec: float, metrics: Mapping[str, float]) -> None:
        eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
        shown = " ".join(
            f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k != "train/images_per_sec"
        )
        pct = 100.0 * step / max(self.total, 1)
        eta_text = _format_seconds(eta) if math.isfinite(eta) else "?"
        print(
            f"[{step}/{self.total} {pct:5.1f}%] {steps_per_sec:.2f} steps/s {images_per_sec:.1f} img/s "
            f"ETA {eta_text} | {shown}",
            file=self.stream,
            flush=True,
        )
