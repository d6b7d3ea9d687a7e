"""SwAV optimiser: LR schedule, LARS in two modes, prototype freezing (docs/ALGORITHM.md §7).

  lr_schedule      per-iteration LR: linear warmup (endpoint included), then cosine
  make_optimizer   LARS over momentum SGD, wrapped in `freeze_for`
  scale_by_larc    apex LARC(clip=False) with the SGD weight decay it takes over
  freeze_for       no update, no state change for masked leaves during the first steps
  prototype_mask   True for the prototypes' leaves

Two LARS modes, chosen by `optim.lars_mode`:

  'swav'   the release's step (apex LARC over torch SGD), to float precision:
           per tensor, if ||w|| > 0 and ||g|| > 0,
             g <- (g + wd*w) * trust*||w|| / (||g|| + wd*||w|| + eps),
           otherwise g stays raw, without weight decay; then buf = m*buf + g
           (first step buf = g); update = -lr * buf. No parameter is excluded.
  'optax'  `optax.lars`: always adds wd*w, divides by ||g + wd*w||, applies the LR
           before momentum; 1-D leaves (biases, BatchNorm scales and offsets) are
           excluded from weight decay and from the trust ratio, so they take plain
           momentum SGD steps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

LARS_MODES = ("swav", "optax")
# Linear scaling reference batch (Goyal et al. 2017), as in the release's recipes.
_REFERENCE_BATCH = 256

Mask = Union[Any, Callable[[optax.Params], Any]]


def lr_schedule(
    optim_config: Any, *, steps_per_epoch: int, epochs: int, batch_size: int
) -> optax.Schedule:
    """The release's per-iteration learning rate.

    With W = warmup_epochs * steps_per_epoch and T = epochs * steps_per_epoch:
      step s < W:  np.linspace(start_warmup, base_lr, W)[s]   (reaches base_lr at W - 1)
      step s >= W: final_lr + 0.5 * (base_lr - final_lr) * (1 + cos(pi * (s - W) / (T - W)))
    Steps past T - 1 keep the last value.

    With `optim.scale_lr_with_batch`, base_lr and final_lr are per 256 images and both
    are multiplied by batch_size / 256 (so final_lr / base_lr stays as configured);
    start_warmup is an absolute starting value and is not scaled (as the warmup of
    Goyal et al. 2017, which starts from the small-batch LR).

    Args:
      optim_config: the `optim` section of the config (swav_jax/configs/base.py).
      steps_per_epoch: optimiser steps per epoch (global batches per epoch).
      epochs: total epochs of the run.
      batch_size: global batch size, used only for the LR scaling.

    Returns:
      schedule(count: int scalar) -> float32 scalar LR.
    """
    cfg = optim_config
    if min(steps_per_epoch, epochs, batch_size) < 1 or cfg.warmup_epochs > epochs:
        raise ValueError(
            f"lr_schedule needs steps_per_epoch, epochs, batch_size >= 1 and warmup_epochs <= epochs, got "
            f"{steps_per_epoch}, {epochs}, {batch_size}, {cfg.warmup_epochs}"
        )
    scale = batch_size / _REFERENCE_BATCH if cfg.scale_lr_with_batch else 1.0
    base_lr = float(cfg.base_lr) * scale
    final_lr = float(cfg.final_lr) * scale
    start_lr = float(cfg.start_warmup)
    warmup_iters = int(cfg.warmup_epochs) * steps_per_epoch
    total_iters = epochs * steps_per_epoch
    cosine_iters = total_iters - warmup_iters

    def schedule(count):
        step = jnp.minimum(jnp.asarray(count), total_iters - 1)
        # Both phases are lerps (1 - w) * a + w * b, so their ends are exact in float32:
        # start_warmup at step 0, base_lr at W - 1 and at W.
        w = step.astype(jnp.float32) / max(warmup_iters - 1, 1)
        warmup = (1.0 - w) * start_lr + w * base_lr
        t = (step - warmup_iters).astype(jnp.float32)
        w = 0.5 * (1.0 + jnp.cos(jnp.pi * t / max(cosine_iters, 1)))
        cosine = (1.0 - w) * final_lr + w * base_lr
        return jnp.where(step < warmup_iters, warmup, cosine).astype(jnp.float32)

    return schedule


def scale_by_larc(
    *, trust_coefficient: float, weight_decay: float, eps: float
) -> optax.GradientTransformation:
    """apex LARC(clip=False) together with the SGD weight decay it takes over.

    Per leaf w with gradient g (any shape, float):
      if ||w|| > 0 and ||g|| > 0:
        g <- (g + weight_decay * w) * trust_coefficient * ||w||
             / (||g|| + weight_decay * ||w|| + eps)
      else: g unchanged, without weight decay.
    apex sets the wrapped SGD's weight decay to 0 and adds it back only inside this
    rescaling, so the else branch gets no decay at all. Norms are over all elements,
    in float32. Stateless; needs `params` in `update`.
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_larc needs params: call update(grads, state, params)")

        def scale(g, w):
            w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32))))
            g_norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            scaled = (g + weight_decay * w) * ratio.astype(g.dtype)
            return jnp.where((w_norm > 0) & (g_norm > 0), scaled, g)

        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


class FreezeState(NamedTuple):
    """State of `freeze_for`.

    count: int32 scalar, updates applied so far (the 0-based iteration of the next one).
    inner_state: the wrapped transformation's state.
    """

    count: jax.Array
    inner_state: optax.OptState


def _hold_param_trees(old_state, new_state, held, updates):
    """new_state, but with old values for `held` leaves wherever the state mirrors the
    params (momentum traces, moments); other entries (step counts) advance."""
    treedef = jax.tree.structure(updates)
    shapes = [jnp.shape(u) for u in jax.tree.leaves(updates)]

    def mirrors_params(x):
        return jax.tree.structure(x) == treedef and [
            jnp.shape(leaf) for leaf in jax.tree.leaves(x)
        ] == shapes

    def hold(old, new):
        if not mirrors_params(old):
            return new
        return jax.tree.map(lambda h, o, n: jnp.where(h, o, n), held, old, new)

    return jax.tree.map(hold, old_state, new_state, is_leaf=mirrors_params)


def freeze_for(
    inner: optax.GradientTransformation, mask: Mask, num_steps: int
) -> optax.GradientTransformation:
    """Freezes the masked leaves for the first `num_steps` updates.

    While count < num_steps, masked leaves get a zero update and keep their entries of
    every part of `inner`'s state that mirrors the params (e.g. the momentum trace),
    as if their gradient were absent: the release sets the prototypes' grad to None,
    so SGD and LARC skip them (no update, no momentum, no decay). From step num_steps
    on they are updated normally; a trace that was zero starts fresh (buf = g).
    Entries that do not mirror the params, such as a schedule's step count, advance
    for everyone, so an unfrozen leaf sees the LR of the current iteration.

    Args:
      inner: the transformation to wrap.
      mask: pytree of bools with the params' structure (True = frozen), or a callable
        params -> such a pytree (called on the updates, which share that structure).
      num_steps: number of frozen iterations (>= 0).

    The step count is part of `FreezeState`, so it is checkpointed; the switch is a
    `jnp.where` on it, so `update` jits with one compiled program for all steps.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")

    def init_fn(params):
        return FreezeState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None):
        mask_tree = mask(updates) if callable(mask) else mask
        if jax.tree.structure(mask_tree) != jax.tree.structure(updates):
            raise ValueError(
                "freeze mask must have the structure of the params: got "
                f"{jax.tree.structure(mask_tree)}, params {jax.tree.structure(updates)}"
            )
        frozen_now = state.count < num_steps
        held = jax.tree.map(lambda m: jnp.logical_and(m, frozen_now), mask_tree)
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        new_updates = jax.tree.map(
            lambda h, u: jnp.where(h, jnp.zeros_like(u), u), held, new_updates
        )
        new_inner = _hold_param_trees(state.inner_state, new_inner, held, updates)
        return new_updates, FreezeState(optax.safe_increment(state.count), new_inner)

    return optax.GradientTransformation(init_fn, update_fn)


def _decay_and_trust_mask(params):
    # 'optax' mode: biases and BatchNorm scales/offsets (ndim <= 1) are excluded.
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    optim_config: Any,
    schedule: optax.ScalarOrSchedule,
    *,
    freeze_mask: Mask,
    freeze_steps: int,
) -> optax.GradientTransformation:
    """LARS over momentum SGD as `optim.lars_mode` says, with frozen leaves.

    Args:
      optim_config: the `optim` section of the config (swav_jax/configs/base.py).
      schedule: LR per iteration (`lr_schedule`), or a constant.
      freeze_mask: pytree of bools like the params, or a callable params -> mask
        (e.g. `prototype_mask`); True leaves are frozen for `freeze_steps` steps.
      freeze_steps: `swav.freeze_prototypes_niters`.

    Returns:
      A transformation whose state is a `FreezeState`; `update` needs `params`.
    """
    cfg = optim_config
    if cfg.lars_mode not in LARS_MODES:
        raise ValueError(f"optim.lars_mode must be one of {LARS_MODES}, got {cfg.lars_mode!r}")
    if cfg.lars_mode == "swav":
        inner = optax.chain(
            scale_by_larc(
                trust_coefficient=float(cfg.trust_coefficient),
                weight_decay=float(cfg.weight_decay),
                eps=float(cfg.lars_eps),
            ),
            # torch SGD momentum: buf = m * buf + g, first buf = g (trace starts at 0).
            optax.trace(decay=float(cfg.momentum), nesterov=False),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        inner = optax.lars(
            schedule,
            weight_decay=float(cfg.weight_decay),
            weight_decay_mask=_decay_and_trust_mask,
            trust_coefficient=float(cfg.trust_coefficient),
            eps=float(cfg.lars_eps),
            trust_ratio_mask=_decay_and_trust_mask,
            momentum=float(cfg.momentum),
        )
    return freeze_for(inner, freeze_mask, freeze_steps)


def prototype_mask(params: optax.Params) -> Any:
    """True for leaves under a module whose name starts with 'prototypes'.

    The model names its prototype layers 'prototypes_0', 'prototypes_1', ...; any
    path component (dict key, attribute or index) starting with 'prototypes' counts.
    Returns a pytree of Python bools with the structure of `params`.
    """

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return jax.tree.map_with_path(
        lambda path, _: any(name(k).startswith("prototypes") for k in path), params
    )
