"""ExCB optimiser and schedules (SPEC §10; the release's engine/optimizer.py).

  make_excb_optimizer     momentum SGD (PyTorch semantics) with three weight-decay groups
  teacher_momentum        EMA momentum of the teacher, cosine from m0 up to 1
  centroid_weight_decay   the centroids' decay, cosine from start down to end

The LR schedule is SwAV's `swav_jax.train.optim.lr_schedule` (linear warm-up, then
cosine), read from `config.optim`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from swav_jax.models.excb import CENTROIDS


def _cosine_from_to(start: float, end: float, step: jax.Array, total_steps: int) -> jax.Array:
    """end + (start - end) * (1 + cos(pi * s / T)) / 2 with s = min(step, T): start at
    step 0, end at step T and after. float32."""
    t = jnp.minimum(jnp.asarray(step), total_steps).astype(jnp.float32) / total_steps
    w = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return (w * start + (1.0 - w) * end).astype(jnp.float32)


def _check_total_steps(total_steps: int) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    return total_steps


def teacher_momentum(base: float, total_steps: int) -> optax.Schedule:
    """The teacher's EMA momentum at step s: 1 - (1 - base) * (1 + cos(pi * s / T)) / 2.

    `base` at the first step, 1 at step T (the release's `scheduling(1, base, s, T,
    decreasing=False)`, with s the 0-based step whose update the EMA follows).
    """
    if not 0.0 <= float(base) <= 1.0:
        raise ValueError(f"excb.teacher_momentum must be in [0, 1], got {base!r}")
    total_steps = _check_total_steps(total_steps)
    return lambda step: _cosine_from_to(float(base), 1.0, step, total_steps)


def centroid_weight_decay(start: float, end: float, total_steps: int) -> optax.Schedule:
    """The centroids' weight decay at update s, cosine from `start` (s = 0) to `end` (s = T).

    With start = 10 * wd and end = wd this is the release's `centroid_adjustments:
    wdx10c1` (wd * (9 * (1 + cos(pi * s / T)) / 2 + 1)); the release counts s from 1.
    """
    for name, value in (("excb.centroid_weight_decay", start), ("excb.centroid_weight_decay_end", end)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    total_steps = _check_total_steps(total_steps)
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
    momentum = float(optim_config.momentum)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"optim.momentum must be in [0, 1), got {optim_config.momentum!r}")
    weight_decay = float(optim_config.weight_decay)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"optim.weight_decay must be a finite number >= 0, got {optim_config.weight_decay!r}")
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_regular_decay_mask),
        optax.add_decayed_weights(centroid_decay, mask=centroid_mask),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(lr),
    )
