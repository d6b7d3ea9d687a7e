"""Cross-device traffic of the sharded Sinkhorn, read from the optimised HLO (SPEC §2).

SPEC: one scalar and one K-vector per iteration, features never gathered. Compiled over
8 host devices, the only collectives must be all-reduces of scalars and K-vectors; their
number grows with num_iters and their sizes do not change with the batch size.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax import sinkhorn

K = 300  # differs from every local and global batch size below
COLLECTIVES = ("all-gather", "reduce-scatter", "all-to-all", "collective-permute", "collective-broadcast",
               "send", "recv")


def _compiled_hlo(global_batch: int, num_iters: int) -> str:
    mesh = jax.make_mesh((8,), ("data",))
    fn = jax.jit(
        jax.shard_map(
            lambda s: sinkhorn(s, num_iters=num_iters, axis_name="data"),
            mesh=mesh, in_specs=P("data"), out_specs=P("data"),
        )
    )
    scores = jax.device_put(jnp.zeros((global_batch, K), jnp.float32), NamedSharding(mesh, P("data")))
    return fn.lower(scores).compile().as_text()


def _all_reduce_operands(hlo: str) -> list[list[tuple[int, ...]]]:
    """Per all-reduce instruction (XLA may combine several into one tuple all-reduce),
    the shapes of the arrays it reduces."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if m:
            shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
            out.append([tuple(int(d) for d in s.split(",") if d) for s in shapes])
    return out


@pytest.mark.parametrize("num_iters", [1, 3])
def test_sinkhorn_all_reduces_carry_only_scalars_and_k_vectors(num_iters):
    per_batch = {}
    for global_batch in (8 * 4, 8 * 16):
        hlo = _compiled_hlo(global_batch, num_iters)
        for op in COLLECTIVES:
            assert not re.search(rf"\s{op}(-start)?\(", hlo), f"unexpected {op} in the sharded Sinkhorn"
        per_batch[global_batch] = _all_reduce_operands(hlo)

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
