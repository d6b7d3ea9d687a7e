"""The device augmentation's share of a train step on a TPU slice, compiled alone.

The train step (`swav-jax plan`) runs `data.augment.augment_views` on the uint8 crops
before the network. This compiles that augmentation by itself, for the same per-chip
crops on the same training mesh (the abstract batch of `methods.scaffold.abstract_batch`),
and prints its per-chip FLOPs, HBM traffic, temporaries and roofline time beside those of
the train step read from the plan's JSON (`swav-jax plan --json`). Then it compiles the
colour jitter and the Gaussian blur alone on one chip, on float32 crops of the per-chip
shapes (every crop goes through both: a random mask selects the result afterwards), to
show which part costs what.

Usage (from the repository root, with the tpu extra installed):
  python bench/tpu_augment.py --config swav_800ep --topology v5p:4x4x4 --plan PLAN.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.cli import load_config
from swav_jax.data.augment import augment_views, color_jitter, gaussian_blur
from swav_jax.mesh import data_axes, make_mesh
from swav_jax.methods.scaffold import abstract_batch, batch_spec
from swav_jax.plan.analysis import estimate_step, program_stats
from swav_jax.plan.chips import GIB, chip_for
from swav_jax.plan.topology import topology_devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", required=True)
    parser.add_argument("--plan", required=True, help="the plan's JSON for the same config and topology")
    args = parser.parse_args()
    config = load_config([f"--config={args.config}"])
    chip = chip_for(args.topology)
    mesh = make_mesh(config, topology_devices(args.topology))
    axes = data_axes(mesh)
    crops = abstract_batch(config, mesh, ("crops",))["crops"]
    dtype = jnp.dtype(config.model.dtype)

    def augment(rng, step, crops):
        return tuple(augment_views(rng, step, crops, config.augment, dtype=dtype, data_axis=axes))

    replicated = NamedSharding(mesh, P())
    program = jax.jit(jax.shard_map(
        augment, mesh=mesh, in_specs=(P(), P(), batch_spec("crops", mesh)), out_specs=batch_spec("crops", mesh),
    ))
    compiled = program.lower(
        jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated),
        jax.ShapeDtypeStruct((), np.int32, sharding=replicated),
        crops,
    ).compile()
    stats = program_stats(compiled)
    estimate = estimate_step(stats, chip)
    with open(args.plan) as f:
        train = json.load(f)["programs"]["train step"]
    print(f"{args.config} on {args.topology}, per chip:")
    print(f"{'':24}{'augmentation':>16}{'train step':>16}{'share':>10}")
    for label, ours, theirs in [
        ("TFLOP", stats.flops / 1e12, train["tflop"]),
        ("HBM traffic (GB)", stats.bytes_accessed / 1e9, train["hbm_traffic_gb"]),
        ("temporaries (GiB)", stats.temp_bytes / GIB, train["temp_gib"]),
        ("roofline (ms)", 1e3 * estimate.step_s, 1e3 * train["step_s"]),
    ]:
        print(f"{label:24}{ours:>16.4g}{theirs:>16.4g}{100 * ours / theirs:>9.1f}%")
    print(f"augmentation bound: {estimate.bound}")

    one_chip = NamedSharding(jax.sharding.Mesh(np.array(mesh.devices.flat[:1]), ("chip",)), P())
    parts = {
        "colour jitter": (color_jitter, lambda n: [(n, 4), np.float32, (n, 4), np.int32]),
        "Gaussian blur": (lambda x, sigma: gaussian_blur(x, sigma, config.augment.blur_kernel_size),
                          lambda n: [(n,), np.float32]),
    }
    print("alone on one chip, float32 crops:")
    for part, (fn, extra) in parts.items():
        for group in crops:
            n, b, size = group.shape[0], group.shape[1] // mesh.size, group.shape[2]
            shapes = [(n * b, size, size, 3), np.float32] + extra(n * b)
            structs = [jax.ShapeDtypeStruct(shapes[i], shapes[i + 1], sharding=one_chip) for i in range(0, len(shapes), 2)]
            part_stats = program_stats(jax.jit(fn).lower(*structs).compile())
            print(f"  {part} [{n * b}, {size}, {size}, 3]: {part_stats.bytes_accessed / 1e9:.3g} GB, "
                  f"{part_stats.flops / 1e9:.3g} GFLOP, roofline {1e3 * estimate_step(part_stats, chip).step_s:.3g} ms")


if __name__ == "__main__":
    main()
