"""swav_jax.kmeans against the float64 reference of the release's procedure, sharded and
unsharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from deepcluster_reference import first_rows, kmeans_ref
from swav_jax.kmeans import spherical_kmeans


def kmeans(x, key, mask=None, **kwargs):
    fn = jax.jit(functools.partial(spherical_kmeans, **kwargs))
    centroids, labels = fn(jnp.asarray(x), key, mask=None if mask is None else jnp.asarray(mask))
    assert centroids.dtype == jnp.float32 and labels.dtype == jnp.int32
    return np.asarray(centroids), np.asarray(labels)


def normalized(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("num_iters", [0, 1, 3, 10])
def test_matches_float64_reference(num_iters):
    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)  # not unit: normalised inside
    key = jax.random.key(3)
    centroids, labels = kmeans(x, key, num_clusters=6, num_iters=num_iters)
    ref_c, ref_labels = kmeans_ref(x, first_rows(key, 60, 6), num_iters)
    np.testing.assert_allclose(centroids, ref_c, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    if num_iters == 10:  # the iterations moved the assignment away from the initial one
        assert np.any(ref_labels != kmeans_ref(x, first_rows(key, 60, 6), 0)[1])


def test_separated_clusters_found_exactly():
    rng = np.random.default_rng(1)
    directions = rng.normal(size=(5, 8))
    x = np.concatenate([d + 0.05 * rng.normal(size=(40, 8)) for d in directions]).astype(np.float32)
    truth = np.repeat(np.arange(5), 40)
    # A key whose initial rows fall one in each cluster.
    key = next(
        k for k in map(jax.random.key, range(100)) if len(set(truth[first_rows(k, 200, 5)])) == 5
    )
    centroids, labels = kmeans(x, key, num_clusters=5, num_iters=10)
    # Centroid j is the cluster of initial row j; every row is in its own cluster.
    cluster_of_centroid = truth[first_rows(key, 200, 5)]
    np.testing.assert_array_equal(cluster_of_centroid[labels], truth)
    means = normalized([normalized(x[truth == c]).mean(0) for c in cluster_of_centroid])
    np.testing.assert_allclose(centroids, means, atol=1e-5)


def test_empty_cluster_keeps_its_centroid():
    base = np.random.default_rng(2).normal(size=(20, 6)).astype(np.float32)
    x = np.concatenate([base, base])  # every point twice: rows i and i + 20
    k = 4
    # A key whose initial rows hold a point twice: two identical centroids, the later
    # one loses every tie (argmax takes the first), so it starts empty.
    key = next(
        key for key in map(jax.random.key, range(200))
        if len(set(first_rows(key, 40, k) % 20)) < k
    )
    rows = first_rows(key, 40, k)
    empty = next(j for j in range(k) if rows[j] % 20 in (rows[:j] % 20))
    assert np.sum(kmeans_ref(x, rows, 0)[1] == empty) == 0  # no member in the first update
    for iters in (1, 4):
        centroids, labels = kmeans(x, key, num_clusters=k, num_iters=iters)
        ref_c, ref_labels = kmeans_ref(x, rows, iters)
        np.testing.assert_allclose(centroids, ref_c, atol=1e-5)
        np.testing.assert_array_equal(labels, ref_labels)
        if iters == 1:
            np.testing.assert_allclose(centroids[empty], normalized(x)[rows[empty]], atol=1e-7)


def test_masked_rows_neither_count_nor_get_labels():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    valid = np.ones(50, bool)
    valid[rng.choice(50, 12, replace=False)] = False
    x[~valid] = np.where(rng.random((12, 6)) < 0.5, np.nan, 1e30)  # garbage, e.g. unwritten rows
    key = jax.random.key(4)
    centroids, labels = kmeans(x, key, valid, num_clusters=4, num_iters=5)
    ref_c, ref_labels = kmeans_ref(np.where(valid[:, None], x, 1.0), first_rows(key, 50, 4, valid), 5, valid)
    np.testing.assert_allclose(centroids, ref_c, atol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels)
    assert np.all(labels[~valid] == -1) and np.all(labels[valid] >= 0)


def test_too_few_valid_rows_give_nan_centroids_and_no_labels():
    x = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)
    valid = np.zeros(10, bool)
    valid[:3] = True
    centroids, labels = kmeans(x, jax.random.key(0), valid, num_clusters=4, num_iters=2)
    assert np.all(np.isnan(centroids))
    np.testing.assert_array_equal(labels, -1)


def test_chunked_equals_one_shot():
    x = np.random.default_rng(6).normal(size=(37, 6)).astype(np.float32)
    key = jax.random.key(5)
    whole = kmeans(x, key, num_clusters=4, num_iters=5)
    chunked = kmeans(x, key, num_clusters=4, num_iters=5, chunk_rows=5)  # 37 = 7 x 5 + 2
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-6)
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_array_equal(whole[1], kmeans_ref(x, first_rows(key, 37, 4), 5)[1])


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((8, 4), dict(num_clusters=0), "num_clusters"),
        ((8, 4), dict(num_clusters=2.0), "num_clusters"),
        ((8, 4), dict(num_iters=-1), "num_iters"),
        ((8, 4), dict(chunk_rows=0), "chunk_rows"),
        ((3, 4), {}, "at least num_clusters=4 rows"),
        ((8,), {}, r"shape \[n, D\]"),
        ((2, 4, 4), {}, r"shape \[n, D\]"),
        ((8, 4), dict(mask=jnp.ones((7,), bool)), "mask"),
        ((8, 4), dict(mask=jnp.ones((8,), jnp.int32)), "mask"),
    ],
)
def test_bad_arguments(shape, kwargs, match):
    kwargs = {"num_clusters": 4, "num_iters": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        spherical_kmeans(jnp.zeros(shape), jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="floating"):
        spherical_kmeans(jnp.zeros((8, 4), jnp.int32), jax.random.key(0), num_clusters=4, num_iters=2)


@pytest.mark.parametrize("mesh_shape,axes", [((8,), "data"), ((4, 2), ("a", "b"))])
def test_sharded_equals_unsharded_and_reference(mesh_shape, axes):
    names = (axes,) if isinstance(axes, str) else axes
    mesh = jax.make_mesh(mesh_shape, names)
    n_local, k, iters = 12, 5, 4
    n = 8 * n_local
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    valid = rng.random(n) > 0.2  # invalid rows on every device, the source included
    x[~valid] = np.nan
    key = jax.random.key(6)

    def local(x, key, mask):
        return spherical_kmeans(
            x, key, mask=mask, num_clusters=k, num_iters=iters, axis_name=axes, chunk_rows=5
        )

    sharded_fn = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P(axes), P(), P(axes)), out_specs=(P(), P(axes)),
    ))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    centroids, labels = jax.block_until_ready(
        sharded_fn(put(jnp.asarray(x), P(axes)), put(key, P()), put(jnp.asarray(valid), P(axes)))
    )
    centroids, labels = np.asarray(centroids), np.asarray(labels)

    # The initial rows come from the first device's shard: rows [0, n_local).
    rows = first_rows(key, n_local, k, valid[:n_local])
    ref_c, ref_labels = kmeans_ref(np.where(valid[:, None], x, 1.0), rows, iters, valid)
    np.testing.assert_allclose(centroids, ref_c, atol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels)

    # Unsharded on a row permutation of the same data whose initial rows are the same
    # points: the same centroids, and the same label for every point.
    perm = np.asarray(jax.random.permutation(key, n))
    order = np.empty(n, int)
    order[perm[:k]] = rows
    order[np.sort(perm[k:])] = np.setdiff1d(np.arange(n), rows)
    one_c, one_labels = kmeans(x[order], key, valid[order], num_clusters=k, num_iters=iters)
    np.testing.assert_allclose(one_c, centroids, atol=1e-6)
    np.testing.assert_array_equal(one_labels, labels[order])
