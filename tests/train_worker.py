"""A few train steps on a fixed synthetic global batch; run by tests, alone or as one of
several processes (launch/local_multiprocess.sh).

    python tests/train_worker.py OUT.npz [--steps 3] [--reorderings 2] [--distributed auto]

Every process builds the same global batches and places its own rows with
`jax.make_array_from_process_local_data`; process 0 writes the losses and the final
parameters and BN statistics to OUT.npz (`r0_losses`, `r0_0`, `r0_1`, ...). With
`--reorderings N` (one process only) the same steps are also run from the same initial
state on N permutations of the batches (`r1_...`, ...): their spread is the float32
summation-order noise the multi-process run is judged against (train_helpers).
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
    parser.add_argument("--reorderings", type=int, default=0)
    parser.add_argument("--distributed", choices=("auto", "off"), default="off")
    args = parser.parse_args()
    cli._start_jax(tiny_config.get_config(), args.distributed)

    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from swav_jax.mesh import data_axes, make_mesh
    from train_helpers import build, permuted, random_batches, without_colour_augmentation

    if args.reorderings and jax.process_count() > 1:
        raise SystemExit("--reorderings needs a single process")
    config = without_colour_augmentation(tiny_config.get_config())
    mesh = make_mesh(config)
    state, step_fn = build(config, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    initial = jax.device_get(state) if args.reorderings else None
    batches = random_batches(config, args.steps)
    crops_sharding = NamedSharding(mesh, P(None, data_axes(mesh)))
    per_process = config.batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    results = {}
    for r in range(args.reorderings + 1):
        if r:
            state = jax.device_put(initial, shardings)
        losses = []
        for crops in batches if r == 0 else permuted(batches, 2 * r - 1):
            local = tuple(jax.make_array_from_process_local_data(crops_sharding, c[:, rows], c.shape) for c in crops)
            state, metrics = step_fn(state, {"crops": local})
            losses.append(float(jax.block_until_ready(metrics["train/loss"])))
        leaves = jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))
        results.update({f"r{r}_{i}": np.asarray(x) for i, x in enumerate(leaves)})
        results[f"r{r}_losses"] = np.array(losses)
    if jax.process_index() == 0:
        np.savez(args.out, **results)


if __name__ == "__main__":
    main()
