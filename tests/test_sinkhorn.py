"""swav_jax.sinkhorn against the float64 reference of docs/ALGORITHM.md §4-§6, sharded and unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax import sinkhorn
from swav_reference import sinkhorn_ref


def _cosine_scores(rng, n, k):
    """Scores as SwAV produces them: cosines of unit vectors, in [-1, 1]."""
    z = rng.normal(size=(n, 16))
    c = rng.normal(size=(k, 16))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return (z @ c.T).astype(np.float32)


@pytest.mark.parametrize(
    "n,k,epsilon,num_iters",
    [
        (64, 30, 0.05, 3),  # n > K
        (8, 100, 0.05, 3),  # K > n: small batch
        (1, 7, 0.05, 3),  # a single sample
        (256, 3000, 0.05, 3),
        (32, 500, 0.02, 3),
        (40, 40, 0.01, 10),
        (16, 64, 0.05, 1),
    ],
)
def test_matches_float64_reference(n, k, epsilon, num_iters):
    scores = _cosine_scores(np.random.default_rng(n * k), n, k)
    codes = sinkhorn(jnp.asarray(scores), epsilon=epsilon, num_iters=num_iters)
    assert codes.shape == (n, k) and codes.dtype == jnp.float32
    np.testing.assert_allclose(codes, sinkhorn_ref(scores, epsilon, num_iters), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.sum(codes, axis=1), 1.0, atol=1e-5)


def test_extreme_scores_small_epsilon():
    """Scores at the ends of [-1, 1] with eps 0.01: exp(S/eps) spans e^-100..e^100.

    Includes a prototype far from every sample (its row of exp would underflow in
    float32 without the per-prototype shift) and a sample far from every prototype.
    """
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.5, 1.0, size=(24, 12)).astype(np.float32)
    scores[:, 3] = -1.0  # a dead prototype
    scores[5, :] = -0.99  # an outlier sample
    codes = sinkhorn(jnp.asarray(scores), epsilon=0.01, num_iters=3)
    assert np.all(np.isfinite(codes))
    np.testing.assert_allclose(codes, sinkhorn_ref(scores, 0.01, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_reduced_precision_input_is_finite_and_accurate(dtype):
    scores = jnp.asarray(_cosine_scores(np.random.default_rng(1), 128, 300), dtype)
    codes = sinkhorn(scores, epsilon=0.02)
    assert codes.dtype == jnp.float32
    assert np.all(np.isfinite(codes))
    # The reference sees exactly the rounded inputs.
    expected = sinkhorn_ref(np.asarray(scores.astype(jnp.float32)), 0.02, 3)
    np.testing.assert_allclose(codes, expected, atol=1e-5, rtol=0)


def test_no_gradient_flows_into_codes():
    scores = jnp.asarray(_cosine_scores(np.random.default_rng(2), 16, 10))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(16, 10)), jnp.float32)
    grad = jax.grad(lambda s: jnp.sum(sinkhorn(s) * weights))(scores)
    np.testing.assert_array_equal(grad, 0.0)


def test_sharded_equals_unsharded_on_the_concatenated_batch():
    mesh = jax.make_mesh((8,), ("data",))
    scores = _cosine_scores(np.random.default_rng(4), 8 * 64, 300)
    sharded_fn = jax.jit(
        jax.shard_map(
            lambda s: sinkhorn(s, epsilon=0.03, axis_name="data"),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
        )
    )
    x = jax.device_put(jnp.asarray(scores), NamedSharding(mesh, P("data")))
    codes = jax.block_until_ready(sharded_fn(x))
    np.testing.assert_allclose(codes, sinkhorn(jnp.asarray(scores), epsilon=0.03), atol=1e-5, rtol=0)
    np.testing.assert_allclose(codes, sinkhorn_ref(scores, 0.03, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(num_iters=0), "num_iters"),
        (dict(num_iters=2.5), "num_iters"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(jnp.zeros((4, 3)), **kwargs)


@pytest.mark.parametrize("shape", [(4,), (2, 4, 3), (0, 3)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="scores"):
        sinkhorn(jnp.zeros(shape))


def test_integer_scores_rejected():
    with pytest.raises(ValueError, match="scores"):
        sinkhorn(jnp.zeros((4, 3), jnp.int32))
