"""Linear probe on frozen features, as the release's eval_linear.py.

The classifier is the release's default `RegLog` head for global-pooled features: one
Linear(F, C) on the raw pooled features, weights N(0, 0.01), bias 0, no BatchNorm and no
L2 normalisation (the release adds a BatchNorm only for its non-pooled 8192-d variant).
Optimiser: PyTorch SGD, momentum 0.9 (not Nesterov), weight decay on every parameter
(bias included), mean cross-entropy. LR: the release's CosineAnnealingLR stepped once per
epoch, lr_e = lr * (1 + cos(pi * e / epochs)) / 2 for epoch e = 0 .. epochs - 1 (towards
0, the release's final_lr): constant within an epoch. Protocol defaults: lr 0.3, wd 1e-6,
batch 256 (global), 100 epochs.

This module holds the head, its optimiser and schedule, and `train_linear_probe` on
cached features (fast; small data sets, sweeps). The release's protocol on augmented
images of a frozen network is `swav_jax.eval.images` with `run.probe_classifier`.

Accuracies are percentages in [0, 100]; top-5 means top-min(5, C). Like the release, the
test set is evaluated after every epoch and both the final and the best epoch are reported.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

Params = dict[str, jax.Array]
EpochCallback = Callable[[int, dict[str, float]], None]


def init_linear(key: jax.Array, feature_dim: int, num_classes: int) -> Params:
    """{'kernel': [F, C] float32 ~ N(0, 0.01^2), 'bias': [C] float32 zeros}."""
    return {
        "kernel": 0.01 * jax.random.normal(key, (feature_dim, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }


def linear_apply(params: Params, features: jax.Array) -> jax.Array:
    """features [n, F] -> logits [n, C] float32."""
    return features.astype(jnp.float32) @ params["kernel"] + params["bias"]


def probe_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """The release's per-epoch cosine LR (torch CosineAnnealingLR, T_max = epochs,
    eta_min = 0) for epoch = 0 .. epochs - 1."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


def probe_optimizer(
    momentum: float = 0.9, weight_decay: float = 1e-6
) -> optax.GradientTransformation:
    """PyTorch SGD without the LR: d = g + wd * w; buf = momentum * buf + d. The caller
    applies w -= lr * buf, so the per-epoch LR is an argument, not optimiser state."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def _hits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [n, C], labels [n] -> top-1 and top-min(5, C) hits, [n] bool each."""
    _, predicted = lax.top_k(logits, min(5, logits.shape[-1]))
    hits = predicted == labels[:, None]
    return hits[:, 0], jnp.any(hits, axis=1)


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over mask-True rows: cross-entropy, top-1 and top-5 hits, and the count.

    logits [n, C], labels [n] int (any value where mask is False), mask [n] bool ->
    {'loss', 'top1', 'top5', 'count'} float32 scalars."""
    labels = jnp.where(mask, labels, 0)  # padding rows may carry label -1
    mask = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hit1, hit5 = _hits(logits, labels)
    return {
        "loss": jnp.sum(ce * mask),
        "top1": jnp.sum(hit1 * mask),
        "top5": jnp.sum(hit5 * mask),
        "count": jnp.sum(mask),
    }


def _sgd_step(params, opt_state, features, labels, mask, lr, tx):
    """One SGD step on the mean cross-entropy of the mask-True rows."""

    def loss_fn(p):
        stats = classification_sums(linear_apply(p, features), labels, mask)
        return stats["loss"] / jnp.maximum(stats["count"], 1.0), stats

    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state, stats


def percentages(stats: Mapping[str, float]) -> dict[str, float]:
    """`classification_sums` (summed over batches) -> mean loss, top-1 and top-5 in %."""
    count = max(float(stats["count"]), 1.0)
    return {
        "loss": float(stats["loss"]) / count,
        "top1": 100.0 * float(stats["top1"]) / count,
        "top5": 100.0 * float(stats["top5"]) / count,
    }


def _check_hyper(epochs, batch_size, lr, momentum, weight_decay):
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")


def _check_split(name: str, features: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name}_features must have shape [N, F] with N > 0, got {features.shape}")
    if labels.shape != features.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name}_labels must be [{features.shape[0]}] integers, "
            f"got {labels.shape} {labels.dtype}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name}_labels must lie in [0, num_classes={num_classes})")


def train_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    seed: int = 0,
    on_epoch_end: EpochCallback | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Linear probe on cached features (e.g. from `extract_features`), on one device.

    Each epoch visits a fresh permutation of the training set in batches of `batch_size`,
    the last one smaller (drop_last=False), one jitted `lax.scan` per epoch. The features
    live on the default device in float32 (ImageNet train at F = 2048: 10.5 GB). Every
    process of a multi-process run computes the same result on its own device.

    Args:
      train_features: [N, F] float; train_labels: [N] int in [0, num_classes).
      test_features: [M, F] float; test_labels: [M] int in [0, num_classes).
      seed: `init_key, shuffle_key = jax.random.split(jax.random.key(seed))`; epoch e
        shuffles with `jax.random.fold_in(shuffle_key, e)`.
      on_epoch_end: called as f(epoch, {'loss', 'top1', 'top5', 'lr', 'test_top1',
        'test_top5'}) with the epoch's running training statistics and the test accuracy
        after it.

    Returns:
      params: {'kernel': [F, C], 'bias': [C]} float32 host NumPy arrays (the final epoch's).
      metrics: {'train_top1', 'train_top5', 'test_top1', 'test_top5'} of the final params
        (train: on the training features as given), 'train_loss', the last epoch's
        running mean cross-entropy, and 'best_test_top1', 'best_test_top5',
        'best_epoch': the epoch (0-based) with the highest test top-1 (the first on
        ties) and its accuracies, what the release reports.
    """
    train_features, test_features = np.asarray(train_features), np.asarray(test_features)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    _check_split("train", train_features, train_labels, num_classes)
    _check_split("test", test_features, test_labels, num_classes)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features and test_features must have the same width, got "
            f"{train_features.shape[1]} and {test_features.shape[1]}"
        )
    _check_hyper(epochs, batch_size, lr, momentum, weight_decay)
    n, dim = train_features.shape
    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = init_linear(init_key, dim, num_classes)
    tx = probe_optimizer(momentum, weight_decay)
    opt_state = tx.init(params)
    feats = jnp.asarray(train_features, jnp.float32)
    labels = jnp.asarray(train_labels, jnp.int32)
    steps = -(-n // batch_size)

    @jax.jit
    def run_epoch(params, opt_state, feats, labels, key, lr):
        order = (
            jnp.zeros((steps * batch_size,), jnp.int32).at[:n].set(jax.random.permutation(key, n))
        )
        mask = jnp.arange(steps * batch_size) < n

        def body(carry, xs):
            idx, m = xs
            p, o, stats = _sgd_step(*carry, feats[idx], labels[idx], m, lr, tx)
            return (p, o), stats

        xs = (order.reshape(steps, batch_size), mask.reshape(steps, batch_size))
        (params, opt_state), stats = lax.scan(body, (params, opt_state), xs)
        return params, opt_state, jax.tree.map(jnp.sum, stats)

    best = (-1.0, 0.0, -1)
    for epoch in range(epochs):
        epoch_lr = probe_lr(lr, epoch, epochs)
        params, opt_state, stats = run_epoch(
            params,
            opt_state,
            feats,
            labels,
            jax.random.fold_in(shuffle_key, epoch),
            jnp.float32(epoch_lr),
        )
        test_top1, test_top5 = _accuracy(params, test_features, test_labels)
        if test_top1 > best[0]:
            best = (test_top1, test_top5, epoch)
        if on_epoch_end is not None:
            on_epoch_end(
                epoch,
                {**percentages(jax.device_get(stats)), "lr": epoch_lr, "test_top1": test_top1, "test_top5": test_top5},
            )
    last = percentages(jax.device_get(stats))
    train_top1, train_top5 = _accuracy(params, train_features, train_labels)
    metrics = {
        "train_top1": train_top1,
        "train_top5": train_top5,
        "test_top1": test_top1,
        "test_top5": test_top5,
        "train_loss": last["loss"],
        "best_test_top1": best[0],
        "best_test_top5": best[1],
        "best_epoch": best[2],
    }
    return jax.device_get(params), metrics


@jax.jit
def _hit_counts(
    params: Params, features: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    hit1, hit5 = _hits(linear_apply(params, features), labels)
    return jnp.sum(hit1), jnp.sum(hit5)


def _accuracy(params: Params, features: np.ndarray, labels: np.ndarray, chunk: int = 8192):
    """Top-1 and top-5 percentages of host features, `chunk` rows per device call so the
    [N, C] logits of a large set never exist at once."""
    top1 = top5 = 0
    for start in range(0, len(features), chunk):
        h1, h5 = _hit_counts(
            params, features[start : start + chunk], labels[start : start + chunk].astype(np.int32)
        )
        top1, top5 = top1 + int(h1), top5 + int(h5)
    return 100.0 * top1 / len(features), 100.0 * top5 / len(features)
