"""SwAV (Caron et al., 2020): swapped prediction of Sinkhorn codes, with a queue.

The step, per device: augment the uint8 crops, normalise the prototypes, forward all
crops, Sinkhorn codes of the assigning crops (sums `psum`-reduced over the devices;
the queue in front once full), the swapped-prediction loss, gradients averaged over
devices, LARS update (prototypes frozen for the first iterations), queue update.
Parameters, BN statistics and optimiser state are replicated; crops and the queue are
sharded over the data axes. docs/ALGORITHM.md states the algorithm.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec as P

from swav_jax import losses, optim
from swav_jax.checks import assigning_crops, non_negative_int, positive_int, real, require
from swav_jax.data.augment import augment_views
from swav_jax.mesh import data_axes
from swav_jax.methods import scaffold
from swav_jax.models import PROTOTYPES_PREFIX, build_model, normalize_prototypes


@flax.struct.dataclass
class TrainState:
    """Everything the next SwAV step needs; what orbax saves.

    Attributes:
      step: [] int32, iterations done.
      params: model parameters, float32, replicated.
      batch_stats: BatchNorm running statistics, float32, replicated.
      opt_state: optimiser state (momentum, step counters), replicated.
      queue: [A, L, D] float32 embedding queues, one FIFO per assigning crop; L is
        the total length over devices and each device holds its own [A, L / devices, D]
        (sharded over the data axes on dimension 1); None without a queue. All zeros
        until the queue epoch starts; used once full.
      rng: [2] uint32 raw PRNG key data (`jax.random.key_data`) for augmentation,
        replicated; per-step and per-crop keys are folded in from it.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    queue: jax.Array | None
    rng: jax.Array


def validate_network(model: ml_collections.ConfigDict) -> None:
    """The `config.model` keys of the head and prototypes (`SwAVModel`)."""
    require(len(model.num_prototypes) >= 1, "model.num_prototypes", "needs at least one prototype head")
    for i, k in enumerate(model.num_prototypes):
        positive_int(k, f"model.num_prototypes[{i}]")
    positive_int(model.proj_dim, "model.proj_dim")
    non_negative_int(model.hidden_dim, "model.hidden_dim")


def effective_queue_length(config: ml_collections.ConfigDict) -> int:
    """The release rounds the queue down to a multiple of the global batch."""
    length = int(config.swav.queue_length)
    return length - length % int(config.batch_size)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """LARS as `config.optim` says, the prototypes frozen for `swav.freeze_prototypes_niters`."""
    return optim.make_optimizer(
        config.optim, schedule, freeze_mask=optim.prototype_mask, freeze_steps=int(config.swav.freeze_prototypes_niters)
    )


def init_state(config: ml_collections.ConfigDict, model, optimizer: optax.GradientTransformation) -> TrainState:
    """The initial state from `config.seed` (unplaced; pure, so it can be jitted or
    evaluated abstractly). The queue holds `effective_queue_length` embeddings in total;
    None without a queue."""
    init_rng, data_rng = jax.random.split(jax.random.key(config.seed))
    variables = scaffold.init_variables(model, config, init_rng)
    params = normalize_prototypes(variables["params"])
    length = effective_queue_length(config)
    queue = None
    if length > 0:
        queue = jnp.zeros((len(config.swav.crops_for_assign), length, int(config.model.proj_dim)), jnp.float32)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        queue=queue,
        rng=jax.random.key_data(data_rng),  # raw uint32 words: checkpointable
    )


def state_specs(state: TrainState, mesh: Mesh) -> TrainState:
    """Everything replicated but the queue, split over the data axes on its dimension 1."""
    specs = scaffold.replicated_specs(state)
    if state.queue is None:
        return specs
    return specs.replace(queue=P(None, data_axes(mesh)))


def _queue_full(queue: jax.Array, axes) -> jax.Array:
    # The release's test: the oldest slot holds an embedding (unit norm, never zero).
    # pmin keeps every device on the same branch.
    full = jnp.all(jnp.any(queue[:, -1] != 0, axis=-1))
    return jax.lax.pmin(full.astype(jnp.int32), axes) > 0


def make_local_step(config: ml_collections.ConfigDict, model, optimizer, schedule, mesh: Mesh, *, queue_start: int):
    """The per-device step body (`scaffold.sharded_train_step` runs it under shard_map)."""
    swav = config.swav
    crops_for_assign = tuple(swav.crops_for_assign)
    compute_dtype = jnp.dtype(config.model.dtype)
    axes = data_axes(mesh)
    sinkhorn_args = dict(
        crops_for_assign=crops_for_assign,
        epsilon=float(swav.epsilon),
        num_iters=int(swav.sinkhorn_iterations),
        axis_name=axes,
    )

    def local_step(state: TrainState, batch: dict):
        crops = batch["crops"]
        local_batch = crops[0].shape[1]
        images = augment_views(state.rng, state.step, crops, config.augment, dtype=compute_dtype, data_axis=axes)

        # The release normalises the stored prototypes in place before the forward:
        # the normalised weights are the parameters from here on.
        params = normalize_prototypes(state.params)
        use_queue = jnp.bool_(False) if state.queue is None else _queue_full(state.queue, axes)

        def loss_fn(p):
            (embeddings, scores), new_vars = model.apply(
                {"params": p, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            head_losses, head_codes = [], []
            for h, head_scores in enumerate(scores):
                kernel = p[f"{PROTOTYPES_PREFIX}{h}"]["kernel"]  # [D, K_h], unit columns
                detached = jax.lax.stop_gradient(head_scores)
                if state.queue is not None:
                    queue_scores = state.queue @ jax.lax.stop_gradient(kernel)
                    codes = jax.lax.cond(
                        use_queue,
                        lambda: losses.assign_codes(detached, queue_scores=queue_scores, **sinkhorn_args),
                        lambda: losses.assign_codes(detached, **sinkhorn_args),
                    )
                else:
                    codes = losses.assign_codes(detached, **sinkhorn_args)
                head_codes.append(codes)
                head_losses.append(
                    losses.swapped_prediction_loss(
                        head_scores, codes, crops_for_assign=crops_for_assign, temperature=float(swav.temperature)
                    )
                )
            loss = sum(head_losses) / len(head_losses)
            return loss, (embeddings, head_codes[0], new_vars["batch_stats"])

        (loss, (embeddings, codes, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads, loss, batch_stats = scaffold.sync_replicas(grads, loss, batch_stats, mesh)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)

        queue = state.queue
        if queue is not None:
            # Shift by the local batch, newest embeddings of the assigning crops in front.
            newest = jax.lax.stop_gradient(embeddings[jnp.array(crops_for_assign)]).astype(queue.dtype)
            shifted = jnp.concatenate([newest, queue[:, :-local_batch]], axis=1)
            queue = jnp.where(state.step >= queue_start, shifted, queue)

        usage = losses.prototype_usage(codes, axis_name=axes)
        metrics = {
            "train/loss": loss,
            "train/lr": jnp.asarray(schedule(state.step), jnp.float32),
            "train/empty_prototypes": usage["empty_prototypes"],
            "train/assignment_entropy": usage["assignment_entropy"],
            "train/grad_norm": optax.tree.norm(grads),
            "train/queue_in_use": jnp.asarray(use_queue, jnp.float32),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, queue=queue
        )
        return new_state, metrics

    return local_step


class SwAV(scaffold.Method):
    name = "swav"

    def validate(self, config: ml_collections.ConfigDict) -> None:
        batch, swav, model = config.batch_size, config.swav, config.model
        assigning_crops(swav.crops_for_assign, "swav.crops_for_assign", config.crops.num_crops)
        real(swav.epsilon, "swav.epsilon", low=0.0, strict=True)
        real(swav.temperature, "swav.temperature", low=0.0, strict=True)
        positive_int(swav.sinkhorn_iterations, "swav.sinkhorn_iterations")
        non_negative_int(swav.freeze_prototypes_niters, "swav.freeze_prototypes_niters")
        non_negative_int(swav.queue_length, "swav.queue_length")
        if swav.queue_length > 0:
            require(effective_queue_length(config) > 0, "swav.queue_length",
                    f"{swav.queue_length} is shorter than the global batch {batch}; the release rounds it "
                    "down to a multiple of the global batch, which leaves no queue")
            non_negative_int(swav.epoch_queue_starts, "swav.epoch_queue_starts")
            if effective_queue_length(config) != swav.queue_length:
                logging.warning("config.swav.queue_length %d rounded down to %d (a multiple of the global batch)",
                                swav.queue_length, effective_queue_length(config))
        validate_network(model)
        largest = max(model.num_prototypes)
        sinkhorn_samples = batch + effective_queue_length(config)
        if largest > sinkhorn_samples:
            logging.warning(
                "Each Sinkhorn problem has %d samples for %d prototypes (K > N): equipartition is loose "
                "and learning can stall. Consider a queue (config.swav.queue_length) or fewer "
                "prototypes.", sinkhorn_samples, largest)

    def build(self, config, mesh, *, steps_per_epoch, total_steps, num_examples):
        del total_steps, num_examples
        schedule = optim.lr_schedule(
            config.optim, steps_per_epoch=steps_per_epoch, epochs=int(config.epochs), batch_size=int(config.batch_size)
        )
        optimizer = make_optimizer(config, schedule)
        model = build_model(config.model, bn_axis_name="bn")
        init, abstract = scaffold.placed_and_abstract(
            lambda: init_state(config, model.clone(bn_axis_name=None), optimizer),
            lambda state: state_specs(state, mesh),
            mesh,
        )
        local_step = make_local_step(
            config, model, optimizer, schedule, mesh,
            queue_start=int(config.swav.epoch_queue_starts) * steps_per_epoch,
        )
        step = scaffold.sharded_train_step(local_step, mesh, state_specs(abstract, mesh), self.batch_fields)
        return scaffold.TrainProgram(init_state=init, abstract_state=abstract, train_step=step)

    def num_clusters(self, config):
        return int(config.model.num_prototypes[0])

    def collapse_hint(self, config):
        return (
            "the assignments look collapsed. Usual remedies: a smaller swav.epsilon "
            "(0.02-0.03 on small data sets), start the queue later or make it shorter "
            "(swav.epoch_queue_starts, swav.queue_length), freeze the prototypes longer "
            "(swav.freeze_prototypes_niters), fewer prototypes (model.num_prototypes), a lower learning rate."
        )

    def usage_watch(self, config):
        codes = len(config.swav.crops_for_assign) * int(config.batch_size)
        if int(config.swav.queue_length) > 0:
            hint = (
                "the batch's assignments collapsed onto a few prototypes while the queue holds the rest: "
                "its embeddings are too stale for this learning rate. Usual remedies: no queue "
                "(swav.queue_length=0) or a shorter one, start it later (swav.epoch_queue_starts), a "
                "lower learning rate (optim.base_lr)."
            )
        else:
            hint = (
                "the batch's assignments collapsed onto a few prototypes. Usual remedies: a smaller "
                "swav.epsilon, more swav.sinkhorn_iterations, a lower learning rate."
            )
        return min(self.num_clusters(config), codes), hint
