"""Mesh layout for BatchNorm synchronised in groups of devices (SPEC §6).

The paper synchronised BN in groups of 8 GPUs. `jax.shard_map` has no
`axis_index_groups`, so groups come from the mesh instead: a 2-D mesh of shape
(num_devices // group_size, group_size) whose inner axis spans one group. BN averages
its statistics over the inner axis only; everything else that is data-parallel
(Sinkhorn sums, gradient means, metrics) reduces over both axes.

How the trainer builds it (`sync_bn_group_size` = 0 means one group of all devices, so
global BN is the same code path with a (1, n) mesh):

    shape = sync_bn_mesh_shape(jax.device_count(), config.model.sync_bn_group_size)
    mesh = jax.make_mesh(shape, (DATA_AXIS, BN_AXIS))      # e.g. ('data', 'bn')
    batch_spec = P(None, (DATA_AXIS, BN_AXIS))             # crops [n_g, B, H, W, C]
    model = build_model(config.model, bn_axis_name=BN_AXIS)
    # inside the shard_map body:
    #   sinkhorn / swav_loss(axis_name=(DATA_AXIS, BN_AXIS)),
    #   grads = lax.pmean(grads, (DATA_AXIS, BN_AXIS))
    # The updated batch_stats are equal within a group and differ between groups.
    # Either pmean them over DATA_AXIS in the body, which keeps the state replicated
    # (out_specs P()) and holds the mean over groups of the per-group running stats
    # (the running update is linear), or keep them per group on a leading axis with
    # out_specs P(DATA_AXIS). The release checkpoints rank 0's, i.e. group 0's.

Groups should be well-connected devices, as the release's process groups of
consecutive ranks: `jax.make_mesh` orders devices so that, for group sizes up to the
devices per host, the inner axis stays within a host (check `mesh.devices`).
"""

from __future__ import annotations


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
