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
"""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections

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

    Groups should be well-connected devices, as the release's process groups of
    consecutive ranks: `jax.make_mesh` orders devices so that, for group sizes up to the
    devices per host, the inner axis stays within a host.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = sync_bn_mesh_shape(len(devices), int(config.model.sync_bn_group_size))
    return jax.make_mesh(shape, DATA_AXES, devices=devices)


def data_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The axes the batch is split over, and every data-parallel mean is taken over: all."""
    return tuple(mesh.axis_names)


def bn_group_axis(mesh: jax.sharding.Mesh) -> str | None:
    """The axis across BN groups ('data') when there are several groups, else None."""
    return "data" if mesh.shape["data"] > 1 else None
