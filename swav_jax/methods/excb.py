"""ExCB (Maniadis Metaxas et al., ECCV 2024): clusters balanced across batches by a
tracked cluster-size estimate, an EMA teacher, a student with a predictor.

The step, per device, in the release's order:
  1. augment the uint8 crops (`augment_views`: the same keys and batch as SwAV);
  2. teacher forward on the global crops (first resolution group), BN in train mode;
  3. student forward on all crops: h-path similarities of the global crops,
     predictor-path similarities of all crops;
  4. `excb_loss` with the tracker's sizes from before this step; gradients averaged
     over devices; SGD update;
  5. teacher <- m * teacher + (1 - m) * student (the updated student), m on a cosine
     schedule from `excb.teacher_momentum` to 1;
  6. tracker update with the hard assignments of this step's teacher scores (counts
     `psum`-reduced over devices).
Everything in the state is replicated; crops are sharded over the data axes.

Optimiser (the release's engine/optimizer.py): momentum SGD with PyTorch semantics and
three weight-decay groups; the LR schedule is SwAV's (`swav_jax.optim.lr_schedule`).

Centroids start, as the release's `Trainer.init_centroids`, as spherical k-means of the
teacher's projections of `excb.init_samples` training images (`swav_jax.kmeans`, 50
iterations, initialised at K random samples), copied into student and teacher, so that every centroid starts
where projections are. (On the digits this alone did not make ExCB learn; the loss
pairing and the teacher temperature did: docs/EXCB_DEMO.md.) Differences from the
release, kept deliberately: the images are the training split's first
`excb.init_samples` images after the evaluation transform (resize + centre crop at the
global crop size; the release takes the augmented global views of its first shuffled
batches), with BatchNorm on the statistics of each evaluation batch as in the release's
train-mode teacher; an empty cluster keeps its previous centroid (a training sample),
where the release re-runs the whole k-means.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from swav_jax import balancing, kmeans, optim
from swav_jax.checks import non_negative_int, positive_int, real, require
from swav_jax.data import sources
from swav_jax.data.augment import augment_views, normalize
from swav_jax.data.eval_batches import eval_batches
from swav_jax.errors import ConfigError
from swav_jax.mesh import data_axes
from swav_jax.methods import scaffold
from swav_jax.models.excb import CENTROIDS, ExCBModel, build_excb_model

log = logging.getLogger("swav_jax")

KMEANS_ITERS = 50  # the release's nmb_kmeans_iters


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


def _cosine_from_to(start: float, end: float, step: jax.Array, total_steps: int) -> jax.Array:
    """end + (start - end) * (1 + cos(pi * s / T)) / 2 with s = min(step, T): start at
    step 0, end at step T and after. float32."""
    t = jnp.minimum(jnp.asarray(step), total_steps).astype(jnp.float32) / total_steps
    w = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return (w * start + (1.0 - w) * end).astype(jnp.float32)


def teacher_momentum(base: float, total_steps: int) -> optax.Schedule:
    """The teacher's EMA momentum at step s: 1 - (1 - base) * (1 + cos(pi * s / T)) / 2.

    `base` at the first step, 1 at step T (the release's `scheduling(1, base, s, T,
    decreasing=False)`, with s the 0-based step whose update the EMA follows).
    """
    return lambda step: _cosine_from_to(float(base), 1.0, step, total_steps)


def centroid_weight_decay(start: float, end: float, total_steps: int) -> optax.Schedule:
    """The centroids' weight decay at update s, cosine from `start` (s = 0) to `end` (s = T).

    With start = 10 * wd and end = wd this is the release's `centroid_adjustments:
    wdx10c1` (wd * (9 * (1 + cos(pi * s / T)) / 2 + 1)); the release counts s from 1.
    """
    return lambda step: _cosine_from_to(float(start), float(end), step, total_steps)


def centroid_mask(params: Any) -> Any:
    """True for the centroids' leaf (params['centroids']), False elsewhere."""
    return {name: jax.tree.map(lambda _: name == CENTROIDS, sub) for name, sub in params.items()}


def _regular_decay_mask(params: Any) -> Any:
    # Weight matrices and conv kernels; biases and BN scales/offsets (ndim <= 1) are
    # not decayed, as in the release's `get_parameters` (its "noreg" groups).
    return {
        name: jax.tree.map(lambda p: name != CENTROIDS and jnp.ndim(p) > 1, sub)
        for name, sub in params.items()
    }


def make_excb_optimizer(
    optim_config: Any,
    lr: optax.ScalarOrSchedule,
    centroid_decay: optax.ScalarOrSchedule,
) -> optax.GradientTransformation:
    """Momentum SGD with PyTorch semantics and the release's weight-decay groups.

    Per leaf w with gradient g and decay rate wd (`optim.weight_decay` for weight matrices
    and conv kernels; `centroid_decay` at this update for the centroids; 0 for biases and
    BN parameters):
      d = g + wd * w;  buf = momentum * buf + d  (first buf = d);  w <- w - lr * buf

    Args:
      optim_config: `config.optim` (momentum, weight_decay are read).
      lr: LR per update (`optim.lr_schedule`) or a constant.
      centroid_decay: the centroids' decay per update (`centroid_weight_decay`) or a constant.

    Returns:
      An optax transformation; `update` needs `params`.
    """
    return optax.chain(
        optax.add_decayed_weights(float(optim_config.weight_decay), mask=_regular_decay_mask),
        optax.add_decayed_weights(centroid_decay, mask=centroid_mask),
        optax.trace(decay=float(optim_config.momentum), nesterov=False),
        optax.scale_by_learning_rate(lr),
    )


# ExCB's centroid initialisation: the release's 50 iterations of spherical k-means.
_kmeans = jax.jit(
    functools.partial(kmeans.spherical_kmeans, num_iters=KMEANS_ITERS), static_argnames=("num_clusters",)
)


def _local_variables(tree):
    """This process's copy of replicated arrays, on its first local device."""
    return jax.tree.map(lambda a: a.addressable_data(0), tree)


def teacher_projections(config: ml_collections.ConfigDict, model: ExCBModel, variables: dict, num_samples: int):
    """[N, proj_dim] float32 unit projections of the first `num_samples` training images,
    the same array on every process (N = num_samples, or fewer if the split is smaller)."""
    source = sources.make_source(config.data, config.data.split)
    num_processes = jax.process_count()
    per_process = -(-min(num_samples, len(source)) // num_processes)
    batch_size = max(1, int(config.eval.batch_size) // num_processes)
    mean = jnp.asarray(config.augment.mean, jnp.float32)
    std = jnp.asarray(config.augment.std, jnp.float32)

    @jax.jit
    def project(variables, images):
        x = normalize(images, mean, std, model.dtype)
        p, _ = model.apply(variables, x, True, mutable=["batch_stats"], method=ExCBModel.projections)
        return p

    chunks, count = [], 0
    for batch in eval_batches(source, size=int(config.crops.size_crops[0]), batch_size=batch_size):
        if count >= per_process:
            break  # no collectives in this loop: processes may stop at different batches
        mask = batch["mask"]
        if not mask.any():
            continue
        images = batch["image"]
        # Padding rows repeat a real image: BatchNorm statistics see only real images.
        images = np.where(mask[:, None, None, None], images, images[np.argmax(mask)])
        chunks.append(np.asarray(project(variables, images))[mask])
        count += int(mask.sum())
    local = np.concatenate(chunks)[:per_process] if chunks else np.zeros((0, model.proj_dim), np.float32)
    if num_processes == 1:
        return local
    # Equal shares for the gather: the smallest process's count.
    n = int(np.min(multihost_utils.process_allgather(np.int32(len(local)))))
    return np.asarray(multihost_utils.process_allgather(local[:n], tiled=True))


def init_centroids(config: ml_collections.ConfigDict, model: ExCBModel, state):
    """`state` with student and teacher centroids from spherical k-means on `config.excb.init_samples`
    teacher projections (see the module docstring). `model` without a BN axis."""
    num_clusters = int(config.excb.num_clusters)
    teacher = _local_variables({"params": state.teacher_params, "batch_stats": state.teacher_batch_stats})
    x = teacher_projections(config, model, teacher, int(config.excb.init_samples))
    if len(x) < num_clusters:
        raise ConfigError(
            f"excb.init_samples: k-means initialisation of {num_clusters} centroids needs at least "
            f"{num_clusters} training images, got {len(x)}; lower excb.num_clusters or set "
            "excb.init_samples = 0 (random unit centroids)"
        )
    key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
    centroids, labels = _kmeans(x, key, num_clusters=num_clusters)
    sizes = np.bincount(np.asarray(labels), minlength=num_clusters)
    fractions = sizes[sizes > 0] / sizes.sum()
    log.info(
        "ExCB centroids: spherical k-means on %d teacher projections, %d iterations; cluster sizes "
        "%d..%d, %d empty, perplexity %.1f of %d",
        len(x), KMEANS_ITERS, sizes.min(), sizes.max(), int(np.sum(sizes == 0)),
        math.exp(-np.sum(fractions * np.log(fractions))), num_clusters,
    )
    columns = np.asarray(centroids).T  # [proj_dim, K]
    sharding = state.params[CENTROIDS].sharding
    # Two buffers: the train step donates student and teacher parameters separately.
    return state.replace(
        params={**state.params, CENTROIDS: jax.device_put(columns, sharding)},
        teacher_params={**state.teacher_params, CENTROIDS: jax.device_put(columns, sharding)},
    )


def init_state(config: ml_collections.ConfigDict, model: ExCBModel, optimizer: optax.GradientTransformation):
    """The initial state from `config.seed` (unplaced, pure). The teacher starts as a copy
    of the student (parameters and BN statistics), the tracker at uniform sizes 1/K."""
    init_rng, data_rng = jax.random.split(jax.random.key(config.seed))
    variables = scaffold.init_variables(model, config, init_rng)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return ExCBTrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        teacher_params=jax.tree.map(jnp.copy, params),
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        cluster_sizes=balancing.init_cluster_sizes(int(config.excb.num_clusters)),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(data_rng),  # raw uint32 words: checkpointable
    )


def make_local_step(config: ml_collections.ConfigDict, model: ExCBModel, optimizer, schedule, mesh: Mesh, *,
                    total_steps: int):
    """The per-device step body (`scaffold.sharded_train_step` runs it under shard_map)."""
    excb = config.excb
    compute_dtype = jnp.dtype(config.model.dtype)
    axes = data_axes(mesh)
    momentum = teacher_momentum(float(excb.teacher_momentum), total_steps)
    temperatures = dict(
        teacher_temperature=float(excb.teacher_temperature),
        student_temperature=float(excb.student_temperature),
    )

    def local_step(state: ExCBTrainState, batch: dict):
        images = augment_views(state.rng, state.step, batch["crops"], config.augment, dtype=compute_dtype,
                               data_axis=axes)
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
            loss = balancing.excb_loss(teacher, student, predictor, state.cluster_sizes, **temperatures)
            return loss, new_vars["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads, loss, (batch_stats, teacher_batch_stats) = scaffold.sync_replicas(
            grads, loss, (batch_stats, teacher_vars["batch_stats"]), mesh
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        m = momentum(state.step)
        teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher_params, params)

        stats = balancing.excb_metrics(
            teacher, state.cluster_sizes, teacher_temperature=temperatures["teacher_temperature"], axis_name=axes
        )
        sizes = balancing.update_cluster_sizes(
            state.cluster_sizes, teacher, momentum=float(excb.tracker_momentum), axis_name=axes
        )
        metrics = {
            "train/loss": loss,
            "train/lr": jnp.asarray(schedule(state.step), jnp.float32),
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

    return local_step


class ExCB(scaffold.Method):
    name = "excb"
    # The release evaluates the EMA teacher.
    eval_fields = ("teacher_params", "teacher_batch_stats")

    def validate(self, config: ml_collections.ConfigDict) -> None:
        require(config.crops.num_crops[0] >= 2, "crops.num_crops",
                f"ExCB's teacher needs at least 2 global crops (the first group), got {config.crops.num_crops[0]}")
        excb = config.excb
        for key in ("num_clusters", "hidden_dim", "proj_dim"):
            positive_int(excb[key], f"excb.{key}")
        non_negative_int(excb.hidden_layers, "excb.hidden_layers")
        for key in ("teacher_temperature", "student_temperature"):
            real(excb[key], f"excb.{key}", low=0.0, strict=True)
        for key in ("teacher_momentum", "tracker_momentum"):
            real(excb[key], f"excb.{key}", low=0.0, high=1.0)
        for key in ("centroid_weight_decay", "centroid_weight_decay_end"):
            real(excb[key], f"excb.{key}", low=0.0)
        samples = excb.init_samples
        require(isinstance(samples, int) and (samples == 0 or samples >= excb.num_clusters), "excb.init_samples",
                f"must be 0 (random unit centroids) or at least excb.num_clusters = {excb.num_clusters} "
                f"(k-means needs a sample per centroid), got {samples!r}")

    def build(self, config, mesh, *, steps_per_epoch, total_steps, num_examples):
        del num_examples
        schedule = optim.lr_schedule(
            config.optim, steps_per_epoch=steps_per_epoch, epochs=int(config.epochs), batch_size=int(config.batch_size)
        )
        decay = centroid_weight_decay(
            float(config.excb.centroid_weight_decay), float(config.excb.centroid_weight_decay_end), total_steps
        )
        optimizer = make_excb_optimizer(config.optim, schedule, decay)
        model = build_excb_model(config, bn_axis_name="bn")
        init, abstract = scaffold.placed_and_abstract(
            lambda: init_state(config, model.clone(bn_axis_name=None), optimizer), scaffold.replicated_specs, mesh
        )
        local_step = make_local_step(config, model, optimizer, schedule, mesh, total_steps=total_steps)
        step = scaffold.sharded_train_step(local_step, mesh, scaffold.replicated_specs(abstract), self.batch_fields)
        return scaffold.TrainProgram(init_state=init, abstract_state=abstract, train_step=step)

    def on_fresh_start(self, config, state, mesh):
        del mesh
        if int(config.excb.init_samples) == 0:
            return state
        return init_centroids(config, build_excb_model(config), state)

    def num_clusters(self, config):
        return int(config.excb.num_clusters)

    def collapse_hint(self, config):
        return (
            "the student's predictions look uniform over the clusters. Try a lower learning "
            "rate or fewer clusters (excb.num_clusters)."
        )
