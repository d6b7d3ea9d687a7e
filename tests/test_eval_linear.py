"""Linear probe: a float64 NumPy restatement of the release's SGD, separable data, and the
image-batch protocol against the cached-feature one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.tree_util import Partial

from swav_jax.eval.linear import (
    init_linear,
    probe_lr,
    train_linear_probe,
    train_linear_probe_on_images,
)


def _clusters(rng, n, num_classes, dim, scale):
    centres = scale * rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def _reference_full_batch(x, y, w, b, *, num_classes, epochs, lr, momentum, wd):
    """torch.optim.SGD(momentum, weight_decay) on the mean cross-entropy of all examples,
    one step per epoch, CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per epoch."""
    x, w, b = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    onehot = np.eye(num_classes)[y]
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    for epoch in range(epochs):
        step_lr = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        grad_w, grad_b = x.T @ g + wd * w, g.sum(0) + wd * b
        buf_w, buf_b = momentum * buf_w + grad_w, momentum * buf_b + grad_b
        w, b = w - step_lr * buf_w, b - step_lr * buf_b
    return w, b


def test_probe_lr_is_the_per_epoch_cosine():
    assert probe_lr(0.3, 0, 100) == pytest.approx(0.3)
    assert probe_lr(0.3, 50, 100) == pytest.approx(0.15)
    assert probe_lr(0.3, 99, 100) == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 0.99)))


def test_matches_float64_reference_sgd():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 50, 4, 6, scale=1.0)
    # batch_size > N: one masked batch per epoch, so the order of examples cannot matter.
    params, _ = train_linear_probe(
        x,
        y,
        x,
        y,
        num_classes=4,
        epochs=4,
        batch_size=56,
        lr=0.5,
        momentum=0.9,
        weight_decay=1e-2,
        seed=3,
    )
    init = init_linear(jax.random.split(jax.random.key(3))[0], 6, 4)
    assert float(np.std(init["kernel"])) == pytest.approx(0.01, rel=0.3)
    w, b = _reference_full_batch(
        x,
        y,
        np.asarray(init["kernel"]),
        np.asarray(init["bias"]),
        num_classes=4,
        epochs=4,
        lr=0.5,
        momentum=0.9,
        wd=1e-2,
    )
    np.testing.assert_allclose(params["kernel"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["bias"], b, rtol=1e-4, atol=1e-6)


def test_solves_a_linearly_separable_problem():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 700, 7, 16, scale=4.0)
    xtr, ytr, xte, yte = x[:500], y[:500], x[500:], y[500:]
    seen = []
    params, metrics = train_linear_probe(
        xtr,
        ytr,
        xte,
        yte,
        num_classes=7,
        epochs=10,
        batch_size=64,
        on_epoch_end=lambda epoch, stats: seen.append((epoch, stats)),
    )
    assert params["kernel"].shape == (16, 7) and params["bias"].shape == (7,)
    assert metrics["train_top1"] == 100.0 and metrics["test_top1"] == 100.0
    assert metrics["test_top5"] == 100.0
    assert [e for e, _ in seen] == list(range(10))
    assert seen[0][1]["lr"] == pytest.approx(0.3) and seen[-1][1]["loss"] < seen[0][1]["loss"]


def test_image_protocol_matches_cached_features_on_a_mesh():
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 90, 5, 12, scale=3.0)
    xtr, ytr, xte, yte = x[:60], y[:60], x[60:], y[60:]

    def apply(scale, images):  # a frozen "network": the features are the first channel
        return scale * images[..., 0].reshape(images.shape[0], -1)

    feature_fn = Partial(apply, jnp.float32(1.0))  # its "weights" are traced arguments

    def as_images(f):
        return np.repeat(f.reshape(len(f), 3, 4, 1), 3, axis=-1)

    def batches(f, labels, size):
        for start in range(0, len(f), size):
            yield {
                "image": as_images(f[start : start + size]),
                "label": labels[start : start + size],
            }

    mesh = Mesh(np.array(jax.devices()), ("data",))
    # One batch of 60 per epoch (padded to 64 over 8 devices): the same full-batch steps
    # as the cached-feature probe with batch_size >= 60.
    params, metrics = train_linear_probe_on_images(
        feature_fn,
        lambda epoch: batches(xtr, ytr, 60),
        batches(xte, yte, 7),
        num_classes=5,
        mesh=mesh,
        epochs=5,
        seed=4,
    )
    cached_params, cached = train_linear_probe(
        xtr, ytr, xte, yte, num_classes=5, epochs=5, batch_size=60, seed=4
    )
    np.testing.assert_allclose(params["kernel"], cached_params["kernel"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["bias"], cached_params["bias"], rtol=1e-4, atol=1e-6)
    assert (
        metrics["test_top1"] == cached["test_top1"] and metrics["test_top5"] == cached["test_top5"]
    )
    assert metrics["train_loss"] == pytest.approx(cached["train_loss"], rel=1e-4)


def test_bad_arguments():
    x = np.zeros((8, 3), np.float32)
    y = np.zeros((8,), np.int32)
    with pytest.raises(ValueError, match="train_labels"):
        train_linear_probe(x, y + 5, x, y, num_classes=2)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probe(x, y, x, y, num_classes=2, epochs=0)
    with pytest.raises(ValueError, match="same width"):
        train_linear_probe(x, y, x[:, :2], y, num_classes=2)
