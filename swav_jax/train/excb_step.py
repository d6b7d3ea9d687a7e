"""The data-parallel ExCB train step (SPEC §10): one jitted `shard_map` over the mesh.

Per device, in the release's order:
  1. augment the uint8 crops (the SwAV step's `augment_views`: same keys, same batch);
  2. teacher forward on the global crops (first resolution group), BN in train mode;
  3. student forward on all crops: h-path similarities of the global crops,
     predictor-path similarities of all crops;
  4. `excb_loss` with the tracker's sizes from before this step; gradients averaged
     over devices; SGD update;
  5. teacher <- m * teacher + (1 - m) * student (the updated student), m on a cosine
     schedule from `excb.teacher_momentum` to 1;
  6. tracker update with the hard assignments of this step's teacher scores (counts
     `psum`-reduced over devices).
Everything in the state is replicated; crops are sharded over the data axis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swav_jax import balancing
from swav_jax.models.excb import ExCBModel
from swav_jax.train.excb_optim import teacher_momentum
from swav_jax.train.step import augment_views


@flax.struct.dataclass
class ExCBTrainState:
    """Explicit ExCB training state; what orbax saves.

    Attributes:
      step: [] int32, iterations done.
      params: student parameters, float32, replicated.
      batch_stats: student BatchNorm running statistics, float32, replicated.
      teacher_params: EMA teacher parameters (same tree as `params`), float32, replicated.
      teacher_batch_stats: teacher BatchNorm running statistics, from the teacher's own
        train-mode forwards (the EMA covers parameters only, as the release's).
      cluster_sizes: [K] float32 tracker state s (fractions, sum 1), replicated.
      opt_state: optimiser state, replicated.
      rng: [2] uint32 raw PRNG key data for augmentation, replicated.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    teacher_params: Any
    teacher_batch_stats: Any
    cluster_sizes: jax.Array
    opt_state: Any
    rng: jax.Array


def teacher_variables(state: ExCBTrainState) -> dict[str, Any]:
    """{'params', 'batch_stats'} of the teacher: the network ExCB evaluates (as the release)."""
    return {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}


def make_train_step(
    config: ml_collections.ConfigDict,
    model: ExCBModel,
    optimizer: optax.GradientTransformation,
    lr_schedule: Callable[[jax.Array], jax.Array],
    mesh: Mesh,
    *,
    total_steps: int,
    data_axis: str | tuple[str, ...] = "data",
    bn_group_axis: str | None = None,
) -> Callable[[ExCBTrainState, dict], tuple[ExCBTrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`, jitted, state donated.

    Args:
      config: the full config (excb, augment, crops, model keys are read).
      model: an `ExCBModel` whose BatchNorm reduces over its BN axis inside the mesh.
      optimizer: from `swav_jax.train.excb_optim.make_excb_optimizer`.
      lr_schedule: per-step learning rate, for the metrics.
      mesh: device mesh; the batch is sharded over `data_axis`.
      total_steps: iterations of the whole run (the teacher momentum's schedule).
      data_axis: the mesh axis name(s) the batch is split over.
      bn_group_axis: with BN synchronised in groups, the mesh axis across groups (BN
        statistics are averaged over it after the step so the state stays replicated).

    The batch is `{'crops': tuple of uint8 [num_crops_g, global_batch, S_g, S_g, 3]}` as
    for SwAV; the first group's crops are the global views the teacher sees. Metrics are
    float32 scalars, the same on every device.
    """
    excb = config.excb
    compute_dtype = jnp.dtype(config.model.dtype)
    momentum = teacher_momentum(float(excb.teacher_momentum), total_steps)
    temperatures = dict(
        teacher_temperature=float(excb.teacher_temperature),
        student_temperature=float(excb.student_temperature),
    )

    def local_step(state: ExCBTrainState, crops: tuple[jax.Array, ...]):
        images = augment_views(state.rng, state.step, crops, config.augment, dtype=compute_dtype, data_axis=data_axis)

        teacher, teacher_vars = model.apply(
            {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats},
            images[:1],
            train=True,
            mutable=["batch_stats"],
            method=ExCBModel.teacher_similarities,
        )
        teacher = jax.lax.stop_gradient(teacher)  # [G, b, K]

        def loss_fn(p):
            (student, predictor), new_vars = model.apply(
                {"params": p, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            loss = balancing.excb_loss(
                teacher, student, predictor, state.cluster_sizes, **temperatures
            )
            return loss, new_vars["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # The loss is a per-device mean over equal local batches: average everything.
        grads = jax.lax.pmean(grads, data_axis)
        loss = jax.lax.pmean(loss, data_axis)
        teacher_batch_stats = teacher_vars["batch_stats"]
        if bn_group_axis is not None:
            # BN is synchronised within a group only: keep the state replicated with the
            # mean over groups of the per-group running statistics (linear updates).
            batch_stats, teacher_batch_stats = jax.lax.pmean((batch_stats, teacher_batch_stats), bn_group_axis)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        m = momentum(state.step)
        teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher_params, params)

        stats = balancing.excb_metrics(
            teacher, state.cluster_sizes, teacher_temperature=temperatures["teacher_temperature"], axis_name=data_axis
        )
        sizes = balancing.update_cluster_sizes(
            state.cluster_sizes, teacher, momentum=float(excb.tracker_momentum), axis_name=data_axis
        )
        metrics = {
            "train/loss": loss,
            "train/lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
            "train/grad_norm": optax.tree.norm(grads),
            "train/teacher_momentum": m,
            **{f"train/{name}": value for name, value in stats.items()},
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            teacher_params=teacher_params,
            teacher_batch_stats=teacher_batch_stats,
            cluster_sizes=sizes,
            opt_state=opt_state,
        )
        return new_state, metrics

    sharded = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(P(), P(None, data_axis)),
        out_specs=(P(), P()),
        check_vma=False,
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: ExCBTrainState, batch: dict) -> tuple[ExCBTrainState, dict]:
        return sharded(state, tuple(batch["crops"]))

    return train_step


def init_state(
    config: ml_collections.ConfigDict,
    model: ExCBModel,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
) -> ExCBTrainState:
    """The initial state from `config.seed`, replicated on the mesh.

    The teacher starts as a copy of the student (parameters and BN statistics), the
    tracker at uniform sizes 1/K.
    """
    init_rng, data_rng = jax.random.split(jax.random.key(config.seed))
    dummy = [
        jnp.zeros((n, 2, s, s, 3), jnp.float32) for n, s in zip(config.crops.num_crops, config.crops.size_crops)
    ]
    variables = jax.jit(functools.partial(model.init, train=True))(init_rng, dummy)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    state = ExCBTrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        cluster_sizes=balancing.init_cluster_sizes(int(config.excb.num_clusters)),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(data_rng),  # raw uint32 words: checkpointable
    )
    return jax.device_put(state, NamedSharding(mesh, P()))
