"""Linear probe: a float64 NumPy restatement of the release's SGD (cached features and the
image protocols' sharded step), separable data, best and final epochs."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.eval import images as eval_images
from swav_jax.eval.linear import (
    init_linear,
    linear_apply,
    probe_lr,
    probe_optimizer,
    train_linear_probe,
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
    # Best: the first epoch of highest test top-1; final: the last epoch's.
    test_top1 = [stats["test_top1"] for _, stats in seen]
    assert metrics["test_top1"] == test_top1[-1] and metrics["best_test_top1"] == max(test_top1)
    assert metrics["best_epoch"] == test_top1.index(max(test_top1))
    assert metrics["best_test_top5"] == seen[metrics["best_epoch"]][1]["test_top5"]


def test_image_step_matches_float64_reference_sgd():
    """The image protocols' sharded step (swav_jax.eval.images) with a linear head on the
    flattened pixels: the release's SGD, the per-epoch LR given to each step."""
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 16, 4, 12, scale=2.0)
    pixels = x.reshape(1, 16, 2, 2, 3)  # one crop of 2 x 2 x 3 "pixels" per example, as the pipeline's layout

    def forward(frozen, params, batch_stats, batch, train):
        del frozen, train
        return linear_apply(params, batch.reshape(batch.shape[0], -1)), batch_stats

    init = init_linear(jax.random.key(5), 12, 4)
    classifier = eval_images.Classifier(
        name="t", forward=forward, frozen=(), init=lambda: (init, {}),
        learning_rates=lambda epoch: probe_lr(0.5, epoch, 2), epochs=2, batch_size=16,
        momentum=0.9, weight_decay=1e-2, settings={},
    )
    mesh = eval_images.eval_mesh()
    tx = probe_optimizer(0.9, 1e-2)
    train_step, _ = eval_images.make_steps(classifier, mesh, tx)
    state = eval_images.initial_state(classifier, mesh, tx)
    crops = (jax.device_put(pixels, NamedSharding(mesh, P(None, "data"))),)
    labels = jax.device_put(y.astype(np.int32), NamedSharding(mesh, P("data")))
    for epoch in range(2):
        lr = eval_images._replicated(classifier.learning_rates(epoch), mesh)
        state, sums = train_step(eval_images._replicated((), mesh), state, crops, labels, lr)
    w, b = _reference_full_batch(
        x, y, np.asarray(init["kernel"]), np.asarray(init["bias"]),
        num_classes=4, epochs=2, lr=0.5, momentum=0.9, wd=1e-2,
    )
    params = jax.device_get(state.params)
    np.testing.assert_allclose(params["kernel"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["bias"], b, rtol=1e-4, atol=1e-6)
    assert float(jax.device_get(sums["count"])) == 16


def test_bad_arguments():
    x = np.zeros((8, 3), np.float32)
    y = np.zeros((8,), np.int32)
    with pytest.raises(ValueError, match="train_labels"):
        train_linear_probe(x, y + 5, x, y, num_classes=2)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probe(x, y, x, y, num_classes=2, epochs=0)
    with pytest.raises(ValueError, match="same width"):
        train_linear_probe(x, y, x[:, :2], y, num_classes=2)
