"""Shared by the trainer tests: the method's state and step as `train()` builds them,
random uint8 crop batches, meshes and tree comparisons."""

import jax
import numpy as np

from swav_jax.train import optim
from swav_jax.train.loop import build_method


def build(config, mesh, data_axis, bn_group_axis, steps_per_epoch=10):
    """(state, train_step) of `config.method` over `config.epochs` epochs of `steps_per_epoch`."""
    schedule = optim.lr_schedule(
        config.optim, steps_per_epoch=steps_per_epoch, epochs=config.epochs, batch_size=config.batch_size
    )
    return build_method(
        config.copy_and_resolve_references(),  # build_method may edit its config
        schedule,
        mesh,
        steps_per_epoch=steps_per_epoch,
        total_steps=config.epochs * steps_per_epoch,
        data_axis=data_axis,
        bn_group_axis=bn_group_axis,
    )


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


def single_device_mesh():
    return jax.make_mesh((1, 1), ("data", "bn"), devices=jax.devices()[:1])


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
