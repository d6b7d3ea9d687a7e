"""`swav-jax plan`: a training run compiled for a TPU slice on any machine, and what it needs.

The programs are the ones training runs, built by the same code: the method's train step
(`Method.build` on the training mesh over the slice's compile-only chips, lowered against
the abstract state and an abstract batch), the input pipeline's crop resize
(`pipeline.crop_program`, run on every batch) and the evaluation's feature step
(`eval.features.apply_feature_fn` on the trunk). Each is compiled by libtpu for the
slice; nothing is placed or run. From the compiled programs, per chip:

- HBM in three phases, each against the chip's capacity: the train step (arguments,
  temporaries, results, code) plus the batches the pipeline keeps on device ahead of it
  (`data.prefetch`); the crop resize beside the state and those batches; the feature
  step beside the state (the online kNN runs between steps);
- XLA's FLOPs and HBM traffic per step, the share of convolutions and matrix products
  in the FLOPs, the largest arrays, the collectives;
- a roofline step time (`analysis.estimate_step`: train step + crop resize), images/s,
  and the run's wall-clock and chip-hours over `epochs x steps_per_epoch` steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.data import pipeline
from swav_jax.eval.features import apply_feature_fn
from swav_jax.eval.images import DATA_AXIS, eval_mesh
from swav_jax.eval.run import eval_image_size, feature_fn
from swav_jax.mesh import data_axes, make_mesh
from swav_jax.methods import get_method
from swav_jax.methods.scaffold import abstract_batch
from swav_jax.plan import analysis
from swav_jax.plan.hlo import tiled_bytes
from swav_jax.plan.chips import GIB, Chip, chip_for
from swav_jax.plan.topology import parse_topology, topology_devices
from swav_jax.train.validate import validate_config

# Training examples of the data sets the recipes name, by (config.data.name, split).
KNOWN_NUM_EXAMPLES = {
    ("imagenet2012", "train"): 1_281_167,
    ("cifar10", "train"): 50_000,
    ("cifar100", "train"): 50_000,
    ("digits", "train"): 1_437,  # swav_jax.data.sources: the first 80% of scikit-learn's digits
}


def num_train_examples(config: ml_collections.ConfigDict, num_examples: int | None = None) -> int:
    """`num_examples` if given, else the size of `config.data`'s training split from
    KNOWN_NUM_EXAMPLES; ValueError naming --num-examples for other data sets."""
    if num_examples is not None:
        if num_examples < 1:
            raise ValueError(f"--num-examples must be >= 1, got {num_examples}")
        return int(num_examples)
    name = "digits" if config.data.source == "digits" else config.data.name
    key = (name, config.data.split)
    if key not in KNOWN_NUM_EXAMPLES:
        known = ", ".join(f"{n} {s}" for n, s in KNOWN_NUM_EXAMPLES)
        raise ValueError(f"the size of {name!r} split {config.data.split!r} is not known here ({known}): "
                         "pass --num-examples N")
    return KNOWN_NUM_EXAMPLES[key]


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """One program of the plan, compiled for the slice (per-chip figures), or why not.

    stats and estimate are None when it did not compile; `error` then holds XLA's
    message (RESOURCE_EXHAUSTED: does not fit in HBM)."""

    name: str
    compile_s: float
    stats: analysis.ProgramStats | None
    estimate: analysis.StepEstimate | None
    error: str | None = None

    @property
    def out_of_memory(self) -> bool:
        return self.error is not None and "RESOURCE_EXHAUSTED" in self.error


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run of `config` on a slice: the compiled programs and what follows from them.

    Bytes and FLOPs are per chip. From the train step's HLO: the FLOP breakdown
    (`flops_by_source`, analysis.flop_breakdown), the largest arrays and every collective."""

    config: ml_collections.ConfigDict
    topology: str
    chips: int
    chip: Chip
    mesh_shape: dict[str, int]
    num_examples: int
    steps_per_epoch: int
    total_steps: int
    abstract_state: Any  # what the train step was compiled against (ShapeDtypeStructs with shardings)
    state_bytes: int  # parameters, optimiser state, BN statistics, queue, ...: the arguments a step donates
    batch_bytes: int  # one step's batch (uint8 crops, ...)
    prefetch_bytes: int  # the batches the pipeline keeps on device ahead of the step
    eval_batch: int  # global images per feature step
    train: CompiledProgram
    crops: CompiledProgram
    features: CompiledProgram
    flops_by_source: dict[str, int] | None
    largest_arrays: tuple[analysis.LargeArray, ...]
    collective_ops: tuple[analysis.CollectiveOp, ...]  # the train step's, each with its source

    @property
    def programs(self) -> tuple[CompiledProgram, ...]:
        return self.train, self.crops, self.features

    @property
    def compiled(self) -> bool:
        return all(p.stats is not None for p in self.programs)

    @property
    def phase_hbm_bytes(self) -> dict[str, int | None]:
        """Resident HBM per chip while each program runs (module docstring); None when
        that program did not compile."""
        def hbm(program, extra):
            return None if program.stats is None else program.stats.hbm_bytes + extra

        return {
            "train step": hbm(self.train, self.prefetch_bytes),
            "crop resize": hbm(self.crops, self.state_bytes + self.prefetch_bytes),
            "eval features": hbm(self.features, self.state_bytes),
        }

    @property
    def hbm_bytes(self) -> int | None:
        """The most any phase holds; None when a program did not compile."""
        phases = self.phase_hbm_bytes.values()
        return None if None in phases else max(phases)

    @property
    def fits(self) -> bool:
        return self.compiled and self.hbm_bytes <= self.chip.program_hbm_bytes

    @property
    def step_s(self) -> float | None:
        """Roofline seconds per training step: train step + crop resize."""
        if self.train.estimate is None or self.crops.estimate is None:
            return None
        return self.train.estimate.step_s + self.crops.estimate.step_s

    @property
    def run(self) -> analysis.RunEstimate | None:
        if self.step_s is None:
            return None
        return analysis.estimate_run(
            self.step_s, global_batch=int(self.config.batch_size), total_steps=self.total_steps, chips=self.chips
        )

    @property
    def problems(self) -> list[str]:
        """Why the run cannot start on this slice (empty when it fits)."""
        out = [f"{p.name} does not {'fit' if p.out_of_memory else 'compile'}: {p.error}"
               for p in self.programs if p.error is not None]
        if self.compiled and not self.fits:
            phase, most = max(self.phase_hbm_bytes.items(), key=lambda kv: kv[1])
            out.append(f"{phase} needs {most / GIB:.2f} GiB per chip, more than the "
                       f"{self.chip.program_hbm_bytes / GIB:.2f} GiB a {self.chip.name} program may use")
        return out

    def to_json(self) -> dict[str, Any]:
        run = self.run
        train = self.train.stats
        return {
            "topology": self.topology,
            "chips": self.chips,
            "chip": self.chip.name,
            "chip_hbm_gib": self.chip.hbm_bytes / GIB,
            "usable_hbm_gib": self.chip.program_hbm_bytes / GIB,
            "hbm_per_chip_gib": None if self.hbm_bytes is None else self.hbm_bytes / GIB,
            "fits": self.fits,
            "problems": self.problems,
            "method": self.config.method,
            "global_batch": int(self.config.batch_size),
            "per_chip_batch": int(self.config.batch_size) // self.chips,
            "mesh": self.mesh_shape,
            "num_examples": self.num_examples,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "state_gib": self.state_bytes / GIB,
            "batch_gib": self.batch_bytes / GIB,
            "prefetch_gib": self.prefetch_bytes / GIB,
            "phase_hbm_gib": {k: None if v is None else v / GIB for k, v in self.phase_hbm_bytes.items()},
            "xla_tflop_per_chip_step": None if train is None else train.flops / 1e12,
            "flop_fraction": None if train is None or not self.flops_by_source else _fractions(
                train.flops, self.flops_by_source),
            "collectives": [] if train is None else [dataclasses.asdict(c) for c in train.collectives],
            "largest_arrays": [dataclasses.asdict(a) for a in self.largest_arrays],
            "programs": {p.name: _program_json(p) for p in self.programs},
            "step_time_s_est": self.step_s,
            "images_per_sec_est": None if run is None else run.images_per_s,
            "run_hours_est": None if run is None else run.hours,
            "chip_hours_est": None if run is None else run.chip_hours,
            "eval_batch": self.eval_batch,
            "eval_images_per_sec_est": None if self.features.estimate is None
            else self.eval_batch / self.features.estimate.step_s,
        }


def _fractions(total: float, by_source: dict[str, int]) -> dict[str, float]:
    conv, matmul = by_source[analysis.CONVOLUTION], by_source[analysis.MATMUL]
    return {"convolution": conv / total, "matmul": matmul / total, "other": max(0.0, total - conv - matmul) / total}


def _program_json(program: CompiledProgram) -> dict[str, Any]:
    s, e = program.stats, program.estimate
    return {
        "compile_s": program.compile_s,
        "error": program.error,
        "hbm_gib": None if s is None else s.hbm_bytes / GIB,
        "argument_gib": None if s is None else s.argument_bytes / GIB,
        "temp_gib": None if s is None else s.temp_bytes / GIB,
        "tflop": None if s is None else s.flops / 1e12,
        "hbm_traffic_gb": None if s is None else s.bytes_accessed / 1e9,
        "compute_s": None if e is None else e.compute_s,
        "memory_s": None if e is None else e.memory_s,
        "collective_s": None if e is None else e.collective_s,
        "step_s": None if e is None else e.step_s,
        "bound": None if e is None else e.bound,
    }


def _compile(
    name: str, lower: Callable[[], jax.stages.Lowered], chip: Chip
) -> tuple[CompiledProgram, jax.stages.Compiled | None]:
    """The compiled program's figures (and the executable), or the compiler's refusal."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as e:  # XLA's: out of HBM, unsupported, ...
        message = str(e).strip().splitlines()[0]
        return CompiledProgram(name, time.perf_counter() - start, None, None, message), None
    seconds = time.perf_counter() - start
    stats = analysis.program_stats(compiled)
    return CompiledProgram(name, seconds, stats, analysis.estimate_step(stats, chip)), compiled


def _local_bytes(tree: Any, formats: Any = None) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings: tiled as the
    compiled program's input `formats` (a tree of the same structure) lay them out, else
    unpadded."""
    def leaf_bytes(leaf, layout):
        shape, bits = leaf.sharding.shard_shape(leaf.shape), 8 * np.dtype(leaf.dtype).itemsize
        if layout is None or not layout.tiling:
            return math.prod(shape) * bits // 8
        return tiled_bytes(shape, bits, tuple(reversed(layout.major_to_minor)), layout.tiling[0])

    if formats is None:
        return sum(leaf_bytes(leaf, None) for leaf in jax.tree.leaves(tree))
    return sum(jax.tree.leaves(jax.tree.map(lambda leaf, f: leaf_bytes(leaf, f.layout), tree, formats)))


def make_plan(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    num_examples: int | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> Plan:
    """Compiles `config`'s programs for `topology` ('v5p:4x4x4') and reads their figures.

    Args:
      config: a training config (validated here for the slice's chips and hosts).
      topology: GENERATION:SHAPE (swav_jax.plan.topology).
      num_examples: training examples per epoch; default from KNOWN_NUM_EXAMPLES.
      progress: called with a line before each compilation (they take minutes for a
        ResNet-50).

    Raises:
      ConfigError / ValueError for a bad config, topology or data set size;
      TpuCompilerMissing without libtpu. A program the compiler refuses (out of HBM,
      ...) is not an exception: the plan says so (`fits`, `problems`).
    """
    chip = chip_for(topology)
    devices = topology_devices(topology)
    name = parse_topology(topology).name
    validate_config(config, num_devices=len(devices), num_processes=len({d.process_index for d in devices}))
    config = config.copy_and_resolve_references()
    examples = num_train_examples(config, num_examples)
    steps_per_epoch = pipeline.steps_per_epoch(config, examples)
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {examples} training examples")
    total_steps = int(config.epochs) * steps_per_epoch
    method = get_method(config.method)
    mesh = make_mesh(config, devices)
    axes = data_axes(mesh)
    program = method.build(config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           num_examples=examples)
    batch = abstract_batch(config, mesh, method.batch_fields)

    progress(f"compiling the {config.method} train step for {name} ({len(devices)} chips)")
    train, compiled = _compile("train step", lambda: program.train_step.lower(program.abstract_state, batch), chip)
    # Compiled.input_formats: ((per positional argument), {per keyword argument}).
    state_formats, batch_formats = compiled.input_formats[0] if compiled is not None else (None, None)
    train_hlo = compiled.as_text() if compiled is not None else ""
    del compiled

    progress("compiling the crop resize")
    crops, _ = _compile(
        "crop resize",
        lambda: pipeline.crop_program(config, mesh, axes).lower(*pipeline.abstract_crop_inputs(config, mesh, axes)),
        chip,
    )

    progress("compiling the evaluation's feature step")
    feature_mesh = eval_mesh(devices)
    eval_batch = -(-int(config.eval.batch_size) // len(devices)) * len(devices)
    size = eval_image_size(config)

    def lower_features():
        replicated = NamedSharding(feature_mesh, P())
        variables = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
            method.eval_variables(program.abstract_state),
        )
        images = jax.ShapeDtypeStruct((eval_batch, size, size, 3), np.uint8,
                                      sharding=NamedSharding(feature_mesh, P(DATA_AXIS)))
        return apply_feature_fn.lower(feature_fn(config, variables), images,
                                      dtype=np.dtype(config.eval.feature_dtype))

    features, _ = _compile("eval features", lower_features, chip)

    progress("reading the train step's HLO")
    batch_bytes = _local_bytes(batch, batch_formats)
    return Plan(
        config=config,
        topology=name,
        chips=len(devices),
        chip=chip,
        mesh_shape=dict(mesh.shape),
        num_examples=examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        abstract_state=program.abstract_state,
        state_bytes=_local_bytes(program.abstract_state, state_formats),
        batch_bytes=batch_bytes,
        prefetch_bytes=int(config.data.prefetch) * batch_bytes,
        eval_batch=eval_batch,
        train=train,
        crops=crops,
        features=features,
        flops_by_source=analysis.flop_breakdown(train_hlo) if train_hlo else None,
        largest_arrays=tuple(analysis.largest_arrays(train_hlo)) if train_hlo else (),
        collective_ops=tuple(analysis.collective_ops(train_hlo)),
    )


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.3g}"


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 1 else f"{h:.2g}"


def format_plan(plan: Plan) -> str:
    """The plan as the command prints it."""
    c = plan.config
    crops = " + ".join(f"{n}x{s}" for n, s in zip(c.crops.num_crops, c.crops.size_crops))
    chip = plan.chip
    lines = [
        f"{c.method}: {c.model.arch} x{c.model.width} ({c.model.dtype}), global batch {c.batch_size} "
        f"({c.batch_size // plan.chips} per chip), crops {crops}",
        f"slice: {plan.topology}, {plan.chips} x {chip.name} ({chip.hbm_bytes / GIB:.2f} GiB HBM, "
        f"{chip.peak_bf16_flops / 1e12:g} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:g} GB/s HBM), mesh "
        + " x ".join(f"{k} {v}" for k, v in plan.mesh_shape.items()),
        f"run: {c.epochs} epochs x {plan.steps_per_epoch:,} steps ({plan.num_examples:,} examples) = "
        f"{plan.total_steps:,} steps",
        "",
        f"{'per chip':<28}" + "".join(f"{p.name:>16}" for p in plan.programs),
    ]

    def row(label, value):
        lines.append(f"{label:<28}" + "".join(f"{value(p):>16}" for p in plan.programs))

    row("compiled in", lambda p: f"{p.compile_s:.0f} s" if p.error is None else "FAILED")
    row("arguments (GiB)", lambda p: _gib(p.stats and p.stats.argument_bytes))
    row("temporaries (GiB)", lambda p: _gib(p.stats and p.stats.temp_bytes))
    row("program total (GiB)", lambda p: _gib(p.stats and p.stats.hbm_bytes))
    row("TFLOP", lambda p: "-" if p.stats is None else f"{p.stats.flops / 1e12:.4g}")
    row("HBM traffic (GB)", lambda p: "-" if p.stats is None else f"{p.stats.bytes_accessed / 1e9:.4g}")
    row("roofline (ms)", lambda p: "-" if p.estimate is None else f"{1e3 * p.estimate.step_s:.3g} {p.estimate.bound[:3]}")
    lines.append("")
    phases = plan.phase_hbm_bytes
    lines.append(
        f"HBM per chip: state {_gib(plan.state_bytes)} GiB (parameters, optimiser, BN, queue), batch "
        f"{_gib(plan.batch_bytes)} GiB, {c.data.prefetch} prefetched batches {_gib(plan.prefetch_bytes)} GiB"
    )
    lines.append(
        "  at most: " + ", ".join(f"{k} {_gib(v)}" for k, v in phases.items())
        + f" GiB, of {chip.program_hbm_bytes / GIB:.2f} GiB usable: " + ("fits" if plan.fits else "DOES NOT FIT")
    )
    train = plan.train.stats
    if train is not None:
        if plan.flops_by_source:
            f = _fractions(train.flops, plan.flops_by_source)
            lines.append(f"train step FLOPs: {train.flops / 1e12:.4g} TFLOP per chip: convolutions "
                         f"{100 * f['convolution']:.1f}%, matrix products {100 * f['matmul']:.1f}%, "
                         f"everything else {100 * f['other']:.1f}%")
        for col in train.collectives:
            lines.append(f"collectives: {col.kind} x {col.count}, {col.operand_bytes / 1e6:.4g} MB per chip "
                         f"({col.link_bytes / 1e6:.4g} MB over the links)")
        if plan.largest_arrays:
            lines.append("largest arrays: " + "; ".join(
                f"{a.shape} {a.bytes / 2**20:.0f} MiB ({a.op_name.split('/', 2)[-1] or '?'})"
                for a in plan.largest_arrays[:3]))
    run = plan.run
    if run is not None:
        lines.append(
            f"estimate: {1e3 * plan.train.estimate.step_s:.3g} ms train step + {1e3 * plan.crops.estimate.step_s:.3g} ms "
            f"crop resize = {1e3 * plan.step_s:.3g} ms per step ({plan.train.estimate.bound}-bound), "
            f"{run.images_per_s:,.0f} images/s; the run: {_hours(run.hours)} h, {_hours(run.chip_hours)} chip-hours"
        )
    if plan.features.estimate is not None:
        lines.append(f"evaluation features: {plan.eval_batch / plan.features.estimate.step_s:,.0f} images/s "
                     f"(batch {plan.eval_batch}, {eval_image_size(c)} px)")
    lines.append("estimates are lower bounds: docs/TPU.md says what they leave out")
    for problem in plan.problems:
        lines.append("PROBLEM: " + problem)
    return "\n".join(lines)
