"""swav_jax.swav_loss and its pieces against the float64 reference of docs/ALGORITHM.md §4-§6."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax import assign_codes, prototype_usage, swapped_prediction_loss, swav_loss
from swav_reference import sinkhorn_ref, swav_loss_ref


def _scores(rng, *shape):
    """Cosine-like scores in [-1, 1]."""
    return np.tanh(rng.normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize(
    "v,b,k,crops",
    [
        (2, 16, 10, (0, 1)),
        (4, 8, 30, (0, 1)),  # K > B
        (8, 4, 50, (0, 1)),  # 2 + 6 multi-crop shape
        (3, 1, 5, (0,)),  # B = 1
        (5, 6, 12, (1, 3)),
    ],
)
@pytest.mark.parametrize("with_queue", [False, True])
def test_loss_matches_float64_reference(v, b, k, crops, with_queue):
    rng = np.random.default_rng(v * 100 + b)
    scores = _scores(rng, v, b, k)
    queue = _scores(rng, len(crops), 3 * b + 2, k) if with_queue else None
    kwargs = dict(crops_for_assign=crops, temperature=0.1, epsilon=0.05, num_iters=3)
    loss = swav_loss(
        jnp.asarray(scores), queue_scores=None if queue is None else jnp.asarray(queue), **kwargs
    )
    assert loss.shape == () and loss.dtype == jnp.float32
    expected = swav_loss_ref(scores, queue_scores=queue, **kwargs)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_codes_with_queue_are_the_batch_rows_of_the_joint_problem():
    rng = np.random.default_rng(7)
    scores, queue = _scores(rng, 4, 6, 20), _scores(rng, 2, 10, 20)
    codes = assign_codes(jnp.asarray(scores), queue_scores=jnp.asarray(queue), epsilon=0.05)
    assert codes.shape == (2, 6, 20)
    for i, crop in enumerate((0, 1)):
        joint = np.concatenate([queue[i], scores[crop]])
        np.testing.assert_allclose(codes[i], sinkhorn_ref(joint, 0.05, 3)[-6:], atol=1e-5)


def test_sharded_loss_equals_unsharded():
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(8)
    scores = _scores(rng, 4, 8 * 6, 40)
    queue = _scores(rng, 2, 8 * 5, 40)
    kwargs = dict(epsilon=0.05, temperature=0.1)

    def local(s, q):
        return jax.lax.pmean(swav_loss(s, queue_scores=q, axis_name="data", **kwargs), "data")

    fn = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(None, "data"), P(None, "data")), out_specs=P())
    )
    s = jax.device_put(jnp.asarray(scores), NamedSharding(mesh, P(None, "data")))
    q = jax.device_put(jnp.asarray(queue), NamedSharding(mesh, P(None, "data")))
    sharded = jax.block_until_ready(fn(s, q))
    unsharded = swav_loss(jnp.asarray(scores), queue_scores=jnp.asarray(queue), **kwargs)
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-5)
    np.testing.assert_allclose(sharded, swav_loss_ref(scores, (0, 1), 0.1, 0.05, 3, queue), rtol=1e-5)


def test_sharded_gradients_equal_unsharded():
    mesh = jax.make_mesh((8,), ("data",))
    scores = _scores(np.random.default_rng(9), 4, 8 * 4, 16)

    def local_grad(s):
        # Per-device mean loss; the global loss is the mean over devices.
        g = jax.grad(lambda x: swav_loss(x, axis_name="data"))(s)
        return g / 8.0

    fn = jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=P(None, "data"), out_specs=P(None, "data")))
    s = jax.device_put(jnp.asarray(scores), NamedSharding(mesh, P(None, "data")))
    sharded = jax.block_until_ready(fn(s))
    unsharded = jax.grad(lambda x: swav_loss(x))(jnp.asarray(scores))
    np.testing.assert_allclose(sharded, unsharded, atol=1e-6, rtol=1e-4)


def test_bf16_scores_small_epsilon_finite_loss_and_gradients():
    scores = jnp.asarray(_scores(np.random.default_rng(10), 8, 16, 300), jnp.bfloat16)
    loss, grad = jax.jit(jax.value_and_grad(lambda s: swav_loss(s, epsilon=0.02)))(scores)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))
    np.testing.assert_allclose(
        loss, swav_loss_ref(np.asarray(scores.astype(jnp.float32)), (0, 1), 0.1, 0.02, 3), rtol=1e-4
    )


def test_gradient_flows_only_through_predictions():
    """d loss / d scores equals the reference's analytic gradient with codes held fixed."""
    rng = np.random.default_rng(11)
    scores = _scores(rng, 3, 5, 7)
    grad = jax.grad(lambda s: swav_loss(s, crops_for_assign=(0,)))(jnp.asarray(scores))
    codes = sinkhorn_ref(scores[0], 0.05, 3)
    expected = np.zeros_like(scores, np.float64)
    for v in (1, 2):
        logits = scores[v] / 0.1
        softmax = np.exp(logits - logits.max(1, keepdims=True))
        softmax /= softmax.sum(1, keepdims=True)
        expected[v] = (softmax - codes) / 0.1 / 5 / 2
    np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_collapsed_scores_give_log_k():
    scores = jnp.zeros((4, 8, 30))
    np.testing.assert_allclose(swav_loss(scores), np.log(30), rtol=1e-6)


def test_prototype_usage():
    codes = np.zeros((2, 4, 5), np.float32)
    choice = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    for a in range(2):
        codes[a, np.arange(4), choice[a]] = 1.0
    usage = prototype_usage(jnp.asarray(codes))
    assert usage["empty_prototypes"] == 3
    np.testing.assert_allclose(usage["assignment_entropy"], np.log(2), rtol=1e-6)

    mesh = jax.make_mesh((8,), ("data",))
    many = np.eye(16, dtype=np.float32)[np.arange(8 * 4) % 16].reshape(8 * 4, 16)
    fn = jax.jit(
        jax.shard_map(
            lambda c: prototype_usage(c, axis_name="data"), mesh=mesh, in_specs=P("data"), out_specs=P()
        )
    )
    sharded = fn(jax.device_put(jnp.asarray(many), NamedSharding(mesh, P("data"))))
    assert sharded["empty_prototypes"] == 0
    np.testing.assert_allclose(sharded["assignment_entropy"], np.log(16), rtol=1e-6)


def test_swapped_prediction_loss_checks_codes_shape():
    with pytest.raises(ValueError, match="codes"):
        swapped_prediction_loss(jnp.zeros((4, 3, 5)), jnp.zeros((1, 3, 5)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(crops_for_assign=(0, 4)), "crops_for_assign"),
        (dict(crops_for_assign=(-1,)), "crops_for_assign"),
        (dict(crops_for_assign=()), "crops_for_assign"),
        (dict(crops_for_assign=(1, 1)), "crops_for_assign"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(num_iters=0), "num_iters"),
        (dict(temperature=0.0), "temperature"),
        (dict(queue_scores=jnp.zeros((2, 3, 6))), "queue_scores"),
        (dict(queue_scores=jnp.zeros((1, 3, 5))), "queue_scores"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        swav_loss(jnp.zeros((4, 3, 5)), **kwargs)


@pytest.mark.parametrize("shape", [(3, 5), (1, 3, 5), (2, 2, 3, 5)])
def test_bad_score_shapes(shape):
    with pytest.raises(ValueError, match="scores"):
        swav_loss(jnp.zeros(shape), crops_for_assign=(0,))


def test_top_level_import_pays_only_for_jax():
    code = (
        "import sys, swav_jax\n"
        "heavy = ('flax', 'optax', 'grain', 'orbax', 'tensorflow', 'tensorflow_datasets',\n"
        "         'ml_collections', 'PIL', 'torch', 'sklearn')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy\n"
        "       or (m.startswith('swav_jax.')\n"
        "           and m not in ('swav_jax.sinkhorn', 'swav_jax.losses', 'swav_jax.balancing',\n"
        "                         'swav_jax.kmeans', 'swav_jax.deepcluster'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
