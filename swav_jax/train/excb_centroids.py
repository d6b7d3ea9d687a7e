"""ExCB's centroid initialisation: spherical k-means on the teacher's projections.

The release (ManiadisG/ExCB, `Trainer.init_centroids`) starts training from centroids
clustered on the data, not from random directions: before the first step it projects
`clustering_samples` training images with the teacher, runs 50 iterations of spherical
k-means on the L2-normalised projections (initialised at K random samples) and copies the
centroids into student and teacher, so that every centroid starts where projections
are. (On the digits this alone did not make ExCB learn; the loss pairing and the
teacher temperature did: docs/EXCB_DEMO.md.)

Differences from the release, kept deliberately: the images are the training split's
first `excb.init_samples` images after the evaluation transform (resize + centre crop at
the global crop size; the release takes the augmented global views of its first shuffled
batches), with BatchNorm on the statistics of each evaluation batch as in the release's
train-mode teacher; an empty cluster keeps its previous centroid (a training sample),
where the release re-runs the whole k-means.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from swav_jax.data import sources
from swav_jax.data.augment import normalize
from swav_jax.data.eval_batches import eval_batches
from swav_jax.models.excb import CENTROIDS, ExCBModel
from swav_jax.models.swav import l2_normalize
from swav_jax.train.errors import ConfigError

log = logging.getLogger("swav_jax")

KMEANS_ITERS = 50  # the release's nmb_kmeans_iters
_SCORE_ELEMENTS = 2**26  # per chunk of the [N, K] similarity matrix (256 MiB in float32)


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters"))
def spherical_kmeans(
    x: jax.Array, key: jax.Array, *, num_clusters: int, num_iters: int = KMEANS_ITERS
) -> tuple[jax.Array, jax.Array]:
    """Spherical k-means (cosine similarity, unit centroids) as the ExCB release runs it.

    Initialised at `num_clusters` distinct random rows of `x`; each iteration assigns every
    row to its most similar centroid and moves each non-empty cluster's centroid to the
    normalised mean of its rows (an empty cluster keeps its centroid).

    Args:
      x: [N, D] float, N >= num_clusters; rows are L2-normalised here.
      key: PRNG key for the initial rows.
      num_clusters: K.
      num_iters: assignment + update iterations.

    Returns:
      centroids: [K, D] float32 unit rows.
      sizes: [K] int32 rows assigned to each centroid by a final assignment.
    """
    n = x.shape[0]
    if n < num_clusters:
        raise ValueError(f"spherical_kmeans needs at least num_clusters={num_clusters} rows, got {n}")
    x = l2_normalize(x.astype(jnp.float32))
    chunk = max(1, min(n, _SCORE_ELEMENTS // num_clusters))
    padded = jnp.pad(x, ((0, -n % chunk), (0, 0))).reshape(-1, chunk, x.shape[1])

    def assign(centroids):  # [N] int32, chunked so [N, K] never exists at once
        scores = lambda rows: jnp.argmax(  # noqa: E731
            jnp.dot(rows, centroids.T, precision=jax.lax.Precision.HIGHEST), axis=-1
        )
        return jax.lax.map(scores, padded).reshape(-1)[:n]

    def update(_, centroids):
        labels = assign(centroids)
        sums = jax.ops.segment_sum(x, labels, num_segments=num_clusters)
        counts = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), labels, num_segments=num_clusters)
        return jnp.where((counts > 0)[:, None], l2_normalize(sums), centroids)

    first = x[jax.random.permutation(key, n)[:num_clusters]]
    centroids = jax.lax.fori_loop(0, num_iters, update, first)
    sizes = jnp.bincount(assign(centroids), length=num_clusters).astype(jnp.int32)
    return centroids, sizes


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
    centroids, sizes = spherical_kmeans(x, key, num_clusters=num_clusters)
    sizes = np.asarray(sizes)
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
