"""The device mesh of training: data parallel, BatchNorm synchronised in groups of devices.

The paper synchronised BN in groups of 8 GPUs. `jax.shard_map` has no
`axis_index_groups`, so groups come from the mesh instead: a 2-D mesh ('data', 'bn') of
shape (num_devices // group_size, group_size) whose inner axis spans one group. BN
averages its statistics over 'bn' only; everything else that is data-parallel (Sinkhorn
sums, gradient means, metrics) reduces over both axes, and the batch is split over both
(`PartitionSpec(None, ('data', 'bn'))` for crops [n_g, B, H, W, C]). `sync_bn_group_size`
0 means one group of all devices, so global BN is the same code path with a (1, n) mesh.

After a step the BN statistics are equal within a group and differ between groups; the
step averages them over 'data', which keeps the state replicated and holds the mean over
groups of the per-group running statistics (the running update is linear). The release
checkpoints rank 0's, i.e. group 0's.

On TPU a group is a box of neighbouring chips: the slice's chips form a grid (slice,
x, y, z, core on chip) and the grid is tiled by the most compact box of `group_size`
devices whose sides divide the grid's. Such a box always exists when the group size
divides the device count (each prime factor can be placed independently), unlike the
factorisations `jax.make_mesh` looks for (it cannot fit a group of 8 into a 4x4x4 slice).
Devices without chip coordinates (CPU, GPU) keep `jax.make_mesh`'s order, which puts
consecutive devices of one process in a group.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh

DATA_AXES = ("data", "bn")


def sync_bn_mesh_shape(num_devices: int, group_size: int) -> tuple[int, int]:
    """(num_groups, group_size) of the 2-D data mesh for BN synchronised in groups.

    Args:
      num_devices: devices of the data-parallel mesh (all processes).
      group_size: devices per BN group (config `model.sync_bn_group_size`); 0 means all
        devices in one group (global BN).
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if group_size == 0:
        group_size = num_devices
    if group_size < 0 or num_devices % group_size:
        raise ValueError(
            f"model.sync_bn_group_size must be 0 or a positive divisor of the device "
            f"count {num_devices}, got {group_size}"
        )
    return num_devices // group_size, group_size


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The data-parallel ('data', 'bn') mesh over `devices` (default: all devices of all
    processes), BN groups of `config.model.sync_bn_group_size` devices along 'bn'.

    Groups are well-connected devices, as the release's process groups of consecutive
    ranks: on TPU a compact box of chips (module docstring); elsewhere `jax.make_mesh`'s
    order, which for group sizes up to the devices per host keeps a group within a host.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = sync_bn_mesh_shape(len(devices), int(config.model.sync_bn_group_size))
    grid = _chip_grid(devices)
    if grid is None:
        return jax.make_mesh(shape, DATA_AXES, devices=devices)
    return Mesh(_tile_by_groups(grid, shape[1]), DATA_AXES, axis_types=(AxisType.Explicit,) * 2)


def data_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The axes the batch is split over, and every data-parallel mean is taken over: all."""
    return tuple(mesh.axis_names)


def bn_group_axis(mesh: jax.sharding.Mesh) -> str | None:
    """The axis across BN groups ('data') when there are several groups, else None."""
    return "data" if mesh.shape["data"] > 1 else None


def _chip_grid(devices: Sequence[jax.Device]) -> np.ndarray | None:
    """TPU devices as an array indexed by (slice, x, y, z, core on chip); None for devices
    without chip coordinates, or for a subset of a slice that does not fill a box."""
    if any(d.platform != "tpu" for d in devices):
        return None
    position = np.array([(getattr(d, "slice_index", 0), *d.coords, d.core_on_chip) for d in devices])
    position -= position.min(axis=0)
    grid = np.full(tuple(position.max(axis=0) + 1), None, dtype=object)
    grid[tuple(position.T)] = devices
    return None if any(d is None for d in grid.flat) else grid


def _tile_by_groups(grid: np.ndarray, group_size: int) -> np.ndarray:
    """[grid.size // group_size, group_size] devices: row i is the i-th box of the most
    compact tiling of `grid` by boxes of `group_size` devices."""
    box = _group_box(grid.shape, group_size)
    # (n0, b0, n1, b1, ...) -> (n0, n1, ..., b0, b1, ...): box index first, offset inside last.
    split = grid.reshape([n for extent, b in zip(grid.shape, box) for n in (extent // b, b)])
    order = list(range(0, 2 * grid.ndim, 2)) + list(range(1, 2 * grid.ndim, 2))
    return split.transpose(order).reshape(grid.size // group_size, group_size)


def _group_box(extent: Sequence[int], group_size: int) -> tuple[int, ...]:
    """Sides of the box of `group_size` devices that tiles a grid of `extent` (slice, x,
    y, z, core) most compactly: within one slice if possible (slices talk over the data
    centre network), then the fewest chip-to-chip hops from corner to corner (the sum
    over x, y, z of side - 1); the cores of a chip cost nothing. Ties go to the
    lexicographically smallest sides."""
    def cost(box):
        return box[0], sum(side - 1 for side in box[1:4])

    boxes = [
        box
        for box in itertools.product(*([d for d in range(1, e + 1) if e % d == 0] for e in extent))
        if math.prod(box) == group_size
    ]
    # Never empty when group_size divides the grid's size: each prime power of the group
    # size can be spread over the grid's sides independently.
    return min(boxes, key=cost)
