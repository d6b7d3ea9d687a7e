"""DeepCluster-v2 in the trainer: sharded runs (bank fill, per-epoch clustering, steps)
equal single-device ones, the loss of a step against a float64 cross-entropy of the
network's scores, frozen prototypes, resume bit for bit mid-epoch and at an epoch
boundary with the clustering exactly at the boundaries, config validation."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tiny_config
from train_helpers import (
    assert_within_reordering_noise,
    permuted,
    random_batches,
    single_device_mesh,
    without_colour_augmentation,
)
from swav_jax.data.augment import augment_views
from swav_jax.deepcluster import EMPTY, UNASSIGNED
from swav_jax.errors import ConfigError
from swav_jax.mesh import data_axes, make_mesh
from swav_jax.methods import deepclusterv2, get_method
from swav_jax.models import build_model
from swav_jax.train.loop import train
from swav_jax.train.validate import validate_config

METHOD = get_method("deepclusterv2")
STEPS_PER_EPOCH = 3  # of a data set of 3 global batches: N = 48 samples


def _config():
    c = tiny_config.get_config()
    c.method = "deepclusterv2"
    c.data.drop_remainder = True
    c.epochs = 2
    c.model.num_prototypes = (5,)  # 8 devices x local batch 2 x 3 steps = 6 bank rows per device
    c.deepclusterv2.kmeans_iters = 3
    c.optim.warmup_epochs = 0  # the first steps move the network
    return c


def _without_zero_tensors(state):
    """`state` with the zero-initialised parameters (BatchNorm offsets) at small random
    values. LARC leaves zero-norm tensors unscaled: their first step is a plain SGD step
    of their gradient, carrying its summation-order noise at full size into every later
    step. Measured here with zero offsets: the sharded run's second step deviated from
    the single-device one by 13 times the reordering noise, at base_lr 1.5 and at 0.02
    alike (the noise of the offsets' gradient depends on how the sums are split over
    devices more than on the order of the samples). Every other tensor takes
    trust-ratio-scaled steps, which keep such noise small."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda p: p + 0.01 * rng.standard_normal(p.shape).astype(np.float32) if not np.any(p) else p,
        jax.device_get(state.params),
    )
    return state.replace(params=jax.device_put(params, jax.tree.map(lambda p: p.sharding, state.params)))


def _num_examples(config):
    return STEPS_PER_EPOCH * config.batch_size


def _runner(config, mesh):
    """run(batches, indices, align=None): fill the bank from the first epoch's batches,
    then train on `batches`, clustering at every epoch boundary (after `align(state,
    epoch)`, if given); every run from the same initial state, compiled once.

    A run returns host states {'before_clustering': [per epoch], 'after_clustering':
    [per epoch], 'final': state} and the host metrics of each step."""
    program = METHOD.build(
        config.copy_and_resolve_references(), mesh, steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=config.epochs * STEPS_PER_EPOCH, num_examples=_num_examples(config),
    )
    fill = deepclusterv2.make_fill_step(config, mesh)
    axes = data_axes(mesh)
    crops_sharding, index_sharding = NamedSharding(mesh, P(None, axes)), NamedSharding(mesh, P(axes))

    def run(batches, indices, align=None):
        def batch(step):
            return {
                "crops": tuple(jax.device_put(c, crops_sharding) for c in batches[step]),
                "index": jax.device_put(indices[step], index_sharding),
            }

        state = deepclusterv2.fill_bank(
            config, _without_zero_tensors(program.init_state()), fill, map(batch, range(STEPS_PER_EPOCH)),
            STEPS_PER_EPOCH,
        )
        out = {"before_clustering": [], "after_clustering": []}
        history = []
        for step in range(len(batches)):
            if step % STEPS_PER_EPOCH == 0:
                epoch = step // STEPS_PER_EPOCH
                if align is not None:
                    state = align(state, epoch)
                out["before_clustering"].append(jax.device_get(state))
                state = METHOD.on_epoch_start(config, state, epoch)
                out["after_clustering"].append(jax.device_get(state))
            state, metrics = program.train_step(state, batch(step))
            history.append(jax.device_get(jax.block_until_ready(metrics)))
        out["final"] = jax.device_get(state)
        return out, history

    return run


def _initial_rows(config, epoch, n):
    """Bank rows [0, n) the k-means starts at (kmeans.spherical_kmeans, every row written)."""
    [key] = jax.random.split(deepclusterv2.kmeans_key(config.seed, epoch), 1)
    return np.asarray(jax.random.permutation(key, n))[: config.model.num_prototypes[0]]


def _aligned_to(config, sharded, rows_per_device):
    """`align` for a single-device run: reorders its bank rows so that its k-means starts
    at the samples the sharded run's started at (rows of the first device's bank there,
    of the whole bank here). The bank's row order means nothing else: every row is
    rewritten in the epoch that follows."""

    def align(state, epoch):
        wanted = sharded["before_clustering"][epoch].bank_index[_initial_rows(config, epoch, rows_per_device)]
        bank, bank_index = np.asarray(state.bank), np.asarray(state.bank_index)
        n = len(bank_index)
        start = _initial_rows(config, epoch, n)
        source = [int(np.flatnonzero(bank_index == i)[0]) for i in wanted]
        order = np.full(n, -1)
        order[start] = source
        order[order == -1] = np.setdiff1d(np.arange(n), source)
        return state.replace(
            bank=jax.device_put(bank[:, order], state.bank.sharding),
            bank_index=jax.device_put(bank_index[order], state.bank_index.sharding),
        )

    return align


def _by_sample(state):
    """The bank's rows in dataset-index order (every index once)."""
    order = np.argsort(state.bank_index)
    assert len(np.unique(state.bank_index)) == len(order) and state.bank_index.min() >= 0
    return state.bank[:, order]


@pytest.fixture(scope="module")
def runs():
    """The same two epochs (3 + 2 steps) on 8 devices, on one device, and on one device
    with each batch's samples in two other orders. Without colour augmentation the
    reorderings differ from the single-device run only by float32 summation order."""
    config = without_colour_augmentation(_config())
    n = _num_examples(config)
    batches = random_batches(config, 5)
    rng = np.random.default_rng(1)
    stream = np.concatenate([rng.permutation(n), rng.permutation(n)]).astype(np.int32)
    indices = [stream[s * config.batch_size:(s + 1) * config.batch_size] for s in range(5)]

    def reordered(seed):  # crops and indices permuted alike, one permutation per step
        order = [np.random.default_rng(seed + s).permutation(config.batch_size) for s in range(5)]
        return permuted(batches, seed), [i[o] for i, o in zip(indices, order)]

    mesh8 = make_mesh(config)
    assert mesh8.devices.size == 8
    sharded = _runner(config, mesh8)(batches, indices)
    align = _aligned_to(config, sharded[0], STEPS_PER_EPOCH * config.batch_size // 8)
    run_single = _runner(config, single_device_mesh())
    single = run_single(batches, indices, align)
    reorderings = [run_single(*reordered(seed), align) for seed in (1, 3)]
    return config, batches, indices, sharded, single, reorderings


@pytest.mark.slow
def test_sharded_equals_single_device(runs):
    config, _, _, (sharded, history), (single, single_history), reorderings = runs
    others = [run for run, _ in reorderings]
    # The bank after the fill and after an epoch of steps, per sample.
    for epoch in range(2):
        assert_within_reordering_noise(
            _by_sample(sharded["before_clustering"][epoch]), _by_sample(single["before_clustering"][epoch]),
            [_by_sample(o["before_clustering"][epoch]) for o in others],
        )
        # Every sample's label, and the centroids (the prototypes).
        for run in [sharded] + others:
            np.testing.assert_array_equal(run["after_clustering"][epoch].assignments,
                                          single["after_clustering"][epoch].assignments)
        labels = single["after_clustering"][epoch].assignments
        assert labels.shape == (1, _num_examples(config)) and np.all(labels >= 0)  # every sample in the bank
        assert len(np.unique(labels)) > 1
        assert_within_reordering_noise(
            sharded["after_clustering"][epoch].params, single["after_clustering"][epoch].params,
            [o["after_clustering"][epoch].params for o in others],
        )
    # Losses and metrics of every step, and the network after the last.
    assert_within_reordering_noise(history, single_history, [h for _, h in reorderings])
    strip = lambda s: s.replace(bank=None, bank_index=None)  # noqa: E731  (row order differs; compared above)
    assert_within_reordering_noise(strip(sharded["final"]), strip(single["final"]), [strip(o["final"]) for o in others])
    assert int(sharded["final"].step) == 5


def _scores(config, state, crops):
    """Each head's [V, B, K] scores of the step's augmented crops, recomputed outside the step."""
    dtype = jnp.dtype(config.model.dtype)
    model = build_model(config.model)

    def local(rng, step, variables, *c):
        images = augment_views(rng, step, c, config.augment, dtype=dtype, data_axis=("data", "bn"))
        (_, scores), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return scores

    fn = jax.jit(jax.shard_map(local, mesh=single_device_mesh(), in_specs=P(), out_specs=P(), check_vma=False))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return [np.asarray(s, np.float64) for s in fn(state.rng, state.step, variables, *map(jnp.asarray, crops))]


@pytest.mark.slow
def test_loss_is_cross_entropy_against_the_labels_of_the_batch_samples(runs):
    config, batches, indices, _, (single, history), _ = runs
    state = single["after_clustering"][1]  # before step 3, the first of epoch 1
    [scores] = _scores(config, state, batches[3])  # [V, B, K]
    labels = state.assignments[0, indices[3]]
    logits = scores / config.deepclusterv2.temperature
    m = logits.max(-1, keepdims=True)
    log_p = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_p, np.broadcast_to(labels[None, :, None], log_p.shape[:2] + (1,)), -1))
    np.testing.assert_allclose(history[3]["train/loss"], expected, rtol=1e-5)
    accuracy = np.mean(np.argmax(scores, -1) == labels[None])
    np.testing.assert_allclose(history[3]["train/label_accuracy"], accuracy, atol=1e-6)
    assert history[3]["train/labelled_fraction"] == 1.0
    # The prototypes are the unit centroids, one per column.
    kernel = state.params["prototypes_0"]["kernel"]
    assert kernel.shape == (config.model.proj_dim, 5)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, atol=1e-6)


@pytest.mark.slow
def test_prototypes_never_move_under_the_optimiser(runs):
    _, _, _, _, (single, _), _ = runs
    for epoch, last in ((0, single["before_clustering"][1]), (1, single["final"])):
        start = single["after_clustering"][epoch]
        # Bit for bit: no update, no weight decay; the rest of the network moved.
        np.testing.assert_array_equal(last.params["prototypes_0"]["kernel"], start.params["prototypes_0"]["kernel"])
        assert not np.allclose(last.params["projection_out"]["kernel"], start.params["projection_out"]["kernel"])
    # Their momentum never started.
    for path, leaf in jax.tree_util.tree_leaves_with_path(single["final"].opt_state):
        if "prototypes_0" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(leaf, 0.0)
    # The clustering changed them.
    assert not np.allclose(single["after_clustering"][1].params["prototypes_0"]["kernel"],
                           single["after_clustering"][0].params["prototypes_0"]["kernel"])


def test_fill_writes_every_row_and_clustering_labels_every_sample():
    # Fast: one device, the fill and one clustering, no train step.
    config = without_colour_augmentation(_config())
    config.model.num_prototypes = (5, 4)  # two heads, alternating the two assigning crops' banks
    mesh = single_device_mesh()
    program = METHOD.build(config, mesh, steps_per_epoch=STEPS_PER_EPOCH, total_steps=6,
                           num_examples=_num_examples(config) + 2)  # two samples never drawn
    state = program.init_state()
    assert state.bank.shape == (2, 48, config.model.proj_dim) and np.all(np.asarray(state.bank_index) == EMPTY)
    index = np.random.default_rng(0).permutation(_num_examples(config)).astype(np.int32).reshape(3, 16)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    batches = [{"crops": tuple(put(c, None, ("data", "bn")) for c in crops), "index": put(i, ("data", "bn"))}
               for crops, i in zip(random_batches(config, 3), index)]
    before = jax.device_get(state.batch_stats)
    state = deepclusterv2.fill_bank(config, state, deepclusterv2.make_fill_step(config, mesh), iter(batches), 3)
    np.testing.assert_array_equal(state.bank_index, index.reshape(-1))
    np.testing.assert_allclose(np.linalg.norm(state.bank, axis=-1), 1.0, atol=1e-5)
    assert not np.allclose(state.bank[0], state.bank[1])  # two different crops
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.device_get(state.batch_stats))
    assert any(jax.tree.leaves(moved))  # BatchNorm in train mode updated the running statistics
    state = METHOD.on_epoch_start(config, state, 0)
    labels = np.asarray(state.assignments)
    assert labels.shape == (2, 50)
    np.testing.assert_array_equal(labels[:, 48:], UNASSIGNED)
    assert np.all(labels[0, :48] >= 0) and np.all(labels[0, :48] < 5) and np.all(labels[1, :48] < 4)
    # Each head's labels are the argmax of its centroids on its own bank (head h: bank h % 2).
    for h in range(2):
        kernel = np.asarray(state.params[f"prototypes_{h}"]["kernel"])
        nearest = np.argmax(np.asarray(state.bank[h]) @ kernel, axis=-1)
        np.testing.assert_array_equal(labels[h, index.reshape(-1)], nearest)


# ---- the training program --------------------------------------------------------------


def _digits_config():
    c = _config()
    c.batch_size = 256  # 5 steps per epoch of the 1,437 digits
    c.model.num_prototypes = (12, 10)
    c.checkpoint_every_steps = 1
    c.keep_checkpoints = 10
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _saved_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_train_logs_resumes_bit_exact_and_clusters_at_epoch_boundaries(tmp_path, monkeypatch):
    config = _digits_config()
    calls = []

    def spy(name):
        original = getattr(METHOD, name)

        def wrapper(config, state, *args):
            calls.append((name, int(state.step), *[a for a in args if isinstance(a, int)]))
            return original(config, state, *args)

        return wrapper

    monkeypatch.setattr(METHOD, "on_epoch_start", spy("on_epoch_start"))
    monkeypatch.setattr(METHOD, "on_fresh_start", spy("on_fresh_start"))

    def run(workdir, max_steps):
        calls.clear()
        train(config, str(workdir), max_steps=max_steps)
        return list(calls)

    straight, mid, boundary = tmp_path / "straight", tmp_path / "mid", tmp_path / "boundary"
    assert run(straight, 6) == [("on_fresh_start", 0), ("on_epoch_start", 0, 0), ("on_epoch_start", 5, 1)]
    for workdir, step in ((mid, 3), (boundary, 5)):
        shutil.copytree(straight / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
    assert run(mid, 6) == [("on_epoch_start", 5, 1)]  # resumed at 3: the labels come from the checkpoint
    assert run(boundary, 6) == [("on_epoch_start", 5, 1)]  # resumed at a boundary: clusters again, alike

    logged = _metrics(straight)
    assert [m["step"] for m in logged] == list(range(1, 7))
    for m in logged:
        for key in ("loss", "lr", "grad_norm", "labelled_fraction", "label_accuracy"):
            assert np.isfinite(m[f"train/{key}"]), key
        assert 0 < m["train/labelled_fraction"] <= 1
    # The first epoch's labels come from the fill, which saw exactly its batches; the
    # second epoch's from the bank of the first epoch's 1,280 samples, not all 1,437.
    assert all(m["train/labelled_fraction"] == 1.0 for m in logged[:5])
    assert logged[5]["train/labelled_fraction"] < 1.0
    expected = _saved_state(straight, 6)
    for workdir in (mid, boundary):
        got = _saved_state(workdir, 6)
        for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(x, y)
        resumed = {m["step"]: m for m in _metrics(workdir)}
        assert min(resumed) == (4 if workdir == mid else 6)
        for m in logged[min(resumed) - 1:]:
            for key, value in m.items():
                if key != "train/images_per_sec":
                    assert resumed[m["step"]][key] == value, (workdir, m["step"], key)
    assert expected["assignments"].shape == (2, 1437)
    assert expected["bank"].shape == (2, 5 * 256, config.model.proj_dim)


# ---- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("deepclusterv2.crops_for_assign", (0, 0), "deepclusterv2.crops_for_assign"),
        ("deepclusterv2.crops_for_assign", (0, 2), "deepclusterv2.crops_for_assign"),  # a small crop
        ("deepclusterv2.crops_for_assign", (), "deepclusterv2.crops_for_assign"),
        ("deepclusterv2.temperature", 0.0, "deepclusterv2.temperature"),
        ("deepclusterv2.kmeans_iters", -1, "deepclusterv2.kmeans_iters"),
        ("model.num_prototypes", (5, 0), r"model.num_prototypes\[1\]"),
        ("model.proj_dim", 0, "model.proj_dim"),
        ("data.drop_remainder", False, "data.drop_remainder"),
    ],
)
def test_config_validation_names_the_key(key, value, match):
    config = _config()
    section, _, name = key.rpartition(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=8, num_processes=1)


def test_swav_keys_are_not_read():
    config = _config()
    config.swav.crops_for_assign = (5,)  # invalid for SwAV
    validate_config(config, num_devices=8, num_processes=1)


def test_bank_smaller_than_a_head_is_a_config_error():
    config = _config()
    config.model.num_prototypes = (5, 7)  # 6 rows per device
    with pytest.raises(ConfigError, match=r"model.num_prototypes: .* 3 x 2 = 6 rows, fewer than the 7"):
        METHOD.build(config, make_mesh(config), steps_per_epoch=3, total_steps=6, num_examples=48)
