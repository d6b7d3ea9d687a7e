"""Cross-device traffic of the sharded Sinkhorn, read from the optimised HLO.

One scalar and one K-vector per iteration cross devices, features are never gathered.
Compiled over 8 host CPU devices and, when libtpu is installed, for a TPU v5p slice
(2x2x1, 4 chips; compile only), the only collectives must be all-reduces of scalars and
K-vectors; their number grows with num_iters and their sizes do not change with the
batch size.
"""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swav_jax import sinkhorn
from swav_jax.plan.analysis import collective_ops

K = 300  # differs from every local and global batch size below


def _devices(platform):
    if platform == "cpu":
        return jax.devices()
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu not installed (pip install "swav-jax[tpu]"): no TPU to compile for')
    from swav_jax.plan.topology import topology_devices

    return topology_devices("v5p:2x2x1")


def _collectives(devices, global_batch: int, num_iters: int):
    mesh = Mesh(np.array(devices), ("data",))
    fn = jax.jit(
        jax.shard_map(
            lambda s: sinkhorn(s, num_iters=num_iters, axis_name="data"),
            mesh=mesh, in_specs=P("data"), out_specs=P("data"),
        )
    )
    scores = jax.ShapeDtypeStruct((global_batch, K), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    hlo = fn.lower(scores).compile().as_text()
    assert not re.search(r"\s(send|recv)(-done)?\(", hlo), "unexpected point-to-point transfer"
    return collective_ops(hlo)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("num_iters", [1, 3])
def test_sinkhorn_all_reduces_carry_only_scalars_and_k_vectors(platform, num_iters):
    devices = _devices(platform)
    n = len(devices)
    per_batch = {}
    for global_batch in (n * 4, n * 16):
        ops = _collectives(devices, global_batch, num_iters)
        assert {op.kind for op in ops} == {"all-reduce"}, [op.kind for op in ops]
        assert {op.group_size for op in ops} == {n}
        per_batch[global_batch] = [[dims for _, dims in op.shapes] for op in ops]

    small, large = per_batch.values()
    assert small == large, "all-reduce operands depend on the batch size"
    operands = [shape for instruction in small for shape in instruction]
    assert set(operands) <= {(), (K,)}, operands
    # One K-vector pmax (the stabilising per-prototype maximum) and one K-vector psum
    # (prototype sums) per iteration; the scalar is N, the global sample count, needed
    # only by the column normalisations between iterations.
    assert operands.count((K,)) == 1 + num_iters
    assert operands.count(()) == (1 if num_iters > 1 else 0)
    # The K-vector reductions form a dependency chain, so each is its own all-reduce
    # (XLA may attach the independent scalar to one of them).
    assert all(instruction.count((K,)) == 1 for instruction in small)
