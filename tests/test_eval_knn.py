"""Weighted k-NN (DINO protocol) against a float64 NumPy restatement, chunking and sharding."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from swav_jax.eval.knn import knn_classify, knn_predict


def _clusters(rng, n, num_classes, dim, spread):
    centres = rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def _reference(train, train_labels, test, k, temperature, num_classes):
    """Written from the protocol: cosine similarity, the k most similar training examples
    (earliest first on ties), votes sum_i exp(s_i / T) per class, classes by decreasing vote."""
    train = train.astype(np.float64)
    test = test.astype(np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    classes, votes = [], []
    for row in test @ train.T:
        nearest = np.argsort(-row, kind="stable")[:k]
        v = np.bincount(
            train_labels[nearest], weights=np.exp(row[nearest] / temperature), minlength=num_classes
        )
        order = np.argsort(-v, kind="stable")[: min(5, num_classes)]
        classes.append(order)
        votes.append(v[order] / np.exp(row[nearest[0]] / temperature))  # as knn_predict scales
    return np.array(classes), np.array(votes)


def test_separable_clusters_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centres = 10.0 * np.eye(10, 16)
    ytr, yte = rng.integers(0, 10, 500), rng.integers(0, 10, 100)
    xtr = (centres[ytr] + rng.normal(size=(500, 16))).astype(np.float32)
    xte = (centres[yte] + rng.normal(size=(100, 16))).astype(np.float32)
    result = knn_classify(xtr, ytr, xte, yte, num_classes=10, ks=(20, 200))
    assert result == {20: {"top1": 100.0, "top5": 100.0}, 200: {"top1": 100.0, "top5": 100.0}}


def test_shuffled_labels_are_near_chance():
    # Unstructured features with random labels: chance is 10% top-1 and 50% top-5. With
    # 1000 test points the binomial standard deviations are 0.95 and 1.6 points; the
    # tolerances (4 and 7 points) are over four of them.
    rng = np.random.default_rng(1)
    xtr = rng.normal(size=(2000, 16)).astype(np.float32)
    xte = rng.normal(size=(1000, 16)).astype(np.float32)
    ytr, yte = rng.integers(0, 10, 2000), rng.integers(0, 10, 1000)
    result = knn_classify(xtr, ytr, xte, yte, num_classes=10, ks=(20,))
    assert abs(result[20]["top1"] - 10.0) < 4.0, result
    assert abs(result[20]["top5"] - 50.0) < 7.0, result


@pytest.mark.parametrize("num_classes,temperature", [(10, 0.07), (3, 0.5)])
def test_matches_float64_reference(num_classes, temperature):
    rng = np.random.default_rng(2)
    xtr, ytr = _clusters(rng, 300, num_classes, 8, spread=1.0)
    xte, yte = _clusters(rng, 60, num_classes, 8, spread=1.0)
    ks = (1, 7, 50)
    predicted = knn_predict(xtr, ytr, xte, num_classes=num_classes, ks=ks, temperature=temperature)
    accuracy = knn_classify(
        xtr, ytr, xte, yte, num_classes=num_classes, ks=ks, temperature=temperature
    )
    for k in ks:
        ref_classes, ref_votes = _reference(xtr, ytr, xte, k, temperature, num_classes)
        classes, votes = predicted[k]
        np.testing.assert_array_equal(classes, ref_classes)
        np.testing.assert_allclose(votes, ref_votes, rtol=2e-5, atol=1e-6)
        hits = (ref_classes == yte[:, None]) & (ref_votes > 0)
        assert accuracy[k]["top1"] == pytest.approx(100 * hits[:, 0].mean())
        assert accuracy[k]["top5"] == pytest.approx(100 * hits.any(axis=1).mean())
    # With k = 1 only one class gets a vote: top-5 is then top-1.
    assert accuracy[1]["top5"] == accuracy[1]["top1"]


def test_chunked_and_sharded_equal_unchunked():
    rng = np.random.default_rng(3)
    xtr, ytr = _clusters(rng, 203, 6, 12, spread=1.5)  # 203: padding on 8 devices
    xte, _ = _clusters(rng, 45, 6, 12, spread=1.5)
    whole = knn_predict(
        xtr, ytr, xte, num_classes=6, ks=(5, 20), test_chunk_size=45, train_chunk_size=1000
    )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8
    for kwargs in (
        dict(test_chunk_size=7, train_chunk_size=9),  # 9 < k = 20: the piece grows to k
        dict(test_chunk_size=16, train_chunk_size=5, mesh=mesh),
        dict(test_chunk_size=45, train_chunk_size=1000, mesh=mesh),
    ):
        chunked = knn_predict(xtr, ytr, xte, num_classes=6, ks=(5, 20), **kwargs)
        for k in (5, 20):
            np.testing.assert_array_equal(chunked[k][0], whole[k][0])
            np.testing.assert_allclose(chunked[k][1], whole[k][1], rtol=1e-5)


def test_float16_bank_and_mesh_axis_name():
    rng = np.random.default_rng(4)
    xtr, ytr = _clusters(rng, 100, 4, 8, spread=0.3)
    xte, yte = _clusters(rng, 20, 4, 8, spread=0.3)
    mesh = jax.make_mesh((8,), ("batch",))
    half = knn_classify(
        xtr.astype(np.float16), ytr, xte, yte, num_classes=4, ks=(10,), mesh=mesh, data_axis="batch"
    )
    full = knn_classify(xtr, ytr, xte, yte, num_classes=4, ks=(10,))
    double = knn_classify(xtr.astype(np.float64), ytr, xte, yte, num_classes=4, ks=(10,))
    assert half == full == double


def test_bad_arguments():
    x = np.zeros((10, 4), np.float32)
    y = np.zeros((10,), np.int64)
    with pytest.raises(ValueError, match="ks"):
        knn_predict(x, y, x, num_classes=2, ks=(11,))
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(x, y + 2, x, num_classes=2, ks=(3,))
    with pytest.raises(ValueError, match="same width"):
        knn_predict(x, y, x[:, :3], num_classes=2, ks=(3,))
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, y, x, num_classes=2, ks=(3,), temperature=0.0)
