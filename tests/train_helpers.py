"""Shared by the trainer tests: the method's state and step as `train()` builds them,
random uint8 crop batches, meshes, tree comparisons, and the float32 summation-order
noise that sharded-versus-unsharded comparisons are judged against."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.mesh import data_axes
from swav_jax.methods import get_method


def build(config, mesh, steps_per_epoch=10):
    """(initial state, train_step) of `config.method` as `train()` builds them, over
    `config.epochs` epochs of `steps_per_epoch` (a data set of exactly that many
    global batches)."""
    program = get_method(config.method).build(
        config.copy_and_resolve_references(), mesh, steps_per_epoch=steps_per_epoch,
        total_steps=config.epochs * steps_per_epoch, num_examples=steps_per_epoch * config.batch_size,
    )
    return program.init_state(), program.train_step


def run_steps(config, mesh, runs, steps_per_epoch=10):
    """Each run (a list of batches) from the same initial state, through one compiled step.

    Returns, per run, (host states before each step and after the last, host metrics of
    each step).
    """
    state, step = build(config, mesh, steps_per_epoch)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    initial = jax.device_get(state)
    crops_sharding = NamedSharding(mesh, P(None, data_axes(mesh)))
    results = []
    for batches in runs:
        state = jax.device_put(initial, state_shardings)
        states, history = [initial], []
        for crops in batches:
            batch = {"crops": tuple(jax.device_put(c, crops_sharding) for c in crops)}
            state, metrics = step(state, batch)  # donates its input state
            history.append(jax.device_get(jax.block_until_ready(metrics)))
            states.append(jax.device_get(state))
        results.append((states, history))
    return results


def random_batches(config, num_steps, seed=0):
    """`num_steps` batches: per resolution group, uint8 [num_crops, batch, S, S, 3]."""
    rng = np.random.default_rng(seed)
    return [
        [
            rng.integers(0, 256, size=(n, config.batch_size, s, s, 3), dtype=np.uint8)
            for n, s in zip(config.crops.num_crops, config.crops.size_crops)
        ]
        for _ in range(num_steps)
    ]


def permuted(batches, seed):
    """The same batches with their samples in another order (one permutation per step)."""
    out = []
    for crops in batches:
        order = np.random.default_rng(seed).permutation(crops[0].shape[1])
        out.append([c[:, order] for c in crops])
        seed += 1
    return out


def without_colour_augmentation(config):
    """A copy of `config` whose device augmentation is normalisation only.

    The device augmentation draws each crop's parameters from the sample's position in
    the global batch; without it a train step is symmetric in the order of the batch's
    samples (every batch reduction is a sum), so re-running it on a permuted batch
    changes nothing but the float32 summation order.
    """
    config = config.copy_and_resolve_references()
    config.augment.color_jitter_prob = 0.0
    config.augment.grayscale_prob = 0.0
    config.augment.blur_prob = 0.0
    return config


def single_device_mesh():
    return jax.make_mesh((1, 1), ("data", "bn"), devices=jax.devices()[:1])


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_within_reordering_noise(actual, expected, reorderings, *, factor=4.0):
    """`actual` deviates from `expected` by no more than float32 summation order can.

    `expected` is an unsharded run and `reorderings` the same run on permuted batches
    (`permuted`, `without_colour_augmentation`): mathematically equal to `expected`, so
    their deviation from it is the float32 noise of this computation, which training
    amplifies (LARS normalises each layer's gradient: the pre-BN bias, whose exact
    gradient is zero, moves by a full LARS step of pure rounding noise). A sharded run
    reorders the same sums. Per leaf: max |actual - expected| <= factor x the largest
    such deviation, plus 2 ulp of the leaf's magnitude for leaves where the reorderings
    happened to round alike. A sharding error (a missing psum or pmean, BatchNorm over
    one device) is orders of magnitude above this bound.
    """
    paths = jax.tree_util.tree_leaves_with_path(expected)
    others = [jax.tree.leaves(r) for r in reorderings]
    for i, ((path, e), a) in enumerate(zip(paths, jax.tree.leaves(actual), strict=True)):
        e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
        noise = max(np.abs(np.asarray(o[i], np.float64) - e).max(initial=0.0) for o in others)
        floor = 2 * np.spacing(np.float32(np.abs(e).max(initial=0.0)))
        deviation = np.abs(a - e).max(initial=0.0)
        assert deviation <= factor * noise + floor, (
            f"{jax.tree_util.keystr(path)}: deviates by {deviation:.3g}, reordering noise {noise:.3g} "
            f"(bound {factor} x noise + {floor:.3g})"
        )
