"""DeepCluster-v2 (Caron et al., 2020, appendix; the release's main_deepclusterv2.py):
hard pseudo-labels from a k-means of the whole training set, recomputed every epoch.

The run, in the release's order:
  fresh start  one forward-only pass over the first S = steps_per_epoch global batches
               of the training stream, the batches epoch 0 then trains on, fills the
               memory bank (the release's `init_memory`: BatchNorm in train mode, each
               assigning crop forwarded on its own, running statistics updated);
  every epoch  before its first step, spherical k-means of the bank for each of the H
               heads (`swav_jax.deepcluster.cluster_bank`: the bank stays on its
               devices, only K x D sums and K counts cross them); the centroids become
               the head's prototypes and every sample gets its label per head;
  every step   augment, forward all crops, cross-entropy of the scores / T against the
               labels of the batch's samples (`deepcluster_loss`), gradients averaged
               over devices, LARS update, the assigning crops' embeddings written into
               the bank at this step's slot.

Epochs are passes: `data.drop_remainder` (required) makes epoch e's steps exactly one
pass over the data with its last N mod G samples dropped, as the release's drop_last, so
that the bank holds every sample at most once.

The network is SwAV's (`SwAVModel`, H heads of prototypes). The prototypes are never
updated by the optimiser: `optim.freeze_for` holds them for the whole run (the release
freezes them for 300,000 iterations, more than any of its runs: no update, no momentum,
no weight decay); only the per-epoch copy of the centroids changes them.

State: params, BatchNorm statistics, optimiser state and rng are replicated; the bank
[A, S * G, D] (A assigning crops, G the global batch) and its dataset indices [S * G] are
sharded over the data axes, each device holding the S * b rows of its own local batches;
the labels [H, N] (N training samples) are replicated. All of it is checkpointed: a
resume mid-epoch cannot recompute the labels. docs/ALGORITHM.md (section 9) states the
algorithm.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from swav_jax import deepcluster, optim
from swav_jax.checks import assigning_crops, non_negative_int, real, require
from swav_jax.data import pipeline
from swav_jax.data.augment import augment_views
from swav_jax.errors import NonFiniteLossError
from swav_jax.mesh import data_axes
from swav_jax.methods import scaffold
from swav_jax.methods.swav import validate_network
from swav_jax.models import PROTOTYPES_PREFIX, SwAVModel, build_model, normalize_prototypes
from swav_jax.train.metrics import Progress

log = logging.getLogger("swav_jax")

# The k-means keys: fold_in(fold_in(key(seed), _KMEANS_STREAM), epoch), a stream apart
# from the state's rng, whose fold_in(rng, step) keys augment the crops.
_KMEANS_STREAM = 2


@flax.struct.dataclass
class DeepClusterV2State:
    """Everything the next DeepCluster-v2 step needs; what orbax saves.

    Attributes:
      step: [] int32, iterations done.
      params: model parameters, float32, replicated; params['prototypes_h']['kernel']
        [D, K_h] holds head h's centroids as columns (unit).
      batch_stats: BatchNorm running statistics, float32, replicated.
      opt_state: optimiser state (the prototypes' entries stay zero), replicated.
      rng: [2] uint32 raw PRNG key data for augmentation, replicated.
      bank: [A, S * G, D] float32 unit embeddings of the assigning crops, sharded over
        the data axes on dimension 1 (each device [A, S * b, D], its own local batches;
        rows of step s at slot s mod S, `deepcluster.update_bank`).
      bank_index: [S * G] int32 dataset index of each bank row (`deepcluster.EMPTY`
        until written), sharded like the bank's rows.
      assignments: [H, N] int32 label of every training sample per head from the last
        clustering (`deepcluster.UNASSIGNED` where the bank did not hold the sample),
        replicated.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    bank: jax.Array
    bank_index: jax.Array
    assignments: jax.Array


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule, total_steps: int):
    """LARS as `config.optim` says, the prototypes frozen for all `total_steps` steps."""
    return optim.make_optimizer(config.optim, schedule, freeze_mask=optim.prototype_mask, freeze_steps=total_steps)


def init_state(
    config: ml_collections.ConfigDict, model: SwAVModel, optimizer, *, bank_rows: int, num_examples: int
) -> DeepClusterV2State:
    """The initial state from `config.seed` (unplaced; pure). The bank has `bank_rows`
    rows in total (S * G), all EMPTY; every one of the `num_examples` samples is
    UNASSIGNED until the first clustering."""
    init_rng, data_rng = jax.random.split(jax.random.key(config.seed))
    variables = scaffold.init_variables(model, config, init_rng)
    # Unit prototypes from the start, like the centroids that replace them.
    params = normalize_prototypes(variables["params"])
    crops = tuple(config.deepclusterv2.crops_for_assign)
    bank, bank_index = deepcluster.init_bank(len(crops), bank_rows, int(config.model.proj_dim))
    heads = len(config.model.num_prototypes)
    return DeepClusterV2State(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(data_rng),  # raw uint32 words: checkpointable
        bank=bank,
        bank_index=bank_index,
        assignments=jnp.full((heads, num_examples), deepcluster.UNASSIGNED, jnp.int32),
    )


def state_specs(state: DeepClusterV2State, mesh: Mesh) -> DeepClusterV2State:
    """Everything replicated but the bank (dimension 1) and its indices, split over the data axes."""
    axes = data_axes(mesh)
    return scaffold.replicated_specs(state).replace(bank=P(None, axes), bank_index=P(axes))


def make_local_step(config: ml_collections.ConfigDict, model: SwAVModel, optimizer, schedule, mesh: Mesh):
    """The per-device step body (`scaffold.sharded_train_step` runs it under shard_map)."""
    dc = config.deepclusterv2
    crops_for_assign = tuple(dc.crops_for_assign)
    temperature = float(dc.temperature)
    compute_dtype = jnp.dtype(config.model.dtype)
    axes = data_axes(mesh)

    def local_step(state: DeepClusterV2State, batch: dict):
        index = batch["index"]  # [b] dataset indices of this device's samples
        images = augment_views(state.rng, state.step, batch["crops"], config.augment, dtype=compute_dtype,
                               data_axis=axes)
        labels = state.assignments[:, index]  # [H, b]

        def loss_fn(p):
            (embeddings, scores), new_vars = model.apply(
                {"params": p, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            loss = deepcluster.deepcluster_loss(scores, labels, temperature=temperature)
            return loss, (embeddings, scores[0], new_vars["batch_stats"])

        (loss, (embeddings, scores, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads, loss, batch_stats = scaffold.sync_replicas(grads, loss, batch_stats, mesh)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        bank, bank_index = deepcluster.update_bank(
            state.bank, state.bank_index, embeddings, index, state.step, crops_for_assign=crops_for_assign
        )

        # First head: how many of the batch's samples have a label, and how many of
        # their crops the network already puts in the labelled cluster.
        labelled = labels[0] != deepcluster.UNASSIGNED  # [b]
        correct = jnp.sum((jnp.argmax(scores, axis=-1) == labels[0]) & labelled)
        num_labelled, correct = jax.lax.psum((jnp.sum(labelled), correct), axes)
        num_samples = labelled.shape[0] * jax.lax.psum(1, axes)
        metrics = {
            "train/loss": loss,
            "train/lr": jnp.asarray(schedule(state.step), jnp.float32),
            "train/grad_norm": optax.tree.norm(grads),
            "train/labelled_fraction": (num_labelled / num_samples).astype(jnp.float32),
            "train/label_accuracy": (correct / jnp.maximum(num_labelled * scores.shape[0], 1)).astype(jnp.float32),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, bank=bank,
            bank_index=bank_index,
        )
        return new_state, metrics

    return local_step


# ---- the bank fill before training -------------------------------------------------------


def make_fill_step(config: ml_collections.ConfigDict, mesh: Mesh):
    """jitted (params, batch_stats, rng, bank, bank_index, crops, index, step) ->
    (bank, bank_index, batch_stats): one global batch of the bank fill.

    `crops` is the first resolution group's uint8 [num_crops_0, G, S, S, 3] (sharded
    like the train step's), `index` [G] int32, `step` the batch's position i in the
    stream: its crops get the augmentation of train step i, its embeddings go to the
    bank's slot i. Each assigning crop is forwarded on its own with BatchNorm in train
    mode, updating the running statistics (the release's `init_memory`). Donates
    bank, bank_index and batch_stats.
    """
    crops_for_assign = tuple(config.deepclusterv2.crops_for_assign)
    compute_dtype = jnp.dtype(config.model.dtype)
    model = build_model(config.model, bn_axis_name="bn")
    axes = data_axes(mesh)

    def local_fill(params, batch_stats, rng, bank, bank_index, crops, index, step):
        [images] = augment_views(rng, step, (crops,), config.augment, dtype=compute_dtype, data_axis=axes)
        embeddings = []
        for c in crops_for_assign:
            (z, _), new_vars = model.apply(
                {"params": params, "batch_stats": batch_stats}, [images[c : c + 1]], train=True,
                mutable=["batch_stats"],
            )
            batch_stats = new_vars["batch_stats"]
            embeddings.append(z[0])
        bank, bank_index = deepcluster.update_bank(
            bank, bank_index, jnp.stack(embeddings), index, step, crops_for_assign=range(len(crops_for_assign))
        )
        return bank, bank_index, scaffold.sync_batch_stats(batch_stats, mesh)

    fill = jax.shard_map(
        local_fill,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(None, axes), P(axes), P(None, axes), P(axes), P()),
        out_specs=(P(None, axes), P(axes), P()),
        check_vma=False,
    )
    return jax.jit(fill, donate_argnums=(1, 3, 4))


def fill_bank(
    config: ml_collections.ConfigDict, state: DeepClusterV2State, fill: Callable, batches: Iterator[dict],
    num_batches: int,
) -> DeepClusterV2State:
    """`state` with the bank filled from the next `num_batches` global batches of
    `batches` by `fill` (`make_fill_step`; batch i goes to slot i) and BatchNorm's
    running statistics updated. Prints progress on process 0."""
    is_writer = jax.process_index() == 0
    global_batch = int(config.batch_size)
    progress = Progress(num_batches, global_batch, 0)
    if is_writer:
        print(f"deepclusterv2: filling the memory bank, one forward pass over {num_batches} batches "
              f"({num_batches * global_batch} samples)", flush=True)
    report_every = max(1, int(config.log_every_steps))
    bank, bank_index, batch_stats = state.bank, state.bank_index, state.batch_stats
    for i in range(num_batches):
        batch = next(batches)
        bank, bank_index, batch_stats = fill(
            state.params, batch_stats, state.rng, bank, bank_index, batch["crops"][0], batch["index"], np.int32(i)
        )
        done = i + 1
        if done == 1:
            jax.block_until_ready(bank)  # compilation: not part of the rate
            progress.restart_clock(done)
        elif done % report_every == 0 or done == num_batches:
            jax.block_until_ready(bank)
            if is_writer:
                progress.report(done, *progress.rate(done), {})
    return state.replace(bank=bank, bank_index=bank_index, batch_stats=batch_stats)


# ---- the clustering at the start of every epoch ------------------------------------------


@functools.lru_cache(maxsize=8)
def clustering_program(mesh: Mesh, num_clusters: tuple[int, ...], num_samples: int, num_iters: int):
    """jitted (bank, bank_index, key) -> (kernels, assignments, stats) on `mesh`.

    `deepcluster.cluster_bank` under shard_map over the data axes (bank and indices as
    the state holds them). kernels: tuple over heads of [D, K_h] float32 centroid
    columns (the prototypes' layout); assignments: [H, N] int32; stats: finite ([]
    bool, every centroid finite), empty ([H] int32 clusters no sample is labelled
    with), unassigned ([] float32 fraction of samples without a label), rows ([] int32
    bank rows written). All replicated. Cached per mesh and sizes: one compilation
    per run, whatever the number of epochs.
    """
    axes = data_axes(mesh)
    cluster = functools.partial(
        deepcluster.cluster_bank, num_clusters=num_clusters, num_samples=num_samples, num_iters=num_iters,
        axis_name=axes,
    )
    sharded = jax.shard_map(
        cluster, mesh=mesh, in_specs=(P(None, axes), P(axes), P()),
        out_specs=(tuple(P() for _ in num_clusters), P()), check_vma=False,
    )

    @jax.jit
    def run(bank, bank_index, key):
        centroids, assignments = sharded(bank, bank_index, key)
        labelled = assignments >= 0
        sizes = [
            jnp.zeros((k,), jnp.int32).at[jnp.where(labelled[h], assignments[h], k)].add(1, mode="drop")
            for h, k in enumerate(num_clusters)
        ]
        stats = {
            "finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(c)) for c in centroids])),
            "empty": jnp.stack([jnp.sum(s == 0) for s in sizes]).astype(jnp.int32),
            "unassigned": jnp.mean(~labelled[0], dtype=jnp.float32),
            "rows": jnp.sum(bank_index >= 0, dtype=jnp.int32),
        }
        return tuple(c.T for c in centroids), assignments, stats

    return run


def kmeans_key(seed: int, epoch: int) -> jax.Array:
    """The key of epoch `epoch`'s k-means (the same on every process and resume)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _KMEANS_STREAM), epoch)


def cluster(config: ml_collections.ConfigDict, state: DeepClusterV2State, epoch: int) -> DeepClusterV2State:
    """`state` with the prototypes set to the k-means centroids of its bank and the
    labels of every sample (the start of epoch `epoch`). Raises NonFiniteLossError if a
    centroid is not finite; logs empty clusters and the samples left without a label."""
    num_clusters = tuple(int(k) for k in config.model.num_prototypes)
    program = clustering_program(
        state.bank.sharding.mesh, num_clusters, int(state.assignments.shape[1]),
        int(config.deepclusterv2.kmeans_iters),
    )
    kernels, assignments, stats = program(state.bank, state.bank_index, kmeans_key(int(config.seed), epoch))
    stats = jax.device_get(stats)
    if not stats["finite"]:
        raise NonFiniteLossError(
            f"DeepCluster-v2 k-means at the start of epoch {epoch} gave non-finite centroids: the memory bank "
            "holds non-finite embeddings (the network diverged: a learning rate too high?) or the first device "
            "holds fewer written bank rows than prototypes. The last good checkpoint is kept."
        )
    empty = ", ".join(f"{e}/{k}" for e, k in zip(stats["empty"], num_clusters))
    message = (
        f"deepclusterv2 epoch {epoch}: k-means of {stats['rows']} bank rows; empty clusters per head {empty}; "
        f"{100 * stats['unassigned']:.1f}% of the {state.assignments.shape[1]} samples without a label"
    )
    log.info(message)
    params = dict(state.params)
    for h, kernel in enumerate(kernels):
        params[f"{PROTOTYPES_PREFIX}{h}"] = {**params[f"{PROTOTYPES_PREFIX}{h}"], "kernel": kernel}
    return state.replace(params=params, assignments=assignments)


class DeepClusterV2(scaffold.Method):
    name = "deepclusterv2"
    batch_fields = ("crops", "index")

    def validate(self, config: ml_collections.ConfigDict) -> None:
        dc = config.deepclusterv2
        assigning_crops(dc.crops_for_assign, "deepclusterv2.crops_for_assign", config.crops.num_crops)
        real(dc.temperature, "deepclusterv2.temperature", low=0.0, strict=True)
        non_negative_int(dc.kmeans_iters, "deepclusterv2.kmeans_iters")
        require(config.data.drop_remainder is True, "data.drop_remainder",
                "must be True for deepclusterv2: an epoch's steps must see each sample once, or the memory bank "
                "holds some samples twice and leaves others without a label")
        validate_network(config.model)

    def build(self, config, mesh, *, steps_per_epoch, total_steps, num_examples):
        # Known only with the data: each device's bank must hold a row per centroid,
        # since a head's initial centroids are rows of the first device's bank.
        local_batch = int(config.batch_size) // mesh.size
        rows = steps_per_epoch * local_batch
        largest = max(config.model.num_prototypes)
        require(rows >= largest, "model.num_prototypes",
                f"each device's memory bank holds steps_per_epoch x local batch = {steps_per_epoch} x "
                f"{local_batch} = {rows} rows, fewer than the {largest} prototypes of the largest head "
                "(k-means starts at rows of one device's bank); use fewer prototypes, fewer devices or more data")
        schedule = optim.lr_schedule(
            config.optim, steps_per_epoch=steps_per_epoch, epochs=int(config.epochs), batch_size=int(config.batch_size)
        )
        optimizer = make_optimizer(config, schedule, total_steps)
        model = build_model(config.model, bn_axis_name="bn")
        init, abstract = scaffold.placed_and_abstract(
            lambda: init_state(
                config, model.clone(bn_axis_name=None), optimizer,
                bank_rows=steps_per_epoch * int(config.batch_size), num_examples=num_examples,
            ),
            lambda state: state_specs(state, mesh),
            mesh,
        )
        local_step = make_local_step(config, model, optimizer, schedule, mesh)
        step = scaffold.sharded_train_step(local_step, mesh, state_specs(abstract, mesh), self.batch_fields)
        return scaffold.TrainProgram(init_state=init, abstract_state=abstract, train_step=step)

    def on_fresh_start(self, config, state, mesh):
        # A separate iterator over the same stream: the loop's starts at batch 0 after it.
        data = pipeline.make_train_iterator(config, mesh=mesh, data_axis=data_axes(mesh))
        try:
            return fill_bank(config, state, make_fill_step(config, mesh), data, data.steps_per_epoch)
        finally:
            data.close()

    def on_epoch_start(self, config, state, epoch):
        return cluster(config, state, epoch)

    def num_clusters(self, config):
        return int(config.model.num_prototypes[0])

    def collapse_hint(self, config):
        return (
            "the network predicts the pseudo-labels no better than chance. Look at the empty clusters the "
            "k-means reports each epoch; usual remedies: a lower learning rate, fewer prototypes "
            "(model.num_prototypes), a lower deepclusterv2.temperature."
        )
