"""The data-parallel SwAV train step: one jitted `shard_map` over the device mesh.

Per device: augment the uint8 crops, normalise the prototypes, forward all crops,
Sinkhorn codes (sums `psum`-reduced over the data axis; queue in front once full),
swapped-prediction loss, gradients averaged over devices, optimiser update, queue
update. Parameters, BN statistics and optimiser state are replicated; crops and the
queue are sharded over the data axis.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swav_jax import losses
from swav_jax.data import augment
from swav_jax.models import PROTOTYPES_PREFIX, normalize_prototypes
from swav_jax.train.state import TrainState


def queue_start_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    return int(config.swav.epoch_queue_starts) * steps_per_epoch


def _queue_full(queue: jax.Array, data_axis) -> jax.Array:
    # The release's test: the oldest slot holds an embedding (unit norm, never zero).
    # pmin keeps every device on the same branch.
    full = jnp.all(jnp.any(queue[:, -1] != 0, axis=-1))
    return jax.lax.pmin(full.astype(jnp.int32), data_axis) > 0


def _crop_keys(step_key: jax.Array, views: jax.Array, samples: jax.Array) -> jax.Array:
    """[len(views), len(samples)] keys, one per (crop index, global sample index)."""
    per_view = lambda v: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(step_key, v), i))(samples)
    return jax.vmap(per_view)(views)


def augment_views(
    rng: jax.Array,
    step: jax.Array,
    crops: tuple[jax.Array, ...],
    augment_config: ml_collections.ConfigDict,
    *,
    dtype,
    data_axis: str | tuple[str, ...],
) -> list[jax.Array]:
    """Device-side augmentation of this device's crops, inside the step's `shard_map`.

    One key per crop of each sample, folded from (rng, step, crop index, the sample's
    index in the global batch): the augmentation does not depend on how the batch is
    split over devices.

    Args:
      rng: [2] uint32 raw key data (the state's `rng`).
      step: [] int32, the state's step.
      crops: one uint8 [num_crops_g, b, S_g, S_g, 3] array per resolution group (b the
        local batch), crop-major over the groups.
      augment_config: `config.augment`.
      dtype: output dtype (the model's compute dtype).
      data_axis: the mesh axis name(s) the batch is split over.

    Returns:
      One [num_crops_g, b, S_g, S_g, 3] `dtype` array per group, normalised.
    """
    local_batch = crops[0].shape[1]
    first = jax.lax.axis_index(data_axis) * local_batch
    step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    images = []
    view = 0
    for group in crops:
        n, b = group.shape[:2]
        keys = _crop_keys(step_key, view + jnp.arange(n), first + jnp.arange(b)).reshape(n * b)
        flat = group.reshape((n * b,) + group.shape[2:])
        out = jax.vmap(
            lambda key, image: augment.augment_crops(key, image[None], augment_config, dtype=dtype)[0]
        )(keys, flat)
        images.append(out.reshape((n, b) + out.shape[1:]))
        view += n
    return images


def make_train_step(
    config: ml_collections.ConfigDict,
    model,
    optimizer: optax.GradientTransformation,
    lr_schedule: Callable[[jax.Array], jax.Array],
    mesh: Mesh,
    *,
    steps_per_epoch: int,
    data_axis: str | tuple[str, ...] = "data",
    bn_group_axis: str | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`, jitted, state donated.

    Args:
      config: the full config (swav, augment, model keys are read).
      model: a `SwAVModel` whose BatchNorm reduces over `data_axis` (or its BN group axis).
      optimizer: from `swav_jax.train.optim.make_optimizer`.
      lr_schedule: per-step learning rate, for the metrics.
      mesh: device mesh; the batch is sharded over `data_axis`.
      steps_per_epoch: iterations per epoch (for the queue start).
      data_axis: the mesh axis name(s) the batch is split over.
      bn_group_axis: with BN synchronised in groups, the mesh axis across groups (BN
        statistics are averaged over it after the step so the state stays replicated).

    The batch is `{'crops': tuple of uint8 [num_crops_g, global_batch, S_g, S_g, 3]}`,
    one array per resolution group, sharded `P(None, data_axis)`. Metrics are float32
    scalars averaged over devices.
    """
    swav = config.swav
    crops_for_assign = tuple(swav.crops_for_assign)
    compute_dtype = jnp.dtype(config.model.dtype)
    queue_start = queue_start_step(config, steps_per_epoch)
    aug_config = config.augment

    def local_step(state: TrainState, crops: tuple[jax.Array, ...]):
        local_batch = crops[0].shape[1]
        images = augment_views(
            state.rng, state.step, crops, aug_config, dtype=compute_dtype, data_axis=data_axis
        )

        # The release normalises the stored prototypes in place before the forward:
        # the normalised weights are the parameters from here on.
        params = normalize_prototypes(state.params)
        use_queue = jnp.bool_(False) if state.queue is None else _queue_full(state.queue, data_axis)

        def loss_fn(p):
            (embeddings, scores), new_vars = model.apply(
                {"params": p, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            head_losses, head_codes = [], []
            for h, head_scores in enumerate(scores):
                kernel = p[f"{PROTOTYPES_PREFIX}{h}"]["kernel"]  # [D, K_h], unit columns
                kwargs = dict(
                    crops_for_assign=crops_for_assign,
                    epsilon=swav.epsilon,
                    num_iters=swav.sinkhorn_iterations,
                    axis_name=data_axis,
                )
                detached = jax.lax.stop_gradient(head_scores)
                if state.queue is not None:
                    queue_scores = state.queue @ jax.lax.stop_gradient(kernel)
                    codes = jax.lax.cond(
                        use_queue,
                        lambda: losses.assign_codes(detached, queue_scores=queue_scores, **kwargs),
                        lambda: losses.assign_codes(detached, **kwargs),
                    )
                else:
                    codes = losses.assign_codes(detached, **kwargs)
                head_codes.append(codes)
                head_losses.append(
                    losses.swapped_prediction_loss(
                        head_scores, codes, crops_for_assign=crops_for_assign, temperature=swav.temperature
                    )
                )
            loss = sum(head_losses) / len(head_losses)
            return loss, (embeddings, head_codes[0], new_vars["batch_stats"])

        (loss, (embeddings, codes, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # The loss is a per-device mean over equal local batches: average everything.
        grads = jax.lax.pmean(grads, data_axis)
        loss = jax.lax.pmean(loss, data_axis)
        if bn_group_axis is not None:
            # BN statistics are synchronised within a group only; keep the state
            # replicated with the mean over groups of the per-group running statistics
            # (the running update is linear in the batch statistics).
            batch_stats = jax.lax.pmean(batch_stats, bn_group_axis)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)

        queue = state.queue
        if queue is not None:
            # Shift by the local batch, newest embeddings of the assigning crops in front.
            newest = jax.lax.stop_gradient(embeddings[jnp.array(crops_for_assign)]).astype(queue.dtype)
            shifted = jnp.concatenate([newest, queue[:, :-local_batch]], axis=1)
            queue = jnp.where(state.step >= queue_start, shifted, queue)

        usage = losses.prototype_usage(codes, axis_name=data_axis)
        metrics = {
            "train/loss": loss,
            "train/lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
            "train/empty_prototypes": usage["empty_prototypes"],
            "train/assignment_entropy": usage["assignment_entropy"],
            "train/grad_norm": optax.tree.norm(grads),
            "train/queue_in_use": jnp.asarray(use_queue, jnp.float32),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, queue=queue
        )
        return new_state, metrics

    has_queue = int(swav.queue_length) > 0
    state_specs = TrainState(
        step=P(),
        params=P(),
        batch_stats=P(),
        opt_state=P(),
        queue=P(None, data_axis) if has_queue else None,
        rng=P(),
    )
    batch_spec = P(None, data_axis)
    sharded = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(state_specs, batch_spec),
        out_specs=(state_specs, P()),
        check_vma=False,
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return sharded(state, tuple(batch["crops"]))

    return train_step


def state_shardings(mesh: Mesh, state: TrainState, data_axis: str | tuple[str, ...] = "data") -> TrainState:
    """NamedShardings for a TrainState: everything replicated but the queue."""
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, state)
    if state.queue is None:
        return shardings
    return shardings.replace(queue=NamedSharding(mesh, P(None, data_axis)))


def crops_sharding(mesh: Mesh, data_axis: str | tuple[str, ...] = "data") -> NamedSharding:
    return NamedSharding(mesh, P(None, data_axis))


def init_state(
    config: ml_collections.ConfigDict,
    model,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    data_axis: str | tuple[str, ...] = "data",
) -> TrainState:
    """Initialises the train state from `config.seed`, placed on the mesh.

    The queue holds `swav.queue_length` embeddings in total (already validated to be a
    multiple of the global batch), split evenly over the devices; None without a queue.
    """
    init_rng, data_rng = jax.random.split(jax.random.key(config.seed))
    sizes = tuple(config.crops.size_crops)
    counts = tuple(config.crops.num_crops)
    dummy = [jnp.zeros((n, 2, s, s, 3), jnp.float32) for n, s in zip(counts, sizes)]
    variables = jax.jit(functools.partial(model.init, train=True))(init_rng, dummy)
    params = normalize_prototypes(variables["params"])
    queue = None
    if int(config.swav.queue_length) > 0:
        queue = jnp.zeros(
            (len(config.swav.crops_for_assign), int(config.swav.queue_length), int(config.model.proj_dim)),
            jnp.float32,
        )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        queue=queue,
        rng=jax.random.key_data(data_rng),  # raw uint32 words: checkpointable
    )
    return jax.device_put(state, state_shardings(mesh, state, data_axis))
