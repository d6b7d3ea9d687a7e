"""SwAV swapped-prediction loss over multi-crop scores (docs/ALGORITHM.md §5-§6).

Pure jax.numpy; imports only `sinkhorn` from the package, so `from swav_jax import
swav_loss` pays for nothing but jax.

Three pieces, composed by `swav_loss` and usable alone by a training loop that wants
the codes for monitoring:

  assign_codes            scores -> Sinkhorn codes of the assigning crops
  swapped_prediction_loss scores, codes -> loss
  prototype_usage         codes or probabilities -> collapse statistics
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from swav_jax.sinkhorn import sinkhorn


def _check_crops_for_assign(crops_for_assign: Sequence[int], num_views: int) -> tuple[int, ...]:
    if num_views < 2:
        raise ValueError(f"scores must hold at least 2 views (crops), got {num_views}")
    crops = tuple(int(c) for c in crops_for_assign)
    if not crops:
        raise ValueError("crops_for_assign must name at least one crop")
    if len(set(crops)) != len(crops):
        raise ValueError(f"crops_for_assign has repeated crops: {crops}")
    for c in crops:
        if not 0 <= c < num_views:
            raise ValueError(
                f"crops_for_assign must hold crop indices in [0, {num_views}) for scores "
                f"with {num_views} views, got {crops}"
            )
    return crops


def _check_scores(scores: jax.Array) -> None:
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape [V, B, K], got shape {scores.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")


def assign_codes(
    scores: jax.Array,
    *,
    crops_for_assign: Sequence[int] = (0, 1),
    epsilon: float = 0.05,
    num_iters: int = 3,
    axis_name: str | None = None,
    queue_scores: jax.Array | None = None,
) -> jax.Array:
    """Sinkhorn codes of the assigning crops.

    Args:
      scores: [V, B, K] any float dtype, crop-major (view v of local batch B).
      crops_for_assign: the views whose codes are targets (the release: the two global crops).
      epsilon, num_iters, axis_name: as `sinkhorn`.
      queue_scores: optional [len(crops_for_assign), L, K]: scores of queued embeddings
        against the current prototypes, one queue per assigning crop. They are placed
        before the batch in that crop's Sinkhorn problem; only the batch's codes are
        kept.

    Returns:
      codes: [len(crops_for_assign), B, K] float32, stop-gradient; rows sum to 1.
    """
    _check_scores(scores)
    crops = _check_crops_for_assign(crops_for_assign, scores.shape[0])
    batch = scores.shape[1]
    if queue_scores is not None:
        if (
            queue_scores.ndim != 3
            or queue_scores.shape[0] != len(crops)
            or queue_scores.shape[2] != scores.shape[2]
        ):
            raise ValueError(
                f"queue_scores must have shape [{len(crops)}, L, {scores.shape[2]}] "
                f"(one queue per assigning crop), got shape {queue_scores.shape}"
            )
    codes = []
    for i, crop in enumerate(crops):
        problem = scores[crop].astype(jnp.float32)
        if queue_scores is not None:
            problem = jnp.concatenate([queue_scores[i].astype(jnp.float32), problem], axis=0)
        q = sinkhorn(problem, epsilon=epsilon, num_iters=num_iters, axis_name=axis_name)
        codes.append(q[-batch:])
    return jnp.stack(codes)


def swapped_prediction_loss(
    scores: jax.Array,
    codes: jax.Array,
    *,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
) -> jax.Array:
    """Cross-entropy from each assigning crop's codes to every other crop's scores.

    loss = mean_a [ 1/(V-1) sum_{v != a} mean_b -sum_k q_a[b,k] log_softmax(S_v[b]/T)[k] ]

    Args:
      scores: [V, B, K] any float dtype; gradients flow through these.
      codes: [len(crops_for_assign), B, K] targets (treated as constants).
      crops_for_assign: which view each row of `codes` was computed from.
      temperature: softmax temperature T (> 0).

    Returns:
      The local-batch mean loss, a float32 scalar. Under data parallelism its `pmean`
      over the data axis is the global loss.
    """
    _check_scores(scores)
    num_views = scores.shape[0]
    crops = _check_crops_for_assign(crops_for_assign, num_views)
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if codes.shape != (len(crops),) + scores.shape[1:]:
        raise ValueError(
            f"codes must have shape {(len(crops),) + scores.shape[1:]} "
            f"([len(crops_for_assign), B, K]), got {codes.shape}"
        )
    log_p = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)  # [V, B, K]
    codes = jax.lax.stop_gradient(codes).astype(jnp.float32)
    # ce[a, v] = mean over the batch of -sum_k q_a log p_v.
    ce = -jnp.einsum("abk,vbk->av", codes, log_p) / scores.shape[1]
    not_self = jnp.ones((len(crops), num_views), jnp.float32)
    not_self = not_self.at[jnp.arange(len(crops)), jnp.array(crops)].set(0.0)
    return jnp.sum(ce * not_self) / ((num_views - 1) * len(crops))


def swav_loss(
    scores: jax.Array,
    *,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    num_iters: int = 3,
    axis_name: str | None = None,
    queue_scores: jax.Array | None = None,
) -> jax.Array:
    """SwAV loss of multi-crop prototype scores (docs/ALGORITHM.md §4-§6).

    Args:
      scores: [V, B, K] any float dtype, crop-major; V views of the local batch B.
      crops_for_assign: views whose Sinkhorn codes are the targets.
      temperature: softmax temperature of the predictions.
      epsilon, num_iters: Sinkhorn parameters.
      axis_name: data-parallel axis; Sinkhorn sums are reduced over it.
      queue_scores: optional [len(crops_for_assign), L, K] queue scores (see
        `assign_codes`).

    Returns:
      float32 scalar: the local-batch mean loss (`pmean` it for the global loss).
    """
    codes = assign_codes(
        scores,
        crops_for_assign=crops_for_assign,
        epsilon=epsilon,
        num_iters=num_iters,
        axis_name=axis_name,
        queue_scores=queue_scores,
    )
    return swapped_prediction_loss(
        scores, codes, crops_for_assign=crops_for_assign, temperature=temperature
    )


def prototype_usage(assignments: jax.Array, *, axis_name: str | None = None) -> dict[str, jax.Array]:
    """Collapse statistics of hard (argmax) assignments to prototypes.

    Args:
      assignments: [..., K] codes or prototype probabilities of this device's samples.
      axis_name: data-parallel axis; counts are summed over it (global statistics).

    Returns:
      dict of float32 scalars:
        empty_prototypes: prototypes that no sample picks by argmax.
        assignment_entropy: entropy (nats) of the mean one-hot assignment, i.e. of the
          histogram of argmax choices; ln(K) is perfectly balanced, 0 is total collapse.
    """
    num_prototypes = assignments.shape[-1]
    choice = jnp.argmax(assignments.reshape(-1, num_prototypes), axis=-1)
    counts = jnp.zeros((num_prototypes,), jnp.float32).at[choice].add(1.0)
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
    freq = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(freq > 0, freq * jnp.log(jnp.where(freq > 0, freq, 1.0)), 0.0))
    return {
        "empty_prototypes": jnp.sum(counts == 0).astype(jnp.float32),
        "assignment_entropy": entropy,
    }
