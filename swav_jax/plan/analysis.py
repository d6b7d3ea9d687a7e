"""Per-chip figures of a compiled SPMD program, and the roofline estimate built on them.

Everything is read from one `jax.stages.Compiled` (for example compiled for a TPU
topology on a CPU machine, swav_jax.plan.topology): XLA's memory analysis (bytes per
chip), its cost analysis (FLOPs and HBM bytes accessed per chip and step) and the
collectives of the optimised HLO text.

The step-time estimate is a roofline: the larger of compute time (FLOPs / peak bf16
FLOP/s) and memory time (bytes accessed / HBM bandwidth), plus the collectives' time,
their per-chip link traffic over the chip's all-reduce bandwidth, counted as not
overlapped with compute. Link traffic follows the bandwidth-optimal ring algorithms: an
all-reduce of B bytes over n chips sends 2 (n - 1) / n * B bytes from each chip, an
all-gather (output B) or reduce-scatter (input B) (n - 1) / n * B, an all-to-all
(n - 1) / n * B, a collective permute B. Left out: per-collective latency (their count
is reported), overlap of collectives with compute, peak FLOP/s never reached by real
kernels (every figure is a lower bound on step time), the host (input pipeline,
infeed) and anything outside the compiled step.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

from swav_jax.plan.chips import Chip

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                    "collective-broadcast")

# `%name = TYPE OPCODE(` for the collective opcodes. Asynchronous pairs are counted once,
# by their `-done`, whose type is the collective's result (a `-start` returns a tuple
# that also holds the operands and scratch).
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>.*?)\s(?P<kind>" + "|".join(COLLECTIVE_KINDS) + r")(?P<async>-start|-done)?\("
)
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_LISTED = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[[0-9,]*?([0-9]+)\]<=")
_PARTITIONS = re.compile(r"num_partitions=([0-9]+)")


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective instruction of the program, as each chip runs it.

    Attributes:
      kind: one of COLLECTIVE_KINDS.
      shapes: (dtype, dims) of its result arrays (several when XLA combined reductions).
      group_size: chips per replica group (for a collective permute: all partitions).
      operand_bytes: bytes each chip contributes (its operands).
      link_bytes: bytes each chip sends over the interconnect (ring algorithms).
    """

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    group_size: int
    operand_bytes: int
    link_bytes: float


@dataclasses.dataclass(frozen=True)
class Collectives:
    """The collectives of one kind per step: instruction count and per-chip bytes."""

    kind: str
    count: int
    operand_bytes: int
    link_bytes: float


@dataclasses.dataclass(frozen=True)
class ProgramStats:
    """Per-chip figures of one compiled step.

    Attributes:
      argument_bytes: HBM of the arguments (parameters, optimiser state, batch).
      output_bytes: HBM of the results.
      alias_bytes: bytes of outputs that reuse a donated argument's buffer.
      temp_bytes: HBM of the temporaries (activations kept for the backward pass, ...).
      code_bytes: the program itself.
      flops: XLA's FLOP count per chip and step.
      bytes_accessed: XLA's HBM bytes read and written per chip and step.
      collectives: per kind, in COLLECTIVE_KINDS order; only kinds that occur.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    collectives: tuple[Collectives, ...]

    @property
    def hbm_bytes(self) -> int:
        """Everything resident at once: arguments, results not aliased to a donated
        argument, temporaries and code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """Roofline step time of one chip (module docstring), in seconds."""

    compute_s: float
    memory_s: float
    collective_s: float | None  # None: the chip has no published interconnect figure

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s) + (self.collective_s or 0.0)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclasses.dataclass(frozen=True)
class RunEstimate:
    images_per_s: float
    hours: float
    chip_hours: float


def _array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    bits = re.search(r"[0-9]+", dtype)  # bf16 -> 16, f8e4m3fn -> 8; token[] holds no data
    width = 8 if dtype == "pred" else int(bits.group()) if bits else 0
    return math.prod(dims) * width // 8


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """The collective instructions of an optimised HLO module (`compiled.as_text()`), in
    text order, each counted once. Instructions inside loop bodies are counted once,
    not per iteration."""
    header = _PARTITIONS.search(hlo_text)
    partitions = int(header.group(1)) if header else 1
    ops = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.search(line)
        if not m or m.group("async") == "-start":
            continue
        kind = m.group("kind")
        shapes = tuple((dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(m.group("type")))
        listed, iota = _GROUPS_LISTED.search(line), _GROUPS_IOTA.search(line)
        if listed:
            n = len(listed.group(1).split(","))
        elif iota:
            n = int(iota.group(1))
        else:  # no groups (or a permute's source-target pairs): all partitions
            n = partitions
        result = sum(_array_bytes(dtype, dims) for dtype, dims in shapes)
        operand = {"all-gather": result // n, "reduce-scatter": result * n}.get(kind, result)
        share = (n - 1) / n
        link = {
            "all-reduce": 2 * share * result,
            "all-gather": share * result,
            "reduce-scatter": share * operand,
            "all-to-all": share * result,
        }.get(kind, float(result))
        ops.append(CollectiveOp(kind, shapes, n, operand, link))
    return ops


def summarize_collectives(ops: list[CollectiveOp]) -> tuple[Collectives, ...]:
    """Per kind (COLLECTIVE_KINDS order, kinds present only): count and summed bytes."""
    return tuple(
        Collectives(
            kind,
            sum(1 for op in ops if op.kind == kind),
            sum(op.operand_bytes for op in ops if op.kind == kind),
            sum(op.link_bytes for op in ops if op.kind == kind),
        )
        for kind in COLLECTIVE_KINDS
        if any(op.kind == kind for op in ops)
    )


def program_stats(compiled: jax.stages.Compiled) -> ProgramStats:
    """Memory, FLOPs, HBM traffic and collectives per chip of a compiled SPMD step."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    return ProgramStats(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=summarize_collectives(collective_ops(compiled.as_text())),
    )


def estimate_step(stats: ProgramStats, chip: Chip) -> StepEstimate:
    """Roofline step time of `stats` on `chip` (module docstring)."""
    link_bytes = sum(c.link_bytes for c in stats.collectives)
    return StepEstimate(
        compute_s=stats.flops / chip.peak_bf16_flops,
        memory_s=stats.bytes_accessed / chip.hbm_bytes_per_s,
        collective_s=None if chip.allreduce_bytes_per_s is None else link_bytes / chip.allreduce_bytes_per_s,
    )


def estimate_run(step_s: float, *, global_batch: int, total_steps: int, chips: int) -> RunEstimate:
    """Throughput and duration of a run of `total_steps` steps of `global_batch` images
    (for a recipe: epochs x swav_jax.data.pipeline.steps_per_epoch(config, num_examples))."""
    if step_s <= 0 or global_batch < 1 or total_steps < 0 or chips < 1:
        raise ValueError(f"need step_s > 0, global_batch >= 1, total_steps >= 0, chips >= 1; got "
                         f"{step_s}, {global_batch}, {total_steps}, {chips}")
    hours = total_steps * step_s / 3600
    return RunEstimate(images_per_s=global_batch / step_s, hours=hours, chip_hours=hours * chips)
