"""Shared by bench/train_step.py (JAX) and bench/torch_train_step.py (PyTorch).

No JAX or PyTorch here: crop specs, the analytic model FLOP count, peak FLOP/s of
known accelerators, timing statistics, the machine's description and the results
table, so both benchmarks measure and print the same way.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from typing import Sequence

# (blocks per stage, block kind) of the torchvision v1.5 ResNets.
ARCHS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

# Dense (no sparsity) peak FLOP/s per device for 16-bit matmuls, from the vendors' data
# sheets; matched against the device kind in this order (first match wins).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),
)


def parse_crops(spec: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """'2x224+6x96' -> (num_crops (2, 6), size_crops (224, 96))."""
    groups = spec.split("+")
    num, size = [], []
    for g in groups:
        m = re.fullmatch(r"(\d+)x(\d+)", g.strip())
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"--crops: expected groups like '2x224+6x96' (count x pixels), got {spec!r}")
        num.append(int(m.group(1)))
        size.append(int(m.group(2)))
    if sum(num) < 2:
        raise ValueError(f"--crops: SwAV needs at least 2 crops per image, got {spec!r}")
    return tuple(num), tuple(size)


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def backbone_forward_flops(arch: str, size: int, *, width: int = 1, base_width: int = 64,
                           small_stem: bool = False) -> int:
    """Forward FLOPs (2 per multiply-add) of the ResNet's convolutions on one size x size image.

    torchvision v1.5 layout as swav_jax.models.resnet: 7x7/2 stem conv + 3x3/2 max-pool
    (or one 3x3/1 conv with `small_stem`), stride on the 3x3 conv, 1x1 strided
    projection shortcuts. BatchNorm, ReLU, pooling and additions are not counted.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    stages, kind = ARCHS[arch]
    flops = 0

    def conv(h, cin, cout, k, stride):
        nonlocal flops
        pad = k // 2
        out = _conv_out(h, k, stride, pad)
        flops += 2 * out * out * k * k * cin * cout
        return out

    channels = base_width * width
    if small_stem:
        h = conv(size, 3, channels, 3, 1)
    else:
        h = conv(size, 3, channels, 7, 2)
        h = _conv_out(h, 3, 2, 1)  # max-pool
    cin = channels
    for s, blocks in enumerate(stages):
        planes = channels * 2**s
        cout = planes * _EXPANSION[kind]
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            if kind == "basic":
                h_out = conv(h, cin, planes, 3, stride)
                conv(h_out, planes, planes, 3, 1)
            else:
                conv(h, cin, planes, 1, 1)
                h_out = conv(h, planes, planes, 3, stride)
                conv(h_out, planes, cout, 1, 1)
            if stride != 1 or cin != cout:
                conv(h, cin, cout, 1, stride)
            h, cin = h_out, cout
    return flops


def num_features(arch: str, width: int = 1, base_width: int = 64) -> int:
    return 8 * base_width * width * _EXPANSION[ARCHS[arch][1]]


def train_flops_per_image(arch: str, num_crops: Sequence[int], size_crops: Sequence[int], *, width: int = 1,
                          base_width: int = 64, small_stem: bool = False, hidden_dim: int = 2048,
                          proj_dim: int = 128, num_prototypes: Sequence[int] = (3000,)) -> int:
    """Model FLOPs of one training step per image: 3 x forward (backward = 2 x forward).

    Forward = the backbone's convolutions on every crop + the head's and the prototypes'
    matrix products on every crop. The usual MFU convention: no BatchNorm, elementwise
    work, augmentation or Sinkhorn, and no recomputation.
    """
    feats = num_features(arch, width, base_width)
    head = 2 * (feats * hidden_dim + hidden_dim * proj_dim) if hidden_dim else 2 * feats * proj_dim
    head += 2 * proj_dim * sum(num_prototypes)
    forward = sum(
        n * (backbone_forward_flops(arch, s, width=width, base_width=base_width, small_stem=small_stem) + head)
        for n, s in zip(num_crops, size_crops)
    )
    return 3 * forward


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s per device: --peak-tflops if given, else the table for 16-bit compute."""
    if override_tflops:
        return override_tflops * 1e12
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def step_stats(times_s: Sequence[float]) -> dict:
    """Median, min and max of per-step wall times, in ms."""
    return {
        "step_ms": 1e3 * statistics.median(times_s),
        "step_ms_min": 1e3 * min(times_s),
        "step_ms_max": 1e3 * max(times_s),
    }


def throughput(row: dict, *, per_device_batch: int, num_devices: int, flops_per_image: int,
               peak: float | None) -> dict:
    """images/s (global and per device), model TFLOP/s per device and MFU from step_ms."""
    seconds = row["step_ms"] / 1e3
    per_device = per_device_batch / seconds
    out = {
        "img_per_s": per_device * num_devices,
        "img_per_s_per_device": per_device,
        "model_tflops_per_device": per_device * flops_per_image / 1e12,
    }
    out["mfu"] = per_device * flops_per_image / peak if peak else None
    return out


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    names = [ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} CPUs"


def run_info(framework: str) -> dict:
    return {
        "framework": framework,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": cpu_model(),
        "python": platform.python_version(),
    }


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


COLUMNS = (
    ("mode", "mode", "s"),
    ("crops", "crops", "s"),
    ("batch/dev", "per_device_batch", "d"),
    ("devs", "num_devices", "d"),
    ("step ms", "step_ms", ".1f"),
    ("img/s", "img_per_s", ".1f"),
    ("img/s/dev", "img_per_s_per_device", ".1f"),
    ("TFLOP/s/dev", "model_tflops_per_device", ".2f"),
    ("MFU %", "mfu_percent", ".1f"),
    ("peak GB", "peak_gb", ".2f"),
    ("compiled GB", "compiled_gb", ".2f"),
    ("compile s", "compile_s", ".0f"),
)


def print_table(info: dict, rows: list[dict]) -> None:
    """A markdown table of the rows, after a header naming the run."""
    print(f"\n{info['framework']} on {info.get('device', '?')} ({info['date']}); host: {info['host']}")
    print(f"command: {info['command']}")
    if info.get("flops_note"):
        print(info["flops_note"])
    print("| " + " | ".join(c[0] for c in COLUMNS) + " | note |")
    print("|" + "---|" * (len(COLUMNS) + 1))
    for row in rows:
        row = {**row, "mfu_percent": None if row.get("mfu") is None else 100 * row["mfu"]}
        cells = [_fmt(row.get(key), spec) for _, key, spec in COLUMNS]
        print("| " + " | ".join(cells) + f" | {row.get('note', '')} |")


def write_json(path: str, info: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
