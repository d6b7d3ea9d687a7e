"""Distributed spherical k-means (cosine similarity, unit centroids).

Pure jax.numpy; imports nothing else from the package so it can be taken alone.

One function for both users in this package:

  DeepCluster-v2  every epoch, K = 3,000 per head, 10 iterations, over the memory bank,
                  which stays sharded over the devices of every process;
  ExCB            once, K centroids from 50 iterations over gathered projections.

The procedure is the DeepCluster-v2 release's (`cluster_memory`):

  1. K distinct random rows of ONE device's shard (the device at index 0 of
     `axis_name`; the release takes them from rank 0's bank) become the centroids and
     are broadcast to every device;
  2. `num_iters` times: every valid local row goes to its most similar centroid
     (argmax of dot products); per-cluster sums and counts are formed locally and
     summed over `axis_name` (only K x D sums and K counts cross devices, never the
     rows); every cluster with members moves to the normalised mean of its members,
     an empty cluster keeps its centroid;
  3. a last assignment gives the local labels.

The [n, K] similarity matrix is never built at once: rows are taken in chunks of
`chunk_rows`, and one pass over the chunks both assigns and accumulates the sums (as a
one-hot matrix product, which keeps the sums deterministic on accelerators, where a
scatter-add is not). The cluster mean's normalisation uses the sum (sum / ||sum||, the
same direction as mean / ||mean||).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Entries of the [chunk_rows, K] similarity block per chunk (256 MiB in float32).
_SCORE_ELEMENTS = 2**26
_HIGHEST = jax.lax.Precision.HIGHEST

AxisName = str | tuple[str, ...] | None


def _l2_normalize(x: jax.Array) -> jax.Array:
    # As torch.nn.functional.normalize: a zero row stays zero.
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_args(x, mask, num_clusters, num_iters, chunk_rows) -> None:
    if not _is_count(num_clusters, 1):
        raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
    if not _is_count(num_iters, 0):
        raise ValueError(f"num_iters must be an int >= 0, got {num_iters!r}")
    if chunk_rows is not None and not _is_count(chunk_rows, 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape [n, D], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if x.shape[0] < num_clusters or x.shape[1] < 1:
        raise ValueError(
            f"x must hold at least num_clusters={num_clusters} rows (per device) of dimension "
            f">= 1, got shape {x.shape}"
        )
    if mask is not None and (mask.shape != (x.shape[0],) or mask.dtype != jnp.bool_):
        raise ValueError(
            f"mask must be a bool array of shape ({x.shape[0]},), got {mask.dtype} {mask.shape}"
        )


def _initial_centroids(x, valid, key, num_clusters: int, axis_name: AxisName):
    """K distinct valid rows of the index-0 device's x, on every device.

    The rows are the first K valid entries of `jax.random.permutation(key, n)` (without
    a mask: exactly its first K). Returns ([K, D] rows, [] bool: that device has at
    least K valid rows).
    """
    perm = jax.random.permutation(key, x.shape[0])
    # Valid rows first, each group in permutation order (argsort is stable).
    rows = perm[jnp.argsort(~valid[perm], stable=True)[:num_clusters]]
    first, num_valid = x[rows], jnp.sum(valid, dtype=jnp.int32)
    if axis_name is not None:
        # Broadcast from device 0: its values plus exact zeros, so unchanged.
        is_source = jax.lax.axis_index(axis_name) == 0
        first = jax.lax.psum(jnp.where(is_source, first, 0.0), axis_name)
        num_valid = jax.lax.psum(jnp.where(is_source, num_valid, 0), axis_name)
    return first, num_valid >= num_clusters


def spherical_kmeans(
    x: jax.Array,
    key: jax.Array,
    *,
    num_clusters: int,
    num_iters: int,
    mask: jax.Array | None = None,
    axis_name: AxisName = None,
    chunk_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Spherical k-means over rows sharded across devices (see the module docstring).

    Call under `jax.jit`; with `axis_name`, inside `jax.shard_map` (or `pmap`) where
    each device holds its own rows and the same `key`.

    Args:
      x: [n, D] float, this device's rows (n >= num_clusters); L2-normalised here (the
        DeepCluster bank and ExCB's projections are unit already: unchanged up to
        rounding).
      key: PRNG key for the initial rows; the same on every device (only the index-0
        device's draw is used).
      num_clusters: K.
      num_iters: centroid updates (>= 0); a final assignment follows them.
      mask: optional [n] bool, True for rows to cluster. Masked rows (padding, bank rows
        not yet written; their values may be anything, NaN included) are neither counted
        in the sums nor labelled.
      axis_name: mesh axis name, or tuple of names, the rows are sharded over; None for
        one device. The result equals the unsharded run on the concatenated rows whose
        initial rows are the same.
      chunk_rows: rows per chunk of the similarity matrix; default: as many as keep a
        chunk's [chunk_rows, K] block at 2**26 entries.

    Returns:
      centroids: [K, D] float32 unit rows, the same on every device. All NaN when the
        index-0 device has fewer than K valid rows (check `jnp.isfinite` if a mask can
        leave so few).
      labels: [n] int32, each row's centroid by the last assignment; -1 for masked
        rows, and for every row when the centroids are NaN.
    """
    _check_args(x, mask, num_clusters, num_iters, chunk_rows)
    n, dim = x.shape
    valid = jnp.ones((n,), jnp.bool_) if mask is None else mask
    # Zero rows where masked, so that their contents (even NaN) reach no sum.
    x = jnp.where(valid[:, None], _l2_normalize(x.astype(jnp.float32)), 0.0)
    chunk = chunk_rows or max(1, min(n, _SCORE_ELEMENTS // num_clusters))
    pad = -n % chunk
    x_chunks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, dim)
    valid_chunks = jnp.pad(valid, (0, pad)).reshape(-1, chunk)
    cluster_ids = jnp.arange(num_clusters, dtype=jnp.int32)

    def assign(centroids, rows):  # [chunk, D] -> [chunk] int32
        similarity = jnp.dot(rows, centroids.T, precision=_HIGHEST)
        return jnp.argmax(similarity, axis=-1).astype(jnp.int32)

    def chunk_sums(centroids, rows, ok):  # member sums [K, D] and counts [K] of one chunk
        members = (assign(centroids, rows)[:, None] == cluster_ids) & ok[:, None]  # [chunk, K]
        sums = jnp.dot(members.T.astype(jnp.float32), rows, precision=_HIGHEST)
        return sums, jnp.sum(members, axis=0, dtype=jnp.int32)

    def update(_, centroids):
        def accumulate(carry, chunk_data):
            return jax.tree.map(jnp.add, carry, chunk_sums(centroids, *chunk_data)), None

        # The first chunk starts the sums: a carry computed from this device's rows has
        # the same (device-varying) type under shard_map as the scan's output.
        first = chunk_sums(centroids, x_chunks[0], valid_chunks[0])
        (sums, counts), _ = jax.lax.scan(accumulate, first, (x_chunks[1:], valid_chunks[1:]))
        sums, counts = _psum(sums, axis_name), _psum(counts, axis_name)
        return jnp.where((counts > 0)[:, None], _l2_normalize(sums), centroids)

    centroids, enough = _initial_centroids(x, valid, key, num_clusters, axis_name)
    centroids = jax.lax.fori_loop(0, num_iters, update, centroids)
    labels = jax.lax.map(lambda rows: assign(centroids, rows), x_chunks).reshape(-1)[:n]
    return jnp.where(enough, centroids, jnp.nan), jnp.where(valid & enough, labels, -1)
