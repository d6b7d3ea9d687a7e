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
import numpy as np

from swav_jax.plan import hlo
from swav_jax.plan.chips import Chip

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                    "collective-broadcast")

_GROUPS_LISTED = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[[0-9,]*?([0-9]+)\]<=")


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
    """One collective instruction of the program, as each chip runs it.

    Attributes:
      kind: one of COLLECTIVE_KINDS.
      shapes: (dtype, dims) of its result arrays (several when XLA combined reductions).
      group_size: chips per replica group (for a collective permute: all partitions).
      operand_bytes: bytes each chip contributes (its operands).
      link_bytes: bytes each chip sends over the interconnect (ring algorithms).
      source: the jax operation it comes from (metadata op_name, e.g.
        'jit(train_step)/shard_map/jvp()/sinkhorn/psum'); '' when none.
    """

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    group_size: int
    operand_bytes: int
    link_bytes: float
    source: str = ""


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


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
    """The collective instructions of an optimised HLO module (`compiled.as_text()`), in
    text order, each counted once: an asynchronous pair by its `-done`, whose type is the
    collective's result (a `-start` returns a tuple that also holds the operands and
    scratch). Instructions inside loop bodies are counted once, not per iteration."""
    module = hlo.parse_module(hlo_text)
    ops = []
    for instruction in module.instructions:
        kind = instruction.opcode.removesuffix("-done")
        if kind not in COLLECTIVE_KINDS:
            continue
        arrays = instruction.arrays
        listed = _GROUPS_LISTED.search(instruction.attributes)
        iota = _GROUPS_IOTA.search(instruction.attributes)
        if listed:
            n = len(listed.group(1).split(","))
        elif iota:
            n = int(iota.group(1))
        else:  # no groups (or a permute's source-target pairs): all partitions
            n = module.num_partitions
        result = sum(a.bytes for a in arrays)
        operand = {"all-gather": result // n, "reduce-scatter": result * n}.get(kind, result)
        share = (n - 1) / n
        link = {
            "all-reduce": 2 * share * result,
            "all-gather": share * result,
            "reduce-scatter": share * operand,
            "all-to-all": share * result,
        }.get(kind, float(result))
        ops.append(CollectiveOp(kind, tuple((a.dtype, a.dims) for a in arrays), n, operand, link, instruction.op_name))
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


# The jax primitives whose instructions the FLOP breakdown counts (from their metadata;
# a TPU compiler emits matrix products as convolutions too).
CONVOLUTION, MATMUL = "conv_general_dilated", "dot_general"


def _window_taps(lhs: int, out: int, size: int, stride: int, low: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read an input
    element, not padding or a hole of the dilated input."""
    o = np.arange(out)[:, None]
    k = np.arange(size)[None, :]
    pos = o * stride - low + k * rhs_dilate
    valid = (pos >= 0) & (pos <= (lhs - 1) * lhs_dilate) & (pos % lhs_dilate == 0)
    return int(valid.sum())


def _convolution_flops(instruction: hlo.Instruction, shapes: dict[str, tuple[int, ...]]) -> int:
    """2 x multiply-adds of a convolution, counting only taps that read input elements
    (as XLA's cost analysis does): out batch x out features x kernel input features x the
    product over spatial dimensions of `_window_taps`."""
    lhs, rhs = (shapes[name] for name in instruction.operands[:2])
    (out,) = instruction.arrays
    labels = instruction.attribute("dim_labels")
    lhs_labels, rest = labels.split("_", 1)
    rhs_labels, out_labels = rest.split("->")
    window = dict(item.split("=") for item in (instruction.attribute("window") or "").split())
    spatial = [c for c in out_labels if c.isdigit()]

    def per_dim(key, default):
        return window[key].split("x") if key in window else [default] * len(spatial)

    sizes, strides = per_dim("size", "1"), per_dim("stride", "1")
    pads, lhs_dil, rhs_dil = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1
    for d, c in enumerate(spatial):
        taps *= _window_taps(
            lhs[lhs_labels.index(c)], out.dims[out_labels.index(c)], int(sizes[d]), int(strides[d]),
            int(pads[d].split("_")[0]), int(lhs_dil[d]), int(rhs_dil[d]),
        )
    return 2 * out.dims[out_labels.index("b")] * out.dims[out_labels.index("f")] * rhs[rhs_labels.index("i")] * taps


def _dot_flops(instruction: hlo.Instruction, shapes: dict[str, tuple[int, ...]]) -> int:
    lhs = shapes[instruction.operands[0]]
    contracting = [int(d) for d in (instruction.attribute("lhs_contracting_dims") or "").split(",") if d]
    (out,) = instruction.arrays
    return 2 * math.prod(out.dims) * math.prod(lhs[d] for d in contracting)


def flop_breakdown(hlo_text: str) -> dict[str, int]:
    """FLOPs per chip and step of the convolution and dot instructions of an optimised
    HLO module, by the jax primitive their metadata names: {CONVOLUTION: FLOPs of
    instructions from `conv_general_dilated`, MATMUL: from `dot_general`} (a TPU compiler
    emits both as convolutions). Instructions without that metadata count by opcode.
    Instructions inside loop bodies count once, as in XLA's cost analysis."""
    module = hlo.parse_module(hlo_text)
    shapes = {}
    for instruction in module.instructions:
        arrays = instruction.arrays
        if len(arrays) == 1 and not instruction.type.startswith("("):
            shapes[instruction.name] = arrays[0].dims
    totals = {CONVOLUTION: 0, MATMUL: 0}
    for instruction in module.instructions:
        if instruction.opcode == "convolution":
            flops, default = _convolution_flops(instruction, shapes), CONVOLUTION
        elif instruction.opcode == "dot":
            flops, default = _dot_flops(instruction, shapes), MATMUL
        else:
            continue
        source = instruction.op_name.rsplit("/", 1)[-1]
        totals[source if source in totals else default] += flops
    return totals


@dataclasses.dataclass(frozen=True)
class LargeArray:
    bytes: int  # in HBM, with the layout's tile padding
    shape: str  # e.g. 'bf16[64,56,56,256]'
    op_name: str  # the jax source (metadata), '' when none


def largest_arrays(hlo_text: str, count: int = 5) -> list[LargeArray]:
    """The `count` largest arrays an optimised HLO module writes to memory: results of
    instructions outside fusion bodies, except parameters and aliases of other buffers
    (tuples, their elements, bitcasts). Equal (shape, source) pairs are listed once."""
    module = hlo.parse_module(hlo_text)
    aliases = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")
    seen, found = set(), []
    for instruction in module.instructions:
        if instruction.computation in module.fusion_bodies or instruction.opcode in aliases:
            continue
        for array in instruction.arrays:
            shape = f"{array.dtype}[{','.join(map(str, array.dims))}]"
            key = (shape, instruction.op_name)
            if key not in seen:
                seen.add(key)
                found.append(LargeArray(array.padded_bytes, shape, instruction.op_name))
    return sorted(found, key=lambda a: -a.bytes)[:count]
