"""A stand-in method whose step compiles in a moment, for testing the trainer's loop
(checkpoints, preemption, resume, metrics) without a ResNet: `python tests/toy_method.py
train ...` runs the `swav-jax` command line with it.

Its state is ToyState(params={'backbone': {'w': float32 [size]}}, batch_stats, step),
replicated over the mesh. Each step reports loss = grad_norm = sum(w**2) of the state
before it (as a real step reports the loss of the parameters it starts from), then
multiplies w by `grow`; `lag` seconds of sleep inside the step make the device, not the
host, set the pace.
"""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's swav_jax, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from swav_jax.methods.scaffold import Method, TrainProgram  # noqa: E402


@flax.struct.dataclass
class ToyState:
    params: dict
    batch_stats: dict
    step: jax.Array


class Toy(Method):
    name = "swav"

    def __init__(self, grow: float = 1.0, lag: float = 0.0, loss_from_state: bool = True, size: int = 4):
        self.grow, self.lag, self.loss_from_state, self.size = grow, lag, loss_from_state, size
        self.dispatched: list = []  # the metrics of every step dispatched

    def validate(self, config):
        pass

    def num_clusters(self, config):
        return 1000  # the loss never sits at ln K

    def collapse_hint(self, config):
        return ""

    def eval_variables(self, state):
        return {"params": state.params, "batch_stats": state.batch_stats}

    def build(self, config, mesh, *, steps_per_epoch, total_steps, num_examples):
        del num_examples
        device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        lag, grow, loss_from_state, size = self.lag, self.grow, self.loss_from_state, self.size

        def init_state():
            # 1 for the first 4 entries (the loss is 4 at the start), then noise that
            # does not compress (a checkpoint of 4 * size bytes).
            w = jnp.ones((size,), jnp.float32).at[4:].set(jax.random.uniform(jax.random.key(0), (size - 4,)) * 1e-6)
            return jax.device_put(ToyState(
                params={"backbone": {"w": w}},
                batch_stats={"backbone": {"mean": jnp.zeros((4,), jnp.float32)}},
                step=jnp.zeros((), jnp.int32),
            ), device)

        def sleep():
            time.sleep(lag)
            return np.float32(0)

        @jax.jit
        def step(state):
            w = state.params["backbone"]["w"]
            loss = jnp.sum(w * w) if loss_from_state else jnp.float32(1)
            if lag:
                loss = loss + jax.pure_callback(sleep, jax.ShapeDtypeStruct((), jnp.float32))
            state = state.replace(params={"backbone": {"w": w * grow}}, step=state.step + 1)
            return state, {"train/loss": loss, "train/grad_norm": loss}

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                jax.eval_shape(init_state))
        def train_step(state, batch):
            del batch
            state, metrics = step(state)
            self.dispatched.append(metrics)
            return state, metrics

        return TrainProgram(init_state=init_state, abstract_state=abstract, train_step=train_step)


def use_toy(monkeypatch=None, **kwargs) -> Toy:
    """Makes the trainer run a `Toy(**kwargs)` whatever `config.method` says."""
    from swav_jax.train import loop

    toy = Toy(**kwargs)
    if monkeypatch is not None:
        monkeypatch.setattr(loop, "get_method", lambda name: toy)
    else:
        loop.get_method = lambda name: toy
    return toy


if __name__ == "__main__":
    from swav_jax import cli

    use_toy(grow=float(os.environ.get("TOY_GROW", "1")), lag=float(os.environ.get("TOY_LAG", "0")),
            size=int(os.environ.get("TOY_SIZE", "4")))
    cli.main()
