"""Sinkhorn-Knopp equipartition codes (SwAV, docs/ALGORITHM.md §4).

Pure jax.numpy; imports nothing else from the package so it can be taken alone.

The release normalises the K x N matrix Q = exp(S / eps) in place: total sum, then
per iteration row sums (all-reduced) and column sums. Every such step multiplies Q
by a diagonal matrix on one side, so after any number of steps

    Q = diag_over_samples(b) @ P @ diag_over_prototypes(a)        ([N, K] layout)

for the fixed P = exp(S / eps) and two scaling vectors. Here only a [K] and b [n]
are iterated; the [n, K] matrix is read twice per iteration (two mat-vec products)
and written once at the end. The total-sum normalisation multiplies Q by a scalar,
which the next row normalisation cancels exactly, so it is folded away.

Stability: P is built as exp((S - r_k) / eps - c_i) with r_k the global max over
samples of prototype k's scores and c_i the (local) max over prototypes of sample
i's row-shifted logits. r_k is a per-prototype factor, which the first prototype
normalisation cancels exactly; c_i is a per-sample factor, carried in the initial b.
So the iterates are those of the release, but every row and every column of P
holds an entry equal to 1: no sum is ever zero and exp never overflows, whatever
epsilon and input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_sinkhorn_args(epsilon: float, num_iters: int) -> None:
    if not isinstance(num_iters, int) or isinstance(num_iters, bool) or num_iters < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
    if not float(epsilon) > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x, axis_name):
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def sinkhorn(
    scores: jax.Array,
    *,
    epsilon: float = 0.05,
    num_iters: int = 3,
    axis_name: str | None = None,
) -> jax.Array:
    """Equipartitioned soft assignments of samples to prototypes.

    Args:
      scores: [n, K] any float dtype; prototype scores of this device's samples.
      epsilon: entropic regularisation (> 0); codes are exp(scores / epsilon), scaled.
      num_iters: Sinkhorn iterations (>= 1).
      axis_name: mapped axis over which the batch is sharded (inside `shard_map` or
        `pmap`). Per-prototype sums and maxima are reduced over it, so the codes equal
        the unsharded computation on the concatenated batch. Per-sample sums are local.

    Returns:
      codes: [n, K] float32; every row sums to 1. Stop-gradient: no gradient flows
      back into `scores`.
    """
    _check_sinkhorn_args(epsilon, num_iters)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [n, K], got shape {scores.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    n, num_prototypes = scores.shape
    if n < 1 or num_prototypes < 1:
        raise ValueError(f"scores must be non-empty, got shape {scores.shape}")

    # Named, so that profiles and the compiled program's metadata (op_name) show its
    # instructions, e.g. its cross-device reductions (tests/test_plan.py counts them).
    with jax.named_scope("sinkhorn"):
        s = jax.lax.stop_gradient(scores).astype(jnp.float32)
        # N: the number of samples in the whole (all-device) problem.
        total_samples = _psum(jnp.float32(n), axis_name)

        logits = (s - _pmax(jnp.max(s, axis=0), axis_name)) * (1.0 / epsilon)  # [n, K], <= 0
        col_max = jnp.max(logits, axis=1)  # [n], <= 0
        p = jnp.exp(logits - col_max[:, None])  # [n, K], entries in [0, 1]
        # The release starts from Q = exp(S / eps): in this factorisation that is b =
        # exp(col_max), which lies in [0, 1] (entries may underflow to 0 harmlessly: each
        # prototype's best sample has col_max = 0, so no prototype sum vanishes).
        b = jnp.exp(col_max)
        a = None
        for it in range(num_iters):
            # Prototype (row) normalisation: each prototype receives mass 1/K.
            a = 1.0 / (num_prototypes * _psum(b @ p, axis_name))  # [K]
            if it + 1 < num_iters:
                # Sample (column) normalisation: each sample carries mass 1/N.
                b = 1.0 / (total_samples * (p @ a))  # [n]
        # The last column normalisation followed by "multiply by N" makes each row sum
        # to exactly 1: normalise a_k * P[i, k] over k.
        q = p * a
        return q / jnp.sum(q, axis=1, keepdims=True)
