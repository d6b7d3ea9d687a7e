"""The training mesh on real TPU slice shapes (libtpu's compile-only devices) and on CPU.

Every device is used once, the mesh has the (groups, group size) shape, and each BN group
is a box of neighbouring chips: the bounding box of its (slice, x, y, z, core) positions
holds exactly group-size devices, so no group has a hole or a far-away member.
"""

import importlib.util
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.mesh import bn_group_axis, data_axes, make_mesh

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu not installed (pip install "swav-jax[tpu]"): no TPU topologies to compile for',
)

# The slices of the docs' tables: v4 (one device per chip), v5e, v5p, v6e.
TOPOLOGIES = ["v4:2x2x1", "v4:4x4x4", "v5e:4x4", "v5e:8x8", "v5e:16x16", "v5p:2x2x1", "v5p:4x4x4",
              "v5p:4x4x8", "v5p:8x8x8", "v6e:4x4", "v6e:8x8"]


def _config(group_size):
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"sync_bn_group_size": group_size})
    return config


def _devices(topology, **kwargs):
    from swav_jax.plan.topology import topology_devices

    return topology_devices(topology, **kwargs)


def _position(device):
    return (getattr(device, "slice_index", 0), *device.coords, device.core_on_chip)


def _box_sides(group):
    positions = np.array([_position(d) for d in group])
    return tuple(int(side) for side in positions.max(axis=0) - positions.min(axis=0) + 1)


@needs_libtpu
@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("group_size", [0, 4, 8])
def test_groups_are_boxes_of_neighbouring_chips(topology, group_size):
    devices = _devices(topology)
    n = len(devices)
    if group_size and n % group_size:
        pytest.skip(f"{group_size} does not divide {n} chips")
    assert {d.core_on_chip for d in devices} == {0}  # one device per chip, v4 included
    mesh = make_mesh(_config(group_size), devices)
    size = group_size or n
    assert mesh.devices.shape == (n // size, size) and mesh.axis_names == data_axes(mesh) == ("data", "bn")
    assert bn_group_axis(mesh) == ("data" if n > size else None)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    for group in mesh.devices:
        assert math.prod(_box_sides(group)) == size, (topology, _box_sides(group))


@needs_libtpu
@pytest.mark.parametrize(
    "topology,group_size,chip_sides",
    [
        ("v5p:4x4x4", 8, (2, 2, 2)),  # jax.make_mesh((8, 8)) raises here
        ("v5p:8x8x8", 4, (1, 2, 2)),  # and here (a group of 4 in an 8x8x8 slice)
        ("v5p:4x4x8", 16, (2, 2, 4)),
        ("v5e:16x16", 8, (1, 2, 4)),
        ("v6e:8x8", 16, (1, 4, 4)),
        ("v4:4x4x4", 64, (4, 4, 4)),
    ],
)
def test_groups_take_the_most_compact_box(topology, group_size, chip_sides):
    """The fewest chip-to-chip hops across a group (sorted x, y, z sides; ties between
    orientations are broken either way)."""
    mesh = make_mesh(_config(group_size), _devices(topology))
    assert {tuple(sorted(_box_sides(group)[1:4])) for group in mesh.devices} == {chip_sides}


@needs_libtpu
def test_groups_stay_within_a_slice():
    devices = _devices("v5p:2x2x1", num_slices=2)
    mesh = make_mesh(_config(4), devices)
    assert [{d.slice_index for d in group} for group in mesh.devices] == [{0}, {1}]
    mesh = make_mesh(_config(0), devices)  # one group of all: spans both, once each
    assert _box_sides(mesh.devices[0]) == (2, 2, 2, 1, 1)


@needs_libtpu
def test_bn_group_mesh_compiles_for_v5p_128():
    """The paper's BN groups of 8 on a v5p-128: a BN-style mean over 'bn' and a gradient
    style mean over both axes compile into all-reduces over groups of 8 and of 64."""
    mesh = make_mesh(_config(8), _devices("v5p:4x4x4"))
    axes = data_axes(mesh)

    def step(x):
        return jax.lax.pmean(x.mean(0), "bn")[None], jax.lax.pmean(x.mean(0), axes)

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(axes), out_specs=(P("data"), P())))
    x = jax.ShapeDtypeStruct((64 * 2, 16), jnp.float32, sharding=NamedSharding(mesh, P(axes)))
    hlo = fn.lower(x).compile().as_text()
    from swav_jax.plan.analysis import collective_ops

    group_sizes = sorted(op.group_size for op in collective_ops(hlo) if op.kind == "all-reduce")
    assert group_sizes == [8, 64]


def test_cpu_mesh_keeps_jax_make_mesh_order():
    devices = jax.devices()
    mesh = make_mesh(_config(4), devices)
    assert bn_group_axis(mesh) == "data"
    np.testing.assert_array_equal(mesh.devices, jax.make_mesh((2, 4), ("data", "bn"), devices=devices).devices)
