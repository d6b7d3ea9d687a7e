"""Published per-chip figures of the accelerators a run may be planned for.

Each figure is the vendor's as printed on the page in `source` (units converted, nothing
rounded further); `note` says how a figure was derived or where it could not be checked.
Capacities printed in GB are taken as 10^9 bytes and in GiB as 2^30 bytes: the
usable HBM is somewhat lower than either (the runtime reserves some).
"""

from __future__ import annotations

import dataclasses

GB = 10**9
GIB = 2**30
TERA = 10**12


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (a TPU chip, which may hold several cores, or one GPU).

    Attributes:
      name: the product name.
      hbm_bytes: HBM capacity per chip.
      peak_bf16_flops: peak dense bf16 FLOP/s per chip.
      hbm_bytes_per_s: HBM bandwidth per chip.
      allreduce_bytes_per_s: bytes per second one chip moves in an all-reduce over the
        chip-to-chip interconnect (ICI); None where no published figure gives it.
      source: the page the figures are from.
      note: derivations and what could not be verified.
      usable_hbm_bytes: the HBM the TPU compiler lets one program use (libtpu 0.0.42.1's
        "available HBM" in its out-of-memory message, read as GiB); None where not read.
    """

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    allreduce_bytes_per_s: float | None
    source: str
    note: str = ""
    usable_hbm_bytes: int | None = None

    @property
    def program_hbm_bytes(self) -> int:
        """What a run may fill: the compiler's usable HBM where known, else the capacity."""
        return self.hbm_bytes if self.usable_hbm_bytes is None else self.usable_hbm_bytes


CHIPS: dict[str, Chip] = {
    "v4": Chip(
        name="TPU v4",
        hbm_bytes=32 * GIB,
        peak_bf16_flops=275 * TERA,
        hbm_bytes_per_s=1200 * GB,
        allreduce_bytes_per_s=1.1e15 / 4096,
        source="https://cloud.google.com/tpu/docs/v4",
        note="all-reduce: the page's 1.1 PB/s all-reduce bandwidth per Pod over its 4096 chips; "
        "no per-chip ICI figure is printed",
        usable_hbm_bytes=int(30.75 * GIB),
    ),
    "v5e": Chip(
        name="TPU v5e",
        hbm_bytes=16 * GB,
        peak_bf16_flops=197 * TERA,
        hbm_bytes_per_s=819 * GB,
        allreduce_bytes_per_s=51.2e12 / 256,
        source="https://cloud.google.com/tpu/docs/v5e",
        note="all-reduce: the page's 51.2 TB/s all-reduce bandwidth per Pod over its 256 chips "
        "(half the 400 GB/s bidirectional ICI bandwidth per chip it also prints)",
        usable_hbm_bytes=int(15.75 * GIB),
    ),
    "v5p": Chip(
        name="TPU v5p",
        hbm_bytes=95 * GB,
        peak_bf16_flops=459 * TERA,
        hbm_bytes_per_s=2765 * GB,
        allreduce_bytes_per_s=4800e9 / 8,
        source="https://cloud.google.com/tpu/docs/v5p",
        note="all-reduce: the page's 4800 Gbps inter-chip interconnect bandwidth (600 GB/s; the "
        "page prints no all-reduce bandwidth per Pod)",
        usable_hbm_bytes=int(95.74 * GIB),
    ),
    "v6e": Chip(
        name="TPU v6e (Trillium)",
        hbm_bytes=32 * GB,
        peak_bf16_flops=918 * TERA,
        hbm_bytes_per_s=1638 * GB,
        allreduce_bytes_per_s=102.4e12 / 256,
        source="https://cloud.google.com/tpu/docs/v6e",
        note="all-reduce: the page's 102.4 TB/s all-reduce bandwidth per Pod over its 256 chips "
        "(half the 800 GB/s bidirectional ICI bandwidth per chip it also prints)",
        usable_hbm_bytes=int(31.25 * GIB),
    ),
    "a100": Chip(
        name="NVIDIA A100 80GB SXM",
        hbm_bytes=80 * GB,
        peak_bf16_flops=312 * TERA,
        hbm_bytes_per_s=2039 * GB,
        allreduce_bytes_per_s=None,
        source="https://glennklockwood.com/garden/processors/A100",
        note="not verified against NVIDIA's datasheet (not reachable from here); the page cites it. "
        "bf16 without sparsity",
    ),
    "h100": Chip(
        name="NVIDIA H100 SXM",
        hbm_bytes=80 * GB,
        peak_bf16_flops=989.4 * TERA,
        hbm_bytes_per_s=3350 * GB,
        allreduce_bytes_per_s=None,
        source="https://glennklockwood.com/garden/processors/h100",
        note="not verified against NVIDIA's datasheet (not reachable from here). bf16 without "
        "sparsity (NVIDIA's 1979 TFLOPS assume 2:4 sparsity)",
    ),
    "h200": Chip(
        name="NVIDIA H200 SXM",
        hbm_bytes=141 * GB,
        peak_bf16_flops=989.4 * TERA,
        hbm_bytes_per_s=4800 * GB,
        allreduce_bytes_per_s=None,
        source="https://www.aiminingco.com/gpu/h200/specs",
        note="not verified against NVIDIA's datasheet (not reachable from here): 141 GB and 4.8 TB/s "
        "from secondary pages (MLCommons' H200 system descriptions also list 141 GB); bf16 taken "
        "as the H100's (same GH100 die)",
    ),
}

ALIASES = {"v5litepod": "v5e"}  # the Cloud accelerator-type name of v5e


def chip_for(topology: str) -> Chip:
    """The chip of a topology name ('v5p:4x4x4') or of a bare generation ('v5p', 'h100')."""
    key = topology.split(":", 1)[0].strip().lower()
    key = ALIASES.get(key, key)
    if key not in CHIPS:
        raise ValueError(f"unknown chip {topology.split(':', 1)[0]!r}; known: {', '.join(CHIPS)}")
    return CHIPS[key]
