"""swav_jax.balancing (ExCB) against float64 NumPy statements written from docs/ALGORITHM.md §8."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.balancing import (
    balance_similarities,
    excb_loss,
    excb_metrics,
    init_cluster_sizes,
    update_cluster_sizes,
)


# ---- float64 reference, literally docs/ALGORITHM.md §8 ---------------------------------------


def balance_ref(z, s):
    """z: [..., K]; s: [K] fractions summing to 1."""
    z, s = np.asarray(z, np.float64), np.asarray(s, np.float64)
    k = s.shape[0]
    small = 1.0 - (1.0 - z) * s * k
    large = (1.0 + z) / (s * k) - 1.0
    return np.where(s < 1.0 / k, small, np.where(s > 1.0 / k, large, z))


def softmax_ref(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def tracker_ref(s, teacher, momentum):
    """Argmax of the teacher's (balanced) scores, fraction per cluster, EMA."""
    k = s.shape[0]
    choice = balance_ref(teacher, s).argmax(-1).reshape(-1)
    batch_fraction = np.bincount(choice, minlength=k) / choice.size
    return momentum * np.asarray(s, np.float64) + (1.0 - momentum) * batch_fraction


def excb_loss_ref(teacher, student, predictor, s, t_teacher, t_student):
    """Teacher view a -> h path of the other global views b != a, predictor path of all
    views; each path an equal-weight mean over its pairs, the two paths half each."""
    teacher, student, predictor = (np.asarray(x, np.float64) for x in (teacher, student, predictor))
    num_global, num_views = teacher.shape[0], predictor.shape[0]

    def ce(q, x):  # batch mean of -sum_k q log softmax(x / T)
        log_p = np.log(softmax_ref(x / t_student))
        return -np.mean(np.sum(q * log_p, axis=-1))

    total = 0.0
    for a in range(num_global):
        q = softmax_ref(balance_ref(teacher[a], s) / t_teacher)
        h = np.mean([ce(q, student[b]) for b in range(num_global) if b != a])
        g = np.mean([ce(q, predictor[v]) for v in range(num_views)])
        total += 0.5 * h + 0.5 * g
    return total / num_global


# ---- inputs --------------------------------------------------------------------------


def _cosines(rng, *shape):
    return np.tanh(rng.normal(size=shape)).astype(np.float32)


def _sizes(rng, k, spread=1.0):
    """Fractions summing to 1 with relative sizes spread around 1 (some under, some over)."""
    s = np.exp(spread * rng.normal(size=k))
    return (s / s.sum()).astype(np.float32)


# ---- operator ------------------------------------------------------------------------


def test_identity_at_uniform_sizes():
    z = _cosines(np.random.default_rng(0), 3, 5, 20)
    out = balance_similarities(jnp.asarray(z), init_cluster_sizes(20))
    assert out.dtype == jnp.float32 and out.shape == z.shape
    np.testing.assert_allclose(out, z, atol=2e-7)


def test_init_cluster_sizes_uniform():
    s = init_cluster_sizes(7)
    assert s.shape == (7,) and s.dtype == jnp.float32
    np.testing.assert_allclose(s, np.full(7, 1 / 7), rtol=1e-7)


@pytest.mark.parametrize("k", [5, 64])
def test_operator_matches_reference(k):
    rng = np.random.default_rng(k)
    z, s = _cosines(rng, 4, 6, k), _sizes(rng, k, spread=2.0)
    out = balance_similarities(jnp.asarray(z), jnp.asarray(s))
    np.testing.assert_allclose(out, balance_ref(z, s), atol=2e-6)
    # Only relative sizes matter: unnormalised sizes (e.g. counts) give the same result.
    np.testing.assert_allclose(balance_similarities(jnp.asarray(z), jnp.asarray(37.0 * s)), out, atol=2e-6)


def test_operator_raises_small_lowers_large_monotone_and_bounded():
    k = 4
    z = np.linspace(-1.0, 1.0, 2001, dtype=np.float32)
    # Relative sizes r = s * K over a grid from empty to one cluster holding everything.
    for r in [0.0, 1e-7, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0, 1.001, 1.5, 2.0, 3.0, 3.99, 4.0]:
        s = np.full(k, (k - r) / (k * (k - 1)), np.float32)
        s[0] = r / k
        out = np.asarray(balance_similarities(jnp.asarray(np.tile(z[:, None], (1, k))), jnp.asarray(s)))
        col = out[:, 0]
        assert np.all(np.isfinite(out))
        assert out.min() >= -1.0 and out.max() <= 1.0, r  # exact, no tolerance
        assert np.all(np.diff(col) >= 0), r
        if 1e-3 <= r and abs(r - 1.0) > 1e-6:
            assert np.all(np.diff(col) > 0), r  # strictly increasing away from the floor
        if r < 1.0:
            assert np.all(col >= z - 1e-7), r
            assert np.all(col[:-1] > z[:-1]) or r > 0.999, r  # strictly raised below z = 1
            assert col[-1] == 1.0
        elif r > 1.0:
            assert np.all(col <= z + 1e-7), r
            assert np.all(col[1:] < z[1:]) or r < 1.001, r  # strictly lowered above z = -1
            assert col[0] == -1.0
        else:
            np.testing.assert_allclose(col, z, atol=2e-7)


def test_empty_cluster_is_near_one_and_keeps_order():
    z = np.array([[-0.9], [0.0], [0.5], [0.99]], np.float32)
    s = np.array([0.0, 0.5, 0.5], np.float32)
    col = np.asarray(balance_similarities(jnp.asarray(np.repeat(z, 3, axis=1)), jnp.asarray(s)))[:, 0]
    np.testing.assert_allclose(col, 1.0, atol=3e-6)
    assert np.all(np.diff(col) > 0)  # ties broken by similarity


def test_operator_gradient_is_slope_and_skips_sizes():
    s = jnp.asarray([0.05, 0.25, 0.7])  # r = 0.15, 0.75, 2.1
    z = jnp.asarray([[0.3, -0.2, 0.6]])
    dz, ds = jax.grad(lambda z, s: jnp.sum(balance_similarities(z, s)), argnums=(0, 1))(z, s)
    np.testing.assert_allclose(dz, [[0.15, 0.75, 1 / 2.1]], rtol=1e-5)
    np.testing.assert_array_equal(ds, 0.0)


# ---- tracker -------------------------------------------------------------------------


def test_tracker_ema_matches_reference_over_steps():
    rng = np.random.default_rng(1)
    k, momentum = 12, 0.9
    s_jax = init_cluster_sizes(k)
    s_ref = np.full(k, 1.0 / k)
    update = jax.jit(lambda s, t: update_cluster_sizes(s, t, momentum=momentum))
    for _ in range(6):
        # Skewed teacher: cluster 0 attracts most samples, so the sizes move off uniform
        # and the balancing (applied before the argmax) changes assignments.
        teacher = _cosines(rng, 2, 10, k)
        teacher[..., 0] += 0.8
        s_jax = update(s_jax, jnp.asarray(teacher))
        s_ref = tracker_ref(s_ref, teacher, momentum)
        np.testing.assert_allclose(s_jax, s_ref, atol=1e-6)
    assert s_jax.dtype == jnp.float32
    np.testing.assert_allclose(np.sum(s_jax), 1.0, rtol=1e-6)
    assert s_ref[0] > 1.0 / k


def test_tracker_counts_hard_assignments():
    # Uniform sizes: the operator is the identity, argmax picks the one-hot cluster.
    k = 5
    choice = np.array([[0, 0, 1, 3], [0, 2, 2, 2]])
    teacher = np.eye(k, dtype=np.float32)[choice]  # [2, 4, 5]
    out = update_cluster_sizes(init_cluster_sizes(k), jnp.asarray(teacher), momentum=0.0)
    np.testing.assert_allclose(out, [3 / 8, 1 / 8, 3 / 8, 1 / 8, 0.0], atol=1e-7)
    out = update_cluster_sizes(init_cluster_sizes(k), jnp.asarray(teacher), momentum=1.0)
    np.testing.assert_allclose(out, np.full(k, 0.2), atol=1e-7)


# ---- loss ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "g,v,b,k,temperatures",
    [
        (2, 8, 4, 50, (0.04, 0.1)),  # 2 + 6 multi-crop, K > B
        (2, 2, 16, 10, (0.04, 0.1)),  # no local crops
        (3, 7, 5, 7, (0.01, 0.2)),  # three global views
    ],
)
def test_loss_matches_float64_reference(g, v, b, k, temperatures):
    rng = np.random.default_rng(g * 100 + v * 10 + b)
    teacher, student, predictor = _cosines(rng, g, b, k), _cosines(rng, g, b, k), _cosines(rng, v, b, k)
    s = _sizes(rng, k)
    t_teacher, t_student = temperatures
    kwargs = dict(teacher_temperature=t_teacher, student_temperature=t_student)
    loss = excb_loss(*(jnp.asarray(x) for x in (teacher, student, predictor, s)), **kwargs)
    assert loss.shape == () and loss.dtype == jnp.float32
    expected = excb_loss_ref(teacher, student, predictor, s, t_teacher, t_student)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_loss_uses_balanced_targets():
    rng = np.random.default_rng(2)
    teacher, student, predictor = _cosines(rng, 2, 6, 10), _cosines(rng, 2, 6, 10), _cosines(rng, 4, 6, 10)
    args = [jnp.asarray(x) for x in (teacher, student, predictor)]
    balanced = excb_loss(*args, jnp.asarray(_sizes(rng, 10, spread=2.0)))
    uniform = excb_loss(*args, init_cluster_sizes(10))
    assert abs(float(balanced) - float(uniform)) > 1e-3
    np.testing.assert_allclose(
        uniform, excb_loss_ref(teacher, student, predictor, np.full(10, 0.1), 0.04, 0.1), rtol=1e-5
    )


def test_uniform_student_gives_log_k():
    rng = np.random.default_rng(3)
    teacher = jnp.asarray(_cosines(rng, 2, 4, 30))
    loss = excb_loss(teacher, jnp.zeros((2, 4, 30)), jnp.zeros((6, 4, 30)), jnp.asarray(_sizes(rng, 30)))
    np.testing.assert_allclose(loss, np.log(30), rtol=1e-6)


def test_gradients_flow_only_to_student_and_predictor():
    rng = np.random.default_rng(4)
    g, v, b, k = 3, 5, 3, 6
    teacher, student, predictor = _cosines(rng, g, b, k), _cosines(rng, g, b, k), _cosines(rng, v, b, k)
    s = _sizes(rng, k)
    grads = jax.grad(lambda *x: excb_loss(*x), argnums=(0, 1, 2, 3))(
        *(jnp.asarray(x) for x in (teacher, student, predictor, s))
    )
    np.testing.assert_array_equal(grads[0], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)
    # Analytic: d CE(q, x/T) / dx = (softmax(x/T) - q) / T, times each pair's weight / B.
    q = [softmax_ref(balance_ref(teacher[a], s) / 0.04) for a in range(g)]
    expected_h, expected_g = np.zeros((g, b, k)), np.zeros((v, b, k))
    for a in range(g):
        for w in range(v):
            expected_g[w] += (softmax_ref(predictor[w] / 0.1) - q[a]) / 0.1 * (0.5 / v) / b / g
        for w in range(g):
            if w != a:
                expected_h[w] += (softmax_ref(student[w] / 0.1) - q[a]) / 0.1 * (0.5 / (g - 1)) / b / g
    np.testing.assert_allclose(grads[1], expected_h, atol=1e-5)
    np.testing.assert_allclose(grads[2], expected_g, atol=1e-5)


def test_bf16_inputs_finite():
    rng = np.random.default_rng(5)
    teacher, student, predictor = (
        jnp.asarray(_cosines(rng, *shape), jnp.bfloat16) for shape in [(2, 8, 300), (2, 8, 300), (8, 8, 300)]
    )
    s = jnp.asarray(_sizes(rng, 300, spread=3.0))
    loss, grads = jax.jit(jax.value_and_grad(excb_loss, argnums=(1, 2)))(teacher, student, predictor, s)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)
    for grad in grads:
        assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))
    as_f32 = [np.asarray(x.astype(jnp.float32)) for x in (teacher, student, predictor)]
    np.testing.assert_allclose(loss, excb_loss_ref(*as_f32, np.asarray(s), 0.04, 0.1), rtol=1e-4)
    sizes = update_cluster_sizes(s, teacher)
    assert sizes.dtype == jnp.float32 and np.all(np.isfinite(sizes))
    assert all(np.isfinite(x) for x in excb_metrics(teacher, s).values())


# ---- metrics -------------------------------------------------------------------------


def test_metrics_values():
    k = 6
    s = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3], np.float32)  # r = 0.3 .. 1.8
    rng = np.random.default_rng(6)
    teacher = _cosines(rng, 2, 9, k)
    m = excb_metrics(jnp.asarray(teacher), jnp.asarray(s), teacher_temperature=0.04)
    assert set(m) == {
        "min_relative_size", "max_relative_size", "teacher_confidence", "view_agreement", "empty_clusters"
    }
    np.testing.assert_allclose(m["min_relative_size"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(m["max_relative_size"], 1.8, rtol=1e-6)
    probs = softmax_ref(balance_ref(teacher, s) / 0.04)
    np.testing.assert_allclose(m["teacher_confidence"], probs.max(-1).mean(), rtol=1e-5)
    choice = probs.argmax(-1)
    np.testing.assert_allclose(m["view_agreement"], np.mean(choice[0] == choice[1]), rtol=1e-6)
    assert m["empty_clusters"] == k - len(np.unique(choice))
    for value in m.values():
        assert value.shape == () and value.dtype == jnp.float32


def test_metrics_agreement_over_view_pairs():
    k = 4
    choice = np.array([[0, 1, 2, 3], [0, 1, 3, 3], [0, 2, 3, 3]])  # pairs agree on 3/4, 2/4, 3/4
    teacher = np.eye(k, dtype=np.float32)[choice]
    m = excb_metrics(jnp.asarray(teacher), init_cluster_sizes(k))
    np.testing.assert_allclose(m["view_agreement"], (3 + 2 + 3) / 12, rtol=1e-6)
    assert m["empty_clusters"] == 0


# ---- sharded == unsharded ------------------------------------------------------------


def _mesh():
    return jax.make_mesh((8,), ("data",))


def test_sharded_tracker_loss_and_metrics_equal_unsharded():
    mesh = _mesh()
    rng = np.random.default_rng(7)
    g, v, b, k = 2, 4, 8 * 3, 40
    teacher, student, predictor = _cosines(rng, g, b, k), _cosines(rng, g, b, k), _cosines(rng, v, b, k)
    teacher[..., :3] += 0.5  # unequal clusters, so the update and the metrics are non-trivial
    s = _sizes(rng, k)

    def local(t, x, p, s):
        loss = jax.lax.pmean(excb_loss(t, x, p, s), "data")
        metrics = excb_metrics(t, s, axis_name="data")
        return loss, update_cluster_sizes(s, t, momentum=0.9, axis_name="data"), metrics

    batch_spec = P(None, "data")
    fn = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec, P()), out_specs=(P(), P(), P())
        )
    )
    data = NamedSharding(mesh, batch_spec)
    placed = [jax.device_put(jnp.asarray(x), data) for x in (teacher, student, predictor)]
    placed.append(jax.device_put(jnp.asarray(s), NamedSharding(mesh, P())))
    loss, sizes, metrics = jax.block_until_ready(fn(*placed))

    args = [jnp.asarray(x) for x in (teacher, student, predictor, s)]
    np.testing.assert_allclose(loss, excb_loss(*args), rtol=1e-5)
    expected = excb_loss_ref(teacher, student, predictor, s, 0.04, 0.1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(sizes, update_cluster_sizes(args[3], args[0], momentum=0.9), atol=1e-7)
    np.testing.assert_allclose(sizes, tracker_ref(s, teacher, 0.9), atol=1e-6)
    unsharded = excb_metrics(args[0], args[3])
    for name, value in metrics.items():
        np.testing.assert_allclose(value, unsharded[name], rtol=1e-5, err_msg=name)


def test_sharded_gradients_equal_unsharded():
    mesh = _mesh()
    rng = np.random.default_rng(8)
    teacher, student, predictor = _cosines(rng, 2, 16, 12), _cosines(rng, 2, 16, 12), _cosines(rng, 4, 16, 12)
    s = jnp.asarray(_sizes(rng, 12))

    def local_grad(t, x, p):
        # Per-device mean loss; the global loss is the mean over the 8 devices.
        return jax.tree.map(lambda g: g / 8.0, jax.grad(excb_loss, argnums=(1, 2))(t, x, p, s))

    spec = P(None, "data")
    fn = jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec)))
    data = NamedSharding(mesh, spec)
    placed = [jax.device_put(jnp.asarray(x), data) for x in (teacher, student, predictor)]
    sharded = jax.block_until_ready(fn(*placed))
    inputs = [jnp.asarray(x) for x in (teacher, student, predictor)]
    unsharded = jax.grad(excb_loss, argnums=(1, 2))(*inputs, s)
    for a, e in zip(sharded, unsharded):
        np.testing.assert_allclose(a, e, atol=1e-7, rtol=1e-4)


# ---- argument checks -----------------------------------------------------------------

T, X, S = jnp.zeros((2, 3, 5)), jnp.zeros((4, 3, 5)), jnp.full((5,), 0.2)  # X: all views


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: excb_loss(T, T, X, S, teacher_temperature=0.0), "teacher_temperature"),
        (lambda: excb_loss(T, T, X, S, student_temperature=-1.0), "student_temperature"),
        (lambda: excb_loss(T, T, X, jnp.full((4,), 0.25)), "sizes"),
        (lambda: excb_loss(T[0], T, X, S), "teacher_similarities"),
        (lambda: excb_loss(T[:1], T[:1], X, S), "at least 2 global views"),
        (lambda: excb_loss(T, X, X, S), "student_similarities"),
        (lambda: excb_loss(T, T[:, :2], X, S), "student_similarities"),
        (lambda: excb_loss(T, T, X[:, :2], S), "predictor_similarities"),
        (lambda: excb_loss(T, T, X[..., :4], S), "predictor_similarities"),
        (lambda: excb_loss(T.astype(jnp.int32), T, X, S), "teacher_similarities"),
        (lambda: update_cluster_sizes(S, T, momentum=1.5), "momentum"),
        (lambda: update_cluster_sizes(S[:4], T), "sizes"),
        (lambda: update_cluster_sizes(S, T[0]), "teacher_similarities"),
        (lambda: balance_similarities(X, S[:3]), "sizes"),
        (lambda: balance_similarities(X, S.astype(jnp.int32)), "sizes"),
        (lambda: excb_metrics(T[:1], S), "teacher_similarities"),
        (lambda: excb_metrics(T, S, teacher_temperature=0.0), "teacher_temperature"),
        (lambda: init_cluster_sizes(0), "num_clusters"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_import_pays_only_for_jax():
    code = (
        "import sys, swav_jax.balancing\n"
        "heavy = ('flax', 'optax', 'grain', 'orbax', 'tensorflow', 'tensorflow_datasets',\n"
        "         'ml_collections', 'PIL', 'torch', 'sklearn')\n"
        "ok = ('swav_jax.sinkhorn', 'swav_jax.losses', 'swav_jax.balancing', 'swav_jax.kmeans',\n"
        "      'swav_jax.deepcluster')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy\n"
        "       or (m.startswith('swav_jax.') and m not in ok)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
