"""A few train steps on a fixed synthetic global batch; run by tests, alone or as one of
several processes (launch/local_multiprocess.sh).

    python tests/train_worker.py OUT.npz [--steps 3] [--distributed]

Every process builds the same global batch and places its own rows with
`jax.make_array_from_process_local_data`; process 0 writes the losses and the final
parameters to OUT.npz.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import tiny_config  # noqa: E402
from swav_jax import cli  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--distributed", choices=("auto", "off"), default="off")
    args = parser.parse_args()
    cli._distributed_init(args.distributed)

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from swav_jax.models import build_model
    from swav_jax.train import optim
    from swav_jax.train.loop import make_mesh
    from swav_jax.train.step import init_state, make_train_step

    config = tiny_config.get_config()
    mesh, data_axis, bn_group_axis = make_mesh(config)
    schedule = optim.lr_schedule(config.optim, steps_per_epoch=10, epochs=config.epochs, batch_size=16)
    optimizer = optim.make_optimizer(
        config.optim, schedule, freeze_mask=optim.prototype_mask, freeze_steps=1
    )
    model = build_model(config.model, bn_axis_name="bn")
    state = init_state(config, model.clone(bn_axis_name=None), optimizer, mesh, data_axis=data_axis)
    step_fn = make_train_step(
        config, model, optimizer, schedule, mesh, steps_per_epoch=10, data_axis=data_axis,
        bn_group_axis=bn_group_axis,
    )
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P(None, data_axis))
    per_process = config.batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    losses = []
    for _ in range(args.steps):
        crops = []
        for n, s in zip(config.crops.num_crops, config.crops.size_crops):
            full = rng.integers(0, 256, size=(n, config.batch_size, s, s, 3), dtype=np.uint8)
            crops.append(jax.make_array_from_process_local_data(sharding, full[:, rows], full.shape))
        state, metrics = step_fn(state, {"crops": tuple(crops)})
        losses.append(float(jax.block_until_ready(metrics["train/loss"])))
    params = jax.tree.leaves(jax.tree.map(np.asarray, jax.device_get(state.params)))
    stats = jax.tree.leaves(jax.tree.map(np.asarray, jax.device_get(state.batch_stats)))
    if jax.process_index() == 0:
        np.savez(args.out, *params, *stats, losses=np.array(losses))


if __name__ == "__main__":
    main()
