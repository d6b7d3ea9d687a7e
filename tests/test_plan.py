"""Per-chip program figures (swav_jax.plan): the HLO collective parser, memory and FLOPs
of a program compiled for a TPU slice against analytic counts, the roofline arithmetic,
the chip table and topology names."""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swav_jax.data.pipeline import steps_per_epoch
from swav_jax.plan.analysis import (
    CONVOLUTION,
    MATMUL,
    Collectives,
    ProgramStats,
    collective_ops,
    estimate_run,
    estimate_step,
    flop_breakdown,
    largest_arrays,
    program_stats,
    summarize_collectives,
)
from swav_jax.plan.chips import CHIPS, chip_for
from swav_jax.plan.hlo import tiled_bytes
from swav_jax.plan.topology import parse_topology

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu not installed (pip install "swav-jax[tpu]"): no TPU topology to compile for',
)

# Shapes of the text XLA prints for TPU programs (layouts with tiles and memory spaces,
# asynchronous start/done pairs, tuple all-reduces, iota replica groups).
HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8
%fused (p: f32[16]) -> f32[16] {
  %all-reduce.9 = f32[16]{0} all-reduce(%p), channel_id=9, replica_groups={}, to_apply=%add
}
ENTRY %main {
  %ar = (f32[300]{0:T(512)}, f32[]{:T(128)}) all-reduce(%a, %b), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ag = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%c), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %rs = f32[2,128]{1,0:T(2,128)} reduce-scatter(%d), channel_id=3, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}
  %cps = (f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%e), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,128]{1,0:T(8,128)} collective-permute-done(%cps)
  %a2a = pred[4,2]{1,0} all-to-all(%f), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %fusion = f32[8,128]{1,0} fusion(%all-reduce.9, %cpd), kind=kLoop, calls=%fused
}
"""


def test_collective_parser_reads_kinds_groups_and_bytes():
    ops = collective_ops(HLO)
    got = [(op.kind, op.shapes, op.group_size, op.operand_bytes, op.link_bytes) for op in ops]
    assert got == [
        ("all-reduce", (("f32", (16,)),), 8, 64, 2 * 7 / 8 * 64),  # no groups: all partitions
        ("all-reduce", (("f32", (300,)), ("f32", ())), 4, 1204, 2 * 3 / 4 * 1204),
        ("all-gather", (("bf16", (64, 128)),), 8, 64 * 128 * 2 // 8, 7 / 8 * 64 * 128 * 2),
        ("reduce-scatter", (("f32", (2, 128)),), 2, 2 * 128 * 4 * 2, 1 / 2 * 2 * 128 * 4 * 2),
        ("collective-permute", (("f32", (8, 128)),), 8, 8 * 128 * 4, 8 * 128 * 4),  # start skipped
        ("all-to-all", (("pred", (4, 2)),), 8, 8, 7 / 8 * 8),
    ]
    summary = summarize_collectives(ops)
    assert [(c.kind, c.count) for c in summary] == [
        ("all-reduce", 2), ("all-gather", 1), ("reduce-scatter", 1), ("all-to-all", 1), ("collective-permute", 1)
    ]
    assert summary[0].operand_bytes == 64 + 1204


def _v5p_mesh():
    from swav_jax.plan.topology import topology_devices

    return Mesh(np.array(topology_devices("v5p:2x2x1")), ("data",))


@needs_libtpu
def test_matmul_and_psum_on_v5p_match_analytic_counts():
    """Per chip: x [M, K] @ w [K, N] in bf16, summed over rows, psum over 4 chips."""
    m, k, n = 256, 512, 1024
    mesh = _v5p_mesh()

    def step(x, w):
        return jax.lax.psum((x @ w).sum(0), "data")

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))
    x = jax.ShapeDtypeStruct((4 * m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    stats = program_stats(fn.lower(x, w).compile())

    matmul = 2 * m * k * n
    assert matmul <= stats.flops <= matmul + 2 * m * n  # plus at most the row sum's adds
    assert stats.argument_bytes == (m * k + k * n) * 2  # the local shard of x and all of w
    assert stats.output_bytes == n * 2
    assert stats.hbm_bytes >= stats.argument_bytes + stats.output_bytes
    assert stats.bytes_accessed >= (m * k + k * n + n) * 2  # every input read, the output written
    assert stats.collectives == (Collectives("all-reduce", 1, n * 2, 2 * 3 / 4 * n * 2),)


@needs_libtpu
def test_every_collective_kind_found_in_a_tpu_program():
    mesh = _v5p_mesh()
    ring = [(i, (i + 1) % 4) for i in range(4)]

    def step(x):
        gathered = jax.lax.all_gather(x, "data", tiled=True)  # [32, 128] from [8, 128]
        shifted = jax.lax.ppermute(x * gathered[:8], "data", ring)
        swapped = jax.lax.all_to_all(shifted, "data", 0, 0, tiled=True)
        return jax.lax.psum(swapped, "data")

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    ops = collective_ops(fn.lower(x).compile().as_text())
    block = 8 * 128 * 4
    assert sorted((op.kind, op.operand_bytes, op.group_size) for op in ops) == [
        ("all-gather", block, 4), ("all-reduce", block, 4), ("all-to-all", block, 4), ("collective-permute", block, 4)
    ]


def _stats(flops, bytes_accessed, link_bytes):
    collectives = (Collectives("all-reduce", 3, 0, link_bytes),) if link_bytes else ()
    return ProgramStats(1, 2, 0, 3, 4, flops, bytes_accessed, collectives)


def test_roofline_takes_the_slower_of_compute_and_memory_plus_collectives():
    v5p = CHIPS["v5p"]
    memory_bound = estimate_step(_stats(459e12, 2 * 2765e9, 600e9), v5p)
    assert (memory_bound.compute_s, memory_bound.memory_s, memory_bound.collective_s) == pytest.approx((1, 2, 1))
    assert memory_bound.step_s == pytest.approx(3) and memory_bound.bound == "memory"
    compute_bound = estimate_step(_stats(3 * 459e12, 2765e9, 0), v5p)
    assert compute_bound.step_s == pytest.approx(3) and compute_bound.bound == "compute"
    # A GPU without a published interconnect figure: no collective term.
    assert estimate_step(_stats(989.4e12, 0, 1e9), CHIPS["h100"]).collective_s is None
    assert _stats(0, 0, 0).hbm_bytes == 1 + 2 + 3 + 4


def test_run_estimate_of_the_800_epoch_recipe():
    config = ml_collections.ConfigDict({"batch_size": 4096})
    steps = 800 * steps_per_epoch(config, 1_281_167)  # ImageNet-1k train: 312 steps an epoch
    run = estimate_run(0.5, global_batch=4096, total_steps=steps, chips=64)
    assert steps == 249_600
    assert run.images_per_s == pytest.approx(8192)
    assert run.hours == pytest.approx(249_600 * 0.5 / 3600)
    assert run.chip_hours == pytest.approx(64 * run.hours)
    with pytest.raises(ValueError, match="step_s > 0"):
        estimate_run(0.0, global_batch=4096, total_steps=steps, chips=64)


def test_chip_table_is_complete_and_looked_up_by_topology():
    for key, chip in CHIPS.items():
        assert chip.hbm_bytes > 0 and chip.peak_bf16_flops > 0 and chip.hbm_bytes_per_s > 0
        assert chip.source.startswith("https://")
        assert chip_for(key) is chip
        # TPUs: what the compiler lets a program use is within 10% of the published capacity.
        assert (chip.usable_hbm_bytes is None) == key.startswith(("a100", "h1", "h2"))
        assert 0.9 < chip.program_hbm_bytes / chip.hbm_bytes < 1.1
    assert chip_for("v5p:4x4x4") is CHIPS["v5p"]
    assert chip_for("v5litepod:8x8") is CHIPS["v5e"]
    with pytest.raises(ValueError, match="unknown chip 'v9'"):
        chip_for("v9:2x2")


def test_topology_names():
    assert parse_topology("v5p:4x4x8").chips == 128
    assert parse_topology("v5litepod:16x16").name == "v5e:16x16"
    for bad, message in [("v5p-128", "expected GENERATION:SHAPE"), ("v5e:4x4x4", "2-D"), ("v4:4x4", "3-D")]:
        with pytest.raises(ValueError, match=message):
            parse_topology(bad)


@needs_libtpu
def test_topology_devices_are_one_per_chip_with_coordinates():
    from swav_jax.plan.topology import topology_devices

    for name, kind in [("v4:2x2x1", "TPU v4"), ("v5p:2x2x1", "TPU v5"), ("v5e:4x4", "TPU v5 lite"),
                       ("v6e:4x4", "TPU v6 lite")]:
        devices = topology_devices(name)
        assert len(devices) == parse_topology(name).chips
        assert {d.device_kind for d in devices} == {kind}
        assert len({tuple(d.coords) for d in devices}) == len(devices)
    with pytest.raises(ValueError, match="libtpu cannot build it"):
        topology_devices("v5p:3x3x3")


# A module with a convolution inside a fusion (operand shapes only at their definitions),
# a matrix product emitted as a convolution, a dot and a strided convolution.
CONV_HLO = """HloModule jit_f, num_partitions=4
%fused_conv (param_0.1: bf16[8,7,7,64], param_1.1: bf16[3,3,64,128]) -> bf16[8,7,7,128] {
  %param_0.1 = bf16[8,7,7,64]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1.1 = bf16[3,3,64,128]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %conv.1 = bf16[8,7,7,128]{3,2,1,0:T(8,128)(2,1)} convolution(%param_0.1, %param_1.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/backbone/conv_general_dilated" stack_frame_id=3}
}
ENTRY %main (x: bf16[8,7,7,64], w: bf16[3,3,64,128], m: f32[8,512], v: f32[512,300]) -> (bf16[8,7,7,128], f32[8,300]) {
  %x = bf16[8,7,7,64]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[3,3,64,128]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  %m = f32[8,512]{1,0:T(8,128)} parameter(2)
  %v = f32[512,300]{1,0:T(8,128)} parameter(3)
  %fusion.1 = bf16[8,7,7,128]{3,2,1,0:T(8,128)(2,1)} fusion(%x, %w), kind=kOutput, calls=%fused_conv, metadata={op_name="jit(f)/backbone/conv_general_dilated"}
  %strided = bf16[8,4,4,128]{3,2,1,0:T(8,128)(2,1)} convolution(%x, %w), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %matmul = f32[8,300]{1,0:T(8,128)} convolution(%m, %v), dim_labels=bf_io->bf, metadata={op_name="jit(f)/head/dot_general"}
  %dot.2 = f32[8,300]{1,0} dot(%m, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple = (bf16[8,7,7,128]{3,2,1,0:T(8,128)(2,1)}, f32[8,300]{1,0:T(8,128)}) tuple(%fusion.1, %matmul)
}
"""


def test_flop_breakdown_counts_taps_that_read_input_and_sorts_by_source():
    # 3x3, pad 1 over 7 positions: 7 * 3 - 2 = 19 (output, tap) pairs read input per
    # dimension; stride 2 (4 outputs): 2 + 3 + 3 + 2 = 10.
    conv = 2 * 8 * 128 * 64 * 19 * 19
    strided = 2 * 8 * 128 * 64 * 10 * 10
    matmul = 2 * 8 * 300 * 512
    assert flop_breakdown(CONV_HLO) == {CONVOLUTION: conv + strided, MATMUL: 2 * matmul}


def test_largest_arrays_skip_fusion_bodies_and_parameters_and_count_tiles():
    arrays = largest_arrays(CONV_HLO, count=10)
    assert [(a.shape, a.bytes) for a in arrays] == [
        ("bf16[8,7,7,128]", 8 * 7 * 8 * 128 * 2),  # the fusion's result; its body's root is not stored
        ("bf16[8,4,4,128]", 8 * 4 * 8 * 128 * 2),
        ("f32[8,300]", 8 * 384 * 4),  # tiled (8, 128)
        ("f32[8,300]", 8 * 300 * 4),  # no tiles in its layout
    ]
    assert arrays[0].op_name == "jit(f)/backbone/conv_general_dilated"


def test_tiled_bytes_round_the_minor_dimensions_up_to_the_tile():
    assert tiled_bytes((3, 3, 64), 32, (2, 1, 0), (8, 128)) == 3 * 8 * 128 * 4
    assert tiled_bytes((300,), 32, (0,), (512,)) == 512 * 4
    assert tiled_bytes((), 32, (), (128,)) == 128 * 4
    # Minor-to-major (3, 2, 0, 4, 1): W then H are the tiled dimensions.
    assert tiled_bytes((8, 1, 16, 16, 3), 32, (3, 2, 0, 4, 1), (8, 128)) == 8 * 1 * 16 * 128 * 3 * 4


@needs_libtpu
def test_flop_breakdown_agrees_with_xla_on_a_tpu_program():
    """Convolutions (padded, strided, their gradients) and a matrix product compiled for
    v5p: the breakdown is XLA's own FLOP count where nothing else computes."""
    mesh = _v5p_mesh()

    def conv(x, w, stride):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def compiled(f, *args):
        specs = tuple(P("data") if i == 0 else P() for i in range(len(args)))
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P("data"))).lower(*args).compile()

    x = jax.ShapeDtypeStruct((32, 7, 7, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    v = jax.ShapeDtypeStruct((64, 300), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    for f, args, expected in [
        (lambda x, w: conv(x, w, 1), (x, w), {CONVOLUTION: 2 * 8 * 128 * 64 * 19 * 19, MATMUL: 0}),
        (lambda x, w: conv(x, w, 2), (x, w), {CONVOLUTION: 2 * 8 * 128 * 64 * 10 * 10, MATMUL: 0}),
        (lambda x, v: x @ v, (x, v), {CONVOLUTION: 0, MATMUL: 2 * 8 * 7 * 7 * 64 * 300}),
    ]:
        program = compiled(f, *args)
        assert flop_breakdown(program.as_text()) == expected
        assert program.cost_analysis()["flops"] == sum(expected.values())
    # The forward and the weight gradient of a squared-output loss; XLA adds the square's
    # elementwise work.
    program = compiled(lambda x, w: jax.grad(lambda w: (conv(x, w, 1) ** 2).sum())(w)[None], x, w)
    breakdown = flop_breakdown(program.as_text())
    assert breakdown == {CONVOLUTION: 2 * 2 * 8 * 128 * 64 * 19 * 19, MATMUL: 0}
    assert 0 < program.cost_analysis()["flops"] - breakdown[CONVOLUTION] < 0.01 * breakdown[CONVOLUTION]


@needs_libtpu
def test_usable_hbm_is_what_the_compiler_lets_a_program_use():
    """A program needing 128 GiB per chip is refused by every generation's compiler with
    its 'available HBM', which the chip table records."""
    import re

    from swav_jax.plan.chips import GIB
    from swav_jax.plan.topology import topology_devices

    for topology in ("v4:2x2x1", "v5p:2x2x1", "v5e:2x2", "v6e:2x2"):
        mesh = Mesh(np.array(topology_devices(topology)), ("data",))
        fn = jax.jit(jax.shard_map(lambda x: jnp.sin(x) * 2, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
        x = jax.ShapeDtypeStruct((4 * 2**17, 2**17), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as refused:
            fn.lower(x).compile()
        available = re.search(r"available HBM \(([0-9.]+)G\)", str(refused.value))
        assert available, str(refused.value)
        assert chip_for(topology).usable_hbm_bytes == int(float(available.group(1)) * GIB), topology
