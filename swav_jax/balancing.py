"""ExCB: explicit online cluster balancing (Maniadis Metaxas et al., ECCV 2024; docs/ALGORITHM.md §8).

Pure jax.numpy; imports nothing else from the package, so it can be taken alone.

Instead of SwAV's per-batch Sinkhorn, ExCB keeps a running estimate s in R^K of the
fraction of samples the teacher assigns (by argmax) to each cluster, and rescales the
teacher's cosine similarities so that undersized clusters look closer and oversized
ones further away. No sum over the batch enters the targets, so small batches work.

One train step, in this order (the release balances with the sizes from before the
step, then updates them; both from the same teacher scores):

  loss  = excb_loss(teacher, student, predictor, sizes)         # pmean it
  stats = excb_metrics(teacher, sizes, axis_name=...)
  sizes = update_cluster_sizes(sizes, teacher, axis_name=...)

with `sizes = init_cluster_sizes(K)` (uniform 1/K) at the start of training. The
sizes are replicated training state: the update's counts are `psum`-reduced, so every
device holds the same vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Floor on the relative size r_k = s_k * K used by the operator. A cluster that no
# sample picks decays geometrically and reaches s_k = 0 in float32 after ~80k steps
# (K = 65,536, m_s = 0.999); there the operator's 1 - (1 - z) r_k is 1 for every sample, so
# all such clusters tie for every sample's argmax. The floor moves z' by at most 2e-6
# (5e-5 in the teacher logits at temperature 0.04) and keeps it increasing in z, so
# ties break by similarity. (The release adds uniform noise in [0, 1e-3) to a zero
# weight instead.)
_MIN_RELATIVE_SIZE = 1e-6


def _check_similarities(name: str, x: jax.Array, ndim: int | None) -> None:
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions [views, B, K], got shape {x.shape}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last (cluster) axis, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def _check_sizes(sizes: jax.Array, num_clusters: int) -> None:
    if sizes.shape != (num_clusters,):
        raise ValueError(
            f"sizes must have shape [K] = ({num_clusters},) to match the similarities, "
            f"got shape {sizes.shape}"
        )
    if not jnp.issubdtype(sizes.dtype, jnp.floating):
        raise ValueError(f"sizes must be floating point, got dtype {sizes.dtype}")


def _check_temperature(name: str, value: float) -> None:
    if not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _relative_sizes(sizes: jax.Array) -> jax.Array:
    """[K] -> [K] float32: K * s_k / sum(s), constant under differentiation."""
    s = jax.lax.stop_gradient(sizes).astype(jnp.float32)
    # The EMA keeps sum(s) = 1 up to rounding; dividing by it removes the drift.
    return s * (s.shape[0] / jnp.sum(s))


def init_cluster_sizes(num_clusters: int) -> jax.Array:
    """The tracker's initial state: uniform sizes 1/K (as the release), [K] float32.

    At uniform sizes the balancing operator is the identity, so the first steps train
    on the raw teacher similarities while the estimate fills in.
    """
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
    return jnp.full((num_clusters,), 1.0 / num_clusters, jnp.float32)


def balance_similarities(similarities: jax.Array, sizes: jax.Array) -> jax.Array:
    """The ExCB balancing operator on cosine similarities (docs/ALGORITHM.md §8).

    With r_k = s_k * K the relative size of cluster k (1 for a cluster of average size):

      r_k < 1 (undersized):  z' = 1 - (1 - z) * r_k     raises z: shrinks 1 - z by r_k
      r_k > 1 (oversized):   z' = (1 + z) / r_k - 1     lowers z: shrinks 1 + z by 1/r_k
      r_k = 1:               z' = z

    Both branches map [-1, 1] into [-1, 1] and are increasing in z (slope min(r_k, 1/r_k)):
    each cluster keeps its ranking of the samples, while the clusters' scores move
    towards 1 (undersized) or -1 (oversized). `sizes` are normalised by their sum first,
    and r_k is floored at 1e-6 (see _MIN_RELATIVE_SIZE).

    Gradients: none flow to `sizes` (they are tracker state). The map is differentiable
    in `similarities`; the loss applies it to the teacher, which is stop-gradient anyway.

    Args:
      similarities: [..., K] any float dtype; cosine similarities in [-1, 1].
      sizes: [K] float; the tracked cluster-size fractions (nonnegative, positive sum).

    Returns:
      [..., K] float32 balanced similarities.
    """
    _check_similarities("similarities", similarities, None)
    _check_sizes(sizes, similarities.shape[-1])
    r = jnp.maximum(_relative_sizes(sizes), _MIN_RELATIVE_SIZE)
    z = similarities.astype(jnp.float32)
    # Composed rather than branched: for r < 1 the second factor is 1, for r > 1 the
    # first is. In float32 each step stays within [-1, 1] (products of factors <= 2 and
    # <= 1 round to <= 2), so no clipping is needed for inputs in [-1, 1].
    z = 1.0 - (1.0 - z) * jnp.minimum(r, 1.0)
    return (1.0 + z) * jnp.minimum(1.0 / r, 1.0) - 1.0


def _teacher_logits(teacher_similarities, sizes, teacher_temperature):
    z = balance_similarities(jax.lax.stop_gradient(teacher_similarities), sizes)
    return z / teacher_temperature


def _hard_counts(teacher_similarities, sizes, axis_name):
    """[G, B, K] -> [K] float32 argmax counts of the balanced teacher scores, all devices."""
    num_clusters = teacher_similarities.shape[-1]
    choice = jnp.argmax(balance_similarities(teacher_similarities, sizes), axis=-1)
    counts = jnp.zeros((num_clusters,), jnp.float32).at[choice.reshape(-1)].add(1.0)
    return counts if axis_name is None else jax.lax.psum(counts, axis_name)


def update_cluster_sizes(
    sizes: jax.Array,
    teacher_similarities: jax.Array,
    *,
    momentum: float = 0.999,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """One EMA step of the cluster-size tracker (docs/ALGORITHM.md §8).

    The teacher's hard assignment of a sample view is the argmax over clusters of its
    *balanced* similarities under the current `sizes`, i.e. the argmax of the teacher
    probabilities the loss uses (the paper's argmax p_t; the release counts the same).
    With counts c_k summed over all global views and all devices and N their total:

      s <- momentum * s + (1 - momentum) * c / N

    Args:
      sizes: [K] float; current fractions (start from `init_cluster_sizes(K)`).
      teacher_similarities: [G, B, K] any float dtype; teacher cosine similarities of
        the G global views of this device's local batch (the ones `excb_loss` takes).
      momentum: EMA momentum m_s in [0, 1] (0.999 in the paper).
      axis_name: data-parallel axis name(s); counts and N are `psum`-reduced over it,
        so the result is identical on every device and equals the unsharded update.

    Returns:
      [K] float32 new sizes; they sum to 1 if `sizes` did. No gradient.
    """
    _check_similarities("teacher_similarities", teacher_similarities, 3)
    _check_sizes(sizes, teacher_similarities.shape[-1])
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    counts = _hard_counts(jax.lax.stop_gradient(teacher_similarities), sizes, axis_name)
    batch_sizes = counts / jnp.sum(counts)
    old = jax.lax.stop_gradient(sizes).astype(jnp.float32)
    return momentum * old + (1.0 - momentum) * batch_sizes


def excb_loss(
    teacher_similarities: jax.Array,
    student_similarities: jax.Array,
    predictor_similarities: jax.Array,
    sizes: jax.Array,
    *,
    teacher_temperature: float = 0.04,
    student_temperature: float = 0.1,
) -> jax.Array:
    """ExCB teacher-student cross-entropy with balanced teacher targets (docs/ALGORITHM.md §8).

    Targets q_a = softmax(balance_similarities(t_a, sizes) / teacher_temperature) for
    each of the G global teacher views a; predictions log_softmax(x / student_temperature)
    of the student's projection path h (x = student_similarities, the same G global crops
    in the same order) and predictor path g (x = predictor_similarities, all V crops).
    With CE(q, x) the batch mean of -sum_k q log p(x):

      loss = mean_a [ 1/2 * mean_{b != a} CE(q_a, h_b)      (the other global views, h path)
                    + 1/2 * mean_{v}      CE(q_a, g_v) ]    (all views, predictor path)

    Each path is an equal-weight mean over its (teacher view, student view) pairs and
    the two paths weigh half each, as docs/ALGORITHM.md §8 says. Which student views the h path
    pairs with is the release's (ManiadisG/ExCB: `Trainer.unroll_batch` matches each
    teacher view with the other teacher views and with every predictor output), not
    the reading "all other student views": with the local crops in the h path as well, the
    demo's projections collapsed onto one direction and the loss stayed near ln(K)
    (docs/EXCB_DEMO.md). The release then averages its 1 + V pairs equally; the half
    weights are kept (the demo's runs cannot tell the two apart). A collapsed model sits
    at ln(K).

    Gradients flow into `student_similarities` and `predictor_similarities` only: the
    targets are stop-gradient. (Which parameters those scores reach, e.g. the centroids
    not through the predictor path, is the model's business.)

    Args:
      teacher_similarities: [G, B, K] any float dtype, G >= 2; EMA-teacher similarities
        of the global views of the local batch B to the K centroids.
      student_similarities: [G, B, K] any float dtype; student h-path similarities of
        the same G global views.
      predictor_similarities: [V, B, K] any float dtype; student predictor-path
        similarities of all V views (global and local).
      sizes: [K] float; the tracker's cluster sizes before this step's update.
      teacher_temperature: teacher softmax temperature (0.04 in the paper), > 0.
      student_temperature: student softmax temperature (0.1 in the paper), > 0.

    Returns:
      float32 scalar: the local-batch mean loss (`pmean` it over the data axis for the
      global loss).
    """
    _check_similarities("teacher_similarities", teacher_similarities, 3)
    _check_similarities("student_similarities", student_similarities, 3)
    _check_similarities("predictor_similarities", predictor_similarities, 3)
    num_global, batch, num_clusters = teacher_similarities.shape
    if num_global < 2:
        raise ValueError(
            f"teacher_similarities must hold at least 2 global views (the h path pairs each "
            f"with the others), got shape {teacher_similarities.shape}"
        )
    if student_similarities.shape != teacher_similarities.shape:
        raise ValueError(
            f"student_similarities must have the shape of teacher_similarities "
            f"{teacher_similarities.shape} (the same global views), got {student_similarities.shape}"
        )
    if predictor_similarities.shape[1:] != (batch, num_clusters):
        raise ValueError(
            f"predictor_similarities must have shape [V, {batch}, {num_clusters}] to match "
            f"teacher_similarities {teacher_similarities.shape}, got {predictor_similarities.shape}"
        )
    _check_sizes(sizes, num_clusters)
    _check_temperature("teacher_temperature", teacher_temperature)
    _check_temperature("student_temperature", student_temperature)

    targets = jax.nn.softmax(_teacher_logits(teacher_similarities, sizes, teacher_temperature), axis=-1)

    def cross_entropy(similarities):  # -> [G, views]: batch mean CE of each pair.
        log_p = jax.nn.log_softmax(similarities.astype(jnp.float32) / student_temperature, axis=-1)
        return -jnp.einsum("abk,vbk->av", targets, log_p) / batch

    others = 1.0 - jnp.eye(num_global, dtype=jnp.float32)
    h_path = jnp.sum(cross_entropy(student_similarities) * others, axis=1) / (num_global - 1)
    g_path = jnp.mean(cross_entropy(predictor_similarities), axis=1)
    return jnp.mean(0.5 * h_path + 0.5 * g_path)


def excb_metrics(
    teacher_similarities: jax.Array,
    sizes: jax.Array,
    *,
    teacher_temperature: float = 0.04,
    axis_name: str | tuple[str, ...] | None = None,
) -> dict[str, jax.Array]:
    """Balance and confidence statistics, as the paper plots them.

    All teacher statistics are of the balanced teacher (the targets `excb_loss` uses).

    Args:
      teacher_similarities: [G, B, K] any float dtype, G >= 2 global teacher views.
      sizes: [K] float; the tracker's sizes before this step's update.
      teacher_temperature: as in `excb_loss`.
      axis_name: data-parallel axis name(s); counts are `psum`-reduced and means
        `pmean`-reduced over it (with equal local batches, the global statistics).

    Returns:
      dict of float32 scalars:
        min_relative_size, max_relative_size: min and max of s_k * K / sum(s) (1 is an
          average-size cluster).
        teacher_confidence: mean over views and samples of the max teacher probability.
        view_agreement: fraction of samples whose teacher argmax is the same in two
          global views (averaged over view pairs when G > 2).
        empty_clusters: clusters no global teacher view picked in this (global) batch.
    """
    _check_similarities("teacher_similarities", teacher_similarities, 3)
    num_global, _, num_clusters = teacher_similarities.shape
    if num_global < 2:
        raise ValueError(
            f"teacher_similarities must hold at least 2 global views for view_agreement, "
            f"got shape {teacher_similarities.shape}"
        )
    _check_sizes(sizes, num_clusters)
    _check_temperature("teacher_temperature", teacher_temperature)

    def pmean(x):
        return x if axis_name is None else jax.lax.pmean(x, axis_name)

    relative = _relative_sizes(sizes)
    logits = _teacher_logits(teacher_similarities, sizes, teacher_temperature)
    confidence = jnp.mean(jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1))
    choice = jnp.argmax(logits, axis=-1)  # [G, B]
    pairs = [(a, b) for a in range(num_global) for b in range(a + 1, num_global)]
    agreement = jnp.mean(jnp.stack([jnp.mean(choice[a] == choice[b]) for a, b in pairs]))
    counts = _hard_counts(jax.lax.stop_gradient(teacher_similarities), sizes, axis_name)
    return {
        "min_relative_size": jnp.min(relative),
        "max_relative_size": jnp.max(relative),
        "teacher_confidence": pmean(confidence),
        "view_agreement": pmean(agreement.astype(jnp.float32)),
        "empty_clusters": jnp.sum(counts == 0).astype(jnp.float32),
    }
