"""ExCB in the trainer: sharded step equals single device, EMA teacher, centroid gradient
paths, tracker hard counts, optimiser and schedules against float64 NumPy references
written from docs/ALGORITHM.md §8 / the release, and a resumable run through `train()`."""

import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import tiny_config
from train_helpers import (
    assert_trees_close,
    assert_within_reordering_noise,
    build,
    permuted,
    random_batches,
    run_steps,
    single_device_mesh,
    without_colour_augmentation,
)
from swav_jax import kmeans
from swav_jax.eval.plots import plot_metrics
from swav_jax.eval.run import feature_fn, load_variables
from swav_jax.data.augment import augment_views
from swav_jax.errors import ConfigError
from swav_jax.mesh import make_mesh
from swav_jax.methods import excb
from swav_jax.models.excb import ExCBModel, build_excb_model
from swav_jax.train.loop import train
from swav_jax.train.validate import validate_config

TOTAL_STEPS = 10


def _config():
    c = tiny_config.get_config()
    c.method = "excb"
    c.excb.num_clusters = 12
    c.excb.hidden_dim = 32
    c.excb.hidden_layers = 2
    c.excb.proj_dim = 16
    c.excb.teacher_momentum = 0.9  # far from 1, so the EMA is visible in a few steps
    c.excb.tracker_momentum = 0.5
    # Small steps: on random crops the predictor's input BN (over projections of std
    # ~0.01 at init) makes the first gradient norm ~50.
    c.optim.base_lr = 0.005
    c.optim.final_lr = 0.0
    c.optim.start_warmup = 0.0
    c.optim.warmup_epochs = 0
    c.optim.scale_lr_with_batch = False
    c.optim.weight_decay = 1e-4
    return c


def _run(config, mesh, batches):
    """States before each step and after the last, and the metrics of each step (host)."""
    [run] = run_steps(config, mesh, [batches], steps_per_epoch=TOTAL_STEPS)
    return run


@pytest.fixture(scope="module")
def single_run():
    config = _config()
    batches = random_batches(config, 2)
    states, history = _run(config, single_device_mesh(), batches)
    return config, batches, states, history


# ---- float64 references from docs/ALGORITHM.md §8 / the release ------------------------------


def balance_ref(z, sizes):
    """docs/ALGORITHM.md §8: r_k = s_k K; r < 1: 1 - (1 - z) r; r > 1: (1 + z) / r - 1; else z."""
    z = np.asarray(z, np.float64)
    r = np.asarray(sizes, np.float64) / np.sum(sizes) * len(sizes)
    return np.where(r < 1, 1 - (1 - z) * r, np.where(r > 1, (1 + z) / r - 1, z))


def momentum_ref(base, step, total):
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * min(step, total) / total)) / 2.0


def cosine_ref(start, end, step, total):
    return end + (start - end) * (1.0 + math.cos(math.pi * min(step, total) / total)) / 2.0


# ---- the step --------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    # Without colour augmentation permuted batches measure the float32 noise (see
    # train_helpers); the augmentation's sharding invariance is tested on its own.
    config = without_colour_augmentation(_config())
    batches = random_batches(config, 2)
    mesh8 = make_mesh(config)
    assert mesh8.devices.size == 8
    [(sharded, history)] = run_steps(config, mesh8, [batches], steps_per_epoch=TOTAL_STEPS)
    runs = run_steps(
        config, single_device_mesh(), [batches, permuted(batches, 1), permuted(batches, 3)],
        steps_per_epoch=TOTAL_STEPS,
    )
    (single, single_history), reorderings = runs[0], runs[1:]
    assert set(history[0]) == set(single_history[0])
    assert_within_reordering_noise(history, single_history, [h for _, h in reorderings])
    assert_within_reordering_noise(sharded[-1], single[-1], [states[-1] for states, _ in reorderings])
    assert int(sharded[-1].step) == 2


def test_teacher_is_ema_of_student_with_scheduled_momentum(single_run):
    config, _, states, history = single_run
    init = states[0]
    assert_trees_close(init.teacher_params, init.params, rtol=0, atol=0)  # teacher starts as a copy
    for s in range(2):
        m = momentum_ref(config.excb.teacher_momentum, s, TOTAL_STEPS)
        np.testing.assert_allclose(history[s]["train/teacher_momentum"], m, rtol=1e-6)
        expected = jax.tree.map(
            lambda t, p: m * np.float64(t) + (1 - m) * np.float64(p), states[s].teacher_params, states[s + 1].params
        )
        assert_trees_close(states[s + 1].teacher_params, expected, rtol=1e-6, atol=1e-7)
    # The student moved, and the teacher lags behind it.
    moved = lambda a, b: max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b)))
    assert moved(states[2].params, init.params) > moved(states[2].teacher_params, init.params) > 0


def _teacher_similarities(config, state, crops):
    """Teacher scores of the step's augmented global crops, recomputed outside the step."""
    dtype = jnp.dtype(config.model.dtype)
    model = build_excb_model(config)

    def local(rng, step, variables, *c):
        images = augment_views(rng, step, c, config.augment, dtype=dtype, data_axis=("data", "bn"))
        sims, _ = model.apply(
            variables, images[:1], train=True, mutable=["batch_stats"], method=ExCBModel.teacher_similarities
        )
        return sims

    fn = jax.jit(jax.shard_map(local, mesh=single_device_mesh(), in_specs=P(), out_specs=P(), check_vma=False))
    variables = {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
    return np.asarray(fn(state.rng, state.step, variables, *(jnp.asarray(c) for c in crops)), np.float64)


def test_tracker_updates_with_hard_counts_of_balanced_teacher(single_run):
    config, batches, states, _ = single_run
    k, m_s = config.excb.num_clusters, config.excb.tracker_momentum
    np.testing.assert_allclose(states[0].cluster_sizes, np.full(k, 1 / k), rtol=1e-7)
    for s in range(2):
        teacher = _teacher_similarities(config, states[s], batches[s])  # [G, B, K]
        assert teacher.shape == (2, config.batch_size, k)
        choice = np.argmax(balance_ref(teacher, states[s].cluster_sizes), axis=-1)
        counts = np.bincount(choice.ravel(), minlength=k) / choice.size
        expected = m_s * np.float64(states[s].cluster_sizes) + (1 - m_s) * counts
        np.testing.assert_allclose(states[s + 1].cluster_sizes, expected, atol=1e-6)
    assert not np.allclose(states[1].cluster_sizes, 1 / k)  # the second step balanced non-trivially


def test_metrics_keys_and_ranges(single_run):
    config, _, states, history = single_run
    for m in history:
        assert {
            "train/loss", "train/lr", "train/grad_norm", "train/min_relative_size", "train/max_relative_size",
            "train/teacher_confidence", "train/view_agreement", "train/empty_clusters", "train/teacher_momentum",
        } <= set(m)
        assert 0 < m["train/loss"] and np.isfinite(m["train/grad_norm"])
        assert 1 / config.excb.num_clusters <= m["train/teacher_confidence"] <= 1
        assert 0 <= m["train/view_agreement"] <= 1
        assert 0 <= m["train/empty_clusters"] <= config.excb.num_clusters
    np.testing.assert_allclose(history[0]["train/min_relative_size"], 1.0, rtol=1e-6)  # uniform at init
    sizes = np.float64(states[1].cluster_sizes) * config.excb.num_clusters
    np.testing.assert_allclose(history[1]["train/max_relative_size"], sizes.max(), rtol=1e-5)
    np.testing.assert_allclose(history[1]["train/min_relative_size"], sizes.min(), rtol=1e-5)
    expected_lr = cosine_ref(config.optim.base_lr, 0.0, 1, TOTAL_STEPS)
    np.testing.assert_allclose(history[1]["train/lr"], expected_lr, rtol=1e-5)


# ---- the model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_variables():
    config = _config()
    model = build_excb_model(config)
    crops = [
        jnp.asarray(np.random.default_rng(g).normal(size=(n, 4, s, s, 3)), jnp.float32)
        for g, (n, s) in enumerate(zip(config.crops.num_crops, config.crops.size_crops))
    ]
    variables = jax.jit(functools.partial(model.init, train=True))(jax.random.key(0), crops)
    return config, model, variables, crops


def test_similarities_are_cosines_to_unit_centroids(model_and_variables):
    config, model, variables, crops = model_and_variables
    (sims, pred_sims), state = model.apply(
        variables, crops, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    p = np.float64(inter["projection_out"]["__call__"][0])  # [V * B, D]
    g = np.float64(inter["predictor_out"]["__call__"][0])
    c = np.float64(variables["params"]["centroids"])
    c = c / np.linalg.norm(c, axis=0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    k = config.excb.num_clusters
    assert sims.shape == (2, 4, k) and pred_sims.shape == (4, 4, k)  # h path: global crops only
    assert sims.dtype == pred_sims.dtype == jnp.float32
    np.testing.assert_allclose(sims, (unit(p[:8]) @ c).reshape(2, 4, k), atol=1e-6)
    np.testing.assert_allclose(pred_sims, (unit(g) @ c).reshape(4, 4, k), atol=1e-6)
    teacher = model.apply(variables, crops[:1], train=False, method=ExCBModel.teacher_similarities)
    np.testing.assert_allclose(teacher, sims, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(variables["params"]["centroids"], axis=0), 1.0, rtol=1e-6)


def test_predictor_is_the_release_mlp(model_and_variables):
    """g(p) = Linear(ReLU(BN(Linear(BN(p))))) with BN over all crops of the batch, as the
    release's predictor (`predictor_activation: bn`, one hidden layer), in float64."""
    config, model, variables, crops = model_and_variables
    _, state = model.apply(
        variables, crops, train=True, capture_intermediates=True, mutable=["intermediates", "batch_stats"]
    )
    params = variables["params"]
    p = np.float64(state["intermediates"]["projection_out"]["__call__"][0])  # [V * B, D]

    def bn(x, layer):  # train mode: batch statistics, biased variance, eps 1e-5
        x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
        return x * np.float64(params[layer]["scale"]) + np.float64(params[layer]["bias"])

    def dense(x, layer):
        return x @ np.float64(params[layer]["kernel"]) + np.float64(params[layer]["bias"])

    hidden = np.maximum(bn(dense(bn(p, "predictor_bn_in"), "predictor_hidden"), "predictor_bn"), 0.0)
    expected = dense(hidden, "predictor_out")
    assert params["predictor_hidden"]["kernel"].shape == (config.excb.proj_dim, config.excb.hidden_dim)
    assert params["predictor_out"]["kernel"].shape == (config.excb.hidden_dim, config.excb.proj_dim)
    predicted = state["intermediates"]["predictor_out"]["__call__"][0]
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-5)
    # The input BN takes out the batch mean: moving every projection alike changes nothing.
    shifted = jax.tree.map(jnp.copy, variables)
    shifted["params"]["projection_out"]["bias"] = shifted["params"]["projection_out"]["bias"] + 3.0
    (_, pred), _ = model.apply(variables, crops, train=True, mutable=["batch_stats"])
    (_, pred_shifted), _ = model.apply(shifted, crops, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(pred_shifted, pred, atol=1e-4)


def test_centroids_get_gradients_only_from_global_views_h_path(model_and_variables):
    config, model, variables, crops = model_and_variables
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, config.excb.num_clusters)), jnp.float32)

    def grads(select):
        def loss(params):
            out, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, crops, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(select(out) * weights[: select(out).shape[0]])

        return jax.grad(loss)(variables["params"])

    norm = lambda tree: float(optax.tree.norm(tree))  # noqa: E731
    global_h = grads(lambda out: out[0])
    predictor = grads(lambda out: out[1])
    local_predictor = grads(lambda out: out[1][2:])
    assert norm(global_h["centroids"]) > 0
    np.testing.assert_array_equal(predictor["centroids"], 0.0)
    # The predictor path still trains the rest of the network, local crops included.
    assert norm(predictor["predictor_out"]) > 0 and norm(predictor["projection_out"]) > 0
    assert norm(local_predictor["backbone"]) > 0
    np.testing.assert_array_equal(global_h["predictor_out"]["kernel"], 0.0)


# ---- optimiser and schedules -----------------------------------------------------------


def test_schedules_match_reference():
    momentum = excb.teacher_momentum(0.996, 100)
    decay = excb.centroid_weight_decay(1e-3, 1e-4, 100)
    for s in [0, 1, 37, 50, 99, 100, 150]:
        np.testing.assert_allclose(momentum(s), momentum_ref(0.996, s, 100), rtol=1e-6)
        np.testing.assert_allclose(decay(s), cosine_ref(1e-3, 1e-4, s, 100), rtol=1e-5)
        # The release's 'wdx10c1': wd * (9 * cosine(1 -> 0) + 1) with wd = 1e-4.
        np.testing.assert_allclose(decay(s), 1e-4 * (9 * cosine_ref(1, 0, s, 100) + 1), rtol=1e-5)
    assert float(momentum(0)) == np.float32(0.996) and float(momentum(100)) == 1.0


def test_optimizer_is_torch_sgd_with_decay_groups():
    config = _config()
    rng = np.random.default_rng(2)
    params = {
        "backbone": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4))}, "bn": {"scale": rng.normal(size=4)}},
        "projection_out": {"kernel": rng.normal(size=(4, 5)), "bias": rng.normal(size=5)},
        "centroids": rng.normal(size=(5, 6)),
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    lr = lambda s: 0.1 + 0.05 * s  # noqa: E731
    wd_c = lambda s: 1e-2 / (1 + s)  # noqa: E731
    tx = excb.make_excb_optimizer(config.optim, lr, wd_c)
    state = tx.init(params)
    ref = jax.tree.map(np.float64, params)
    buf = jax.tree.map(np.zeros_like, ref)
    current = params
    for s in range(3):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, current)
        current = optax.apply_updates(current, updates)

        # torch.optim.SGD(momentum=0.9, weight_decay=wd) per parameter group.
        def sgd(path, w, g, b):
            names = [getattr(k, "key", "") for k in path]
            if names[0] == "centroids":
                wd = wd_c(s)
            elif w.ndim > 1:
                wd = config.optim.weight_decay
            else:
                wd = 0.0
            d = np.float64(g) + wd * w
            b = config.optim.momentum * b + d
            return w - lr(s) * b, b

        out = jax.tree.map_with_path(sgd, ref, grads, buf)
        ref = jax.tree.map(lambda o: o[0], out, is_leaf=lambda x: isinstance(x, tuple))
        buf = jax.tree.map(lambda o: o[1], out, is_leaf=lambda x: isinstance(x, tuple))
        assert_trees_close(current, ref, rtol=1e-5, atol=1e-6)


# ---- the training program --------------------------------------------------------------


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _saved_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_train_runs_logs_excb_metrics_and_resumes_bit_exact(tmp_path):
    config = _config()
    config.optim.warmup_epochs = 1
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    train(config, str(straight_dir), max_steps=4)  # checkpoints at steps 2 and 4
    # Resume a second run from the straight run's step-2 checkpoint.
    shutil.copytree(straight_dir / "checkpoints" / "2", resumed_dir / "checkpoints" / "2")
    train(config, str(resumed_dir), max_steps=4)

    straight = _metrics(straight_dir)
    assert [m["step"] for m in straight] == [1, 2, 3, 4]
    for m in straight:
        for key in ("loss", "lr", "grad_norm", "min_relative_size", "max_relative_size",
                    "teacher_confidence", "view_agreement", "empty_clusters"):
            assert np.isfinite(m[f"train/{key}"]), key
    resumed = _metrics(resumed_dir)
    assert [m["step"] for m in resumed] == [3, 4]
    for m, r in zip(straight[2:], resumed):
        for key, value in m.items():
            if key != "train/images_per_sec":
                assert r[key] == value, (m["step"], key)

    a, b = _saved_state(straight_dir, 4), _saved_state(resumed_dir, 4)
    assert set(a) >= {"teacher_params", "teacher_batch_stats", "cluster_sizes", "opt_state"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a["cluster_sizes"], 1 / config.excb.num_clusters)

    # Evaluation reads the EMA teacher, and the SwAV feature code runs on its backbone.
    variables, step = load_variables(str(straight_dir))
    assert step == 4
    for x, y in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(a["teacher_params"]), strict=True):
        np.testing.assert_array_equal(x, y)
    written = [os.path.basename(p) for p in plot_metrics(straight_dir / "metrics.jsonl", tmp_path / "plots")]
    assert written == ["loss.png", "lr.png", "clusters.png", "throughput.png", "summary.png"]

    images = np.random.default_rng(3).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    features = feature_fn(config, variables)(jnp.asarray(images))
    normalised = (images / 255.0 - np.asarray(config.augment.mean)) / np.asarray(config.augment.std)
    expected = build_excb_model(config).apply(variables, jnp.asarray(normalised, jnp.float32), method=ExCBModel.features)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("method", "dino", "config.method"),
        ("crops.num_crops", (1, 3), "crops.num_crops"),
        ("excb.num_clusters", 0, "excb.num_clusters"),
        ("excb.hidden_layers", -1, "excb.hidden_layers"),
        ("excb.teacher_temperature", 0.0, "excb.teacher_temperature"),
        ("excb.tracker_momentum", 1.5, "excb.tracker_momentum"),
        ("excb.centroid_weight_decay", -1e-3, "excb.centroid_weight_decay"),
        ("excb.centroid_weight_decay_end", -1e-4, "excb.centroid_weight_decay_end"),
        ("excb.teacher_momentum", 1.5, "excb.teacher_momentum"),
        ("excb.init_samples", 11, "excb.init_samples"),  # fewer than the 12 centroids
    ],
)
def test_config_validation_names_the_key(key, value, match):
    config = _config()
    section, _, name = key.rpartition(".")
    target = config[section] if section else config
    with config.unlocked():
        target[name] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=1, num_processes=1)


def test_swav_checks_do_not_apply_to_excb():
    config = _config()
    config.swav.crops_for_assign = (5,)  # invalid for SwAV, not read by ExCB
    validate_config(config, num_devices=8, num_processes=1)


# ---- centroid initialisation (the release's k-means) -----------------------------------


def kmeans_ref(x, first_rows, num_iters):
    """Spherical Lloyd iterations in float64: argmax cosine, normalised member means,
    an empty cluster keeps its centroid (the release's get_centroids)."""
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = x[first_rows]
    for _ in range(num_iters):
        labels = np.argmax(x @ c.T, axis=1)
        for k in range(len(c)):
            members = x[labels == k]
            if len(members):
                c[k] = members.sum(0) / np.linalg.norm(members.sum(0))
    return c, np.bincount(np.argmax(x @ c.T, axis=1), minlength=len(c))


def _kmeans(x, key, num_clusters, num_iters, chunk_rows=None):
    """ExCB's call of the package's k-means: (centroids, cluster sizes)."""
    centroids, labels = jax.jit(functools.partial(
        kmeans.spherical_kmeans, num_clusters=num_clusters, num_iters=num_iters, chunk_rows=chunk_rows
    ))(jnp.asarray(x), key)
    return np.asarray(centroids), np.bincount(np.asarray(labels), minlength=num_clusters)


def test_spherical_kmeans_matches_float64_lloyd_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(5, 8))
    x = np.concatenate([d + 0.1 * rng.normal(size=(40, 8)) for d in directions]).astype(np.float32)
    # A key whose initial rows fall one in each cluster (most keys put two in one).
    key = next(
        k for k in map(jax.random.key, range(100))
        if len({int(i) // 40 for i in jax.random.permutation(k, len(x))[:5]}) == 5
    )
    first = np.asarray(jax.random.permutation(key, len(x))[:5])
    for iters in (0, 1, 3, excb.KMEANS_ITERS):
        centroids, sizes = _kmeans(x, key, 5, iters)
        ref_c, ref_sizes = kmeans_ref(x, first, iters)
        np.testing.assert_allclose(centroids, ref_c, atol=1e-5)
        np.testing.assert_array_equal(sizes, ref_sizes)
    # Five tight, well separated clusters, one initial row in each: five clusters of 40.
    assert sorted(sizes.tolist()) == [40] * 5
    with pytest.raises(ValueError, match="num_clusters"):
        _kmeans(x[:4], key, 5, 1)


def test_chunked_assignment_equals_one_shot():
    x = np.random.default_rng(1).normal(size=(37, 6)).astype(np.float32)
    key = jax.random.key(0)
    whole = _kmeans(x, key, 4, 5)
    chunked = _kmeans(x, key, 4, 5, chunk_rows=5)  # 37 = 7 x 5 + 2
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-6)
    np.testing.assert_array_equal(chunked[1], whole[1])


def test_init_centroids_clusters_the_teacher_projections():
    config = _config()
    mesh = single_device_mesh()
    state, _ = build(config, mesh, steps_per_epoch=TOTAL_STEPS)
    model = build_excb_model(config)
    new = excb.init_centroids(config, model, state)
    student, teacher = np.asarray(new.params["centroids"]), np.asarray(new.teacher_params["centroids"])
    np.testing.assert_array_equal(student, teacher)
    assert new.params["centroids"] is not new.teacher_params["centroids"]  # donated separately
    assert student.shape == (config.excb.proj_dim, config.excb.num_clusters)
    np.testing.assert_allclose(np.linalg.norm(student, axis=0), 1.0, atol=1e-5)
    assert not np.allclose(student, np.asarray(state.params["centroids"]))
    # The centroids are the k-means of the teacher's projections of the training images:
    # at convergence each is the normalised mean of the projections closest to it.
    variables = {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
    x = excb.teacher_projections(config, model, variables, config.excb.init_samples)
    assert x.shape == (1437, config.excb.proj_dim)  # the whole digits training split
    labels = np.argmax(x @ student, axis=1)
    for k in np.unique(labels):
        mean = x[labels == k].sum(0)
        np.testing.assert_allclose(student[:, k], mean / np.linalg.norm(mean), atol=1e-4)
    # Everything else is untouched.
    for name in state.params:
        if name != "centroids":
            for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(new.params[name])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
