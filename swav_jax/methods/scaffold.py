"""What every method shares: the interface, the jitted `shard_map` step, initial and
abstract states, and the averaging that keeps replicas equal.

A method (`swav_jax/methods/<name>.py`) subclasses `Method`. Its `build` returns a
`TrainProgram` for a mesh: the placed initial state (lazily), the abstract state (the
restore target, and what `swav-jax plan` compiles against without any device), and the
jitted train step. The loop in `swav_jax/train/loop.py` sees only this interface.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swav_jax.mesh import bn_group_axis, data_axes

# How each batch field is laid out over the mesh: crops [num_crops_g, B, S, S, 3] split
# on the batch dimension, per-sample vectors [B] likewise.
_BATCH_FIELD_AXIS = {"crops": 1, "index": 0, "label": 0}


def batch_spec(name: str, mesh: Mesh) -> P:
    """The PartitionSpec of batch field `name`: split over the data axes on its batch dimension."""
    return P(*([None] * _BATCH_FIELD_AXIS[name]), data_axes(mesh))


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh, fields: Sequence[str]) -> dict[str, Any]:
    """ShapeDtypeStructs with shardings of the batch fields `fields` as the input pipeline
    lays them out for a step (B = config.batch_size, global): 'crops' a tuple of uint8
    [num_crops_g, B, S_g, S_g, 3], one per resolution group; 'index' and 'label' int32 [B]."""
    def struct(shape, dtype, name):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, batch_spec(name, mesh)))

    batch_size = int(config.batch_size)
    batch = {}
    for name in fields:
        if name == "crops":
            batch[name] = tuple(
                struct((int(n), batch_size, int(s), int(s), 3), jnp.uint8, name)
                for n, s in zip(config.crops.num_crops, config.crops.size_crops)
            )
        else:
            batch[name] = struct((batch_size,), jnp.int32, name)
    return batch


class TrainProgram(NamedTuple):
    """A method's training program on one mesh.

    init_state: () -> the initial state from `config.seed`, placed on the mesh.
    abstract_state: ShapeDtypeStructs with shardings of that state (no device work).
    train_step: jitted (state, batch) -> (state, metrics); donates `state`. `batch` is
      the input pipeline's dict; the step reads the fields in `Method.batch_fields`.
      Metrics are float32 scalars, equal on every device.
    """

    init_state: Callable[[], Any]
    abstract_state: Any
    train_step: Callable[[Any, dict], tuple[Any, dict]]


class Method(abc.ABC):
    """A self-supervised method the trainer can run (`config.method = name`).

    To add one: subclass this in `swav_jax/methods/<name>.py`, register an instance in
    `swav_jax/methods/__init__.py`, add its config keys to swav_jax/configs/base.py and a recipe in
    swav_jax/configs/. The trainer calls, in order: `validate` (once, with the rest of the
    config), `build`, `on_fresh_start` (a new run only; not on resume), then per step
    `on_epoch_start` at every epoch boundary and `train_step`.
    """

    name: ClassVar[str]
    # The state fields holding the network evaluation and export see: its
    # {'params', 'batch_stats'}, with the trunk under 'backbone' in both.
    eval_fields: ClassVar[tuple[str, str]] = ("params", "batch_stats")
    # The batch fields the step reads (of 'crops', 'index', 'label').
    batch_fields: ClassVar[tuple[str, ...]] = ("crops",)

    @abc.abstractmethod
    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Checks the method's own config keys; raises ConfigError naming the key."""

    @abc.abstractmethod
    def build(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        *,
        steps_per_epoch: int,
        total_steps: int,
        num_examples: int,
    ) -> TrainProgram:
        """The program for `mesh` (a `swav_jax.mesh` mesh) and a run of `total_steps`
        steps of `steps_per_epoch` over a training set of `num_examples` samples (the
        range of the batches' 'index'). `config` is validated and resolved; a value
        that only these sizes make invalid raises ConfigError naming its key."""

    @abc.abstractmethod
    def num_clusters(self, config: ml_collections.ConfigDict) -> int:
        """K of the loss: a loss stuck at ln K means the assignments collapsed."""

    @abc.abstractmethod
    def collapse_hint(self, config: ml_collections.ConfigDict) -> str:
        """What to change when the loss sits at ln K."""

    def usage_watch(self, config: ml_collections.ConfigDict) -> tuple[int, str] | None:
        """(prototypes a step's codes can use, what to change when they use only a few),
        for methods that log train/assignment_entropy; None: the loss is watched alone."""
        del config
        return None

    def on_fresh_start(self, config: ml_collections.ConfigDict, state: Any, mesh: Mesh) -> Any:
        """Data-dependent initialisation before the first step of a new run."""
        del config, mesh
        return state

    def on_epoch_start(self, config: ml_collections.ConfigDict, state: Any, epoch: int) -> Any:
        """Work at the start of every epoch (before its first step), resumed runs included."""
        del config, epoch
        return state

    def eval_variables(self, state: Any) -> dict[str, Any]:
        """{'params', 'batch_stats'} of the network evaluation sees."""
        params, batch_stats = (getattr(state, f) for f in self.eval_fields)
        return {"params": params, "batch_stats": batch_stats}


def init_variables(model, config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
    """`model.init` on zero crops of every resolution group of `config.crops` (2 images)."""
    dummy = [
        jnp.zeros((n, 2, s, s, 3), jnp.float32) for n, s in zip(config.crops.num_crops, config.crops.size_crops)
    ]
    return model.init(rng, dummy, train=True)


def replicated_specs(state: Any) -> Any:
    """PartitionSpecs of a state whose every leaf is replicated."""
    return jax.tree.map(lambda _: P(), state)


def shardings(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def placed_and_abstract(
    init: Callable[[], Any], specs: Callable[[Any], Any], mesh: Mesh
) -> tuple[Callable[[], Any], Any]:
    """(lazy placed init, abstract state) of a pure `init() -> state` whose layout is
    `specs(abstract state) -> PartitionSpec tree`. The initial state is computed on the
    mesh directly (jit with out_shardings), on every process alike."""
    abstract = jax.eval_shape(init)
    out = shardings(mesh, specs(abstract))
    structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, out)
    return jax.jit(init, out_shardings=out), structs


def sharded_train_step(
    local_step: Callable[[Any, dict], tuple[Any, dict]],
    mesh: Mesh,
    state_specs: Any,
    batch_fields: Sequence[str],
) -> Callable[[Any, dict], tuple[Any, dict]]:
    """`jit(shard_map(local_step))` with the state donated.

    `local_step(state, batch)` is per-device code: it sees this device's share of the
    batch fields (split over all mesh axes) and returns the new state and float32 scalar
    metrics that are already equal on every device.
    """
    batch_specs = {name: batch_spec(name, mesh) for name in batch_fields}
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(state_specs, batch_specs), out_specs=(state_specs, P()), check_vma=False
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch: dict):
        fields = {}
        for name in batch_fields:
            fields[name] = tuple(batch[name]) if name == "crops" else batch[name]
        return sharded(state, fields)

    return train_step


def sync_batch_stats(batch_stats: Any, mesh: Mesh) -> Any:
    """Inside shard_map: BN running statistics (any tree of them) averaged over the BN
    groups. Within a group they are equal already; between groups they differ, and
    their mean (the running update is linear) keeps the state replicated."""
    group_axis = bn_group_axis(mesh)
    return batch_stats if group_axis is None else jax.lax.pmean(batch_stats, group_axis)


def sync_replicas(grads: Any, loss: jax.Array, batch_stats: Any, mesh: Mesh) -> tuple[Any, jax.Array, Any]:
    """Inside the step: the gradients and the loss averaged over every device (each is a
    mean over an equal local batch), and the BN running statistics averaged over the BN
    groups (`sync_batch_stats`)."""
    grads, loss = jax.lax.pmean((grads, loss), data_axes(mesh))
    return grads, loss, sync_batch_stats(batch_stats, mesh)
