"""Weighted k-nearest-neighbour classification of frozen features (docs/ALGORITHM.md §11, DINO protocol).

For every test feature, its k nearest training features by cosine similarity s_i (both
L2-normalised) vote for their labels with weight exp(s_i / T); the classes with the most
votes are the prediction (top-1) and the top-5 list. Defaults: k = 20 and 200, T = 0.07.

Computation, all on device:
  - the training bank is laid out over the mesh's data axis (one device by default),
    in its own dtype (float16 halves device memory; each piece is upcast to float32);
  - test features go through in chunks of `test_chunk_size`; each device scans its shard
    of the bank in pieces of `train_chunk_size`, keeping a running top-k with
    `jax.lax.top_k`; the per-device top-k lists are all-gathered and merged.

Memory. Device: the bank, N x F x itemsize split over the devices of the data axis
(ImageNet train, F = 2048: 10.5 GB float32, 5.2 GB float16, on one device), plus
test_chunk_size x train_chunk_size float32 similarities (128 MiB at the defaults).
Host: the inputs and [M, 5] predictions per k; no similarity matrix ever reaches the host.

Multi-process: every process passes the same full arrays (as `extract_features` returns
them); each device takes its shard of the bank, and every process gets the same result.

Ties (equal similarities) go to the earlier training example, in chunked and unchunked
runs alike. Top-5 counts a hit only for a class that received a vote, so with fewer than
five voting classes, classes without votes never count (DINO's reference leaves that case
to the sort order of zeros).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _l2_normalize(x: jax.Array) -> jax.Array:
    # As torch.nn.functional.normalize: x / max(||x||, 1e-12); a zero vector stays zero.
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _check_features(name: str, x: np.ndarray) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, F], got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def _check_labels(name: str, labels: np.ndarray, n: int, num_classes: int) -> None:
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), "
            f"got range [{labels.min()}, {labels.max()}]"
        )


def _local_top_k(bank, bank_labels, queries, *, kmax, train_chunk, num_train, data_axis):
    """Per device: top-`kmax` (similarity, label) over this device's bank shard, merged
    over the data axis. bank: [n_local, F]; queries: [c, F] normalised float32."""
    n_local, f = bank.shape
    c = queries.shape[0]
    offset = lax.axis_index(data_axis) * n_local

    def body(carry, xs):
        best_s, best_l = carry
        i, piece, piece_labels = xs
        piece = _l2_normalize(piece.astype(jnp.float32))
        s = jnp.matmul(queries, piece.T, precision=lax.Precision.HIGHEST)  # [c, train_chunk]
        row = offset + i * train_chunk + jnp.arange(train_chunk)
        s = jnp.where((row < num_train)[None], s, -jnp.inf)  # padding rows never win
        s, idx = lax.top_k(s, kmax)
        # Earlier rows first, so that top_k's lower-index tie-break keeps earlier examples.
        both_s = jnp.concatenate([best_s, s], axis=1)
        both_l = jnp.concatenate([best_l, piece_labels[idx]], axis=1)
        best_s, pick = lax.top_k(both_s, kmax)
        return (best_s, jnp.take_along_axis(both_l, pick, axis=1)), None

    n_pieces = n_local // train_chunk
    init = (jnp.full((c, kmax), -jnp.inf, jnp.float32), jnp.zeros((c, kmax), jnp.int32))
    init = lax.pcast(init, (data_axis,), to="varying")  # the carry differs per device
    xs = (
        jnp.arange(n_pieces),
        bank.reshape(n_pieces, train_chunk, f),
        bank_labels.reshape(n_pieces, train_chunk),
    )
    (best_s, best_l), _ = lax.scan(body, init, xs)
    # Devices in data-axis order hold the bank in order: the gathered lists stay in order.
    all_s = lax.all_gather(best_s, data_axis, axis=1, tiled=True, to="invarying")
    all_l = lax.all_gather(best_l, data_axis, axis=1, tiled=True, to="invarying")
    best_s, pick = lax.top_k(all_s, kmax)
    return best_s, jnp.take_along_axis(all_l, pick, axis=1)


def _weighted_votes(sims, labels, *, k, temperature, num_classes, top):
    """Top-`top` classes by sum over the k nearest of exp(s / T), and their votes.

    sims, labels: [c, >=k], sorted by decreasing similarity. Votes are scaled by
    exp(-s_1 / T) (s_1: nearest similarity) against overflow; the ranking is unchanged.
    """
    s, lab = sims[:, :k], labels[:, :k]
    weights = jnp.exp((s - s[:, :1]) / temperature)
    rows = jnp.arange(s.shape[0])[:, None]
    votes = jnp.zeros((s.shape[0], num_classes), jnp.float32).at[rows, lab].add(weights)
    top_votes, top_classes = lax.top_k(votes, top)
    return top_classes, top_votes


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    test_chunk_size: int = 1024,
    train_chunk_size: int = 32768,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Weighted k-NN predictions for every test feature, for each k in `ks`.

    Args:
      train_features: [N, F] float host array (normalised here); kept on device as
        float16 if it is float16, else as float32.
      train_labels: [N] int in [0, num_classes).
      test_features: [M, F] float host array (normalised here).
      num_classes: number of classes C.
      ks: neighbour counts, each in [1, N].
      temperature: T > 0 of the vote weights exp(similarity / T).
      test_chunk_size: test features per device call.
      train_chunk_size: training features per scan step on each device.
      mesh: the bank is sharded over its `data_axis`; None: the first local device.

    Returns:
      {k: (classes [M, min(5, C)] int32, votes [M, min(5, C)] float32)}: classes by
      decreasing vote, votes scaled so that the nearest neighbour weighs 1.
    """
    train_features = np.asarray(train_features)
    test_features = np.asarray(test_features)
    train_labels = np.asarray(train_labels)
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features and test_features must have the same width, got "
            f"{train_features.shape[1]} and {test_features.shape[1]}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    num_train, dim = train_features.shape
    _check_labels("train_labels", train_labels, num_train, num_classes)
    ks = tuple(int(k) for k in ks)
    if not ks or any(not 1 <= k <= num_train for k in ks):
        raise ValueError(f"ks must be non-empty, each in [1, {num_train}] (train size), got {ks}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if test_chunk_size < 1 or train_chunk_size < 1:
        raise ValueError(
            f"test_chunk_size and train_chunk_size must be positive, got "
            f"{test_chunk_size} and {train_chunk_size}"
        )
    if mesh is None:
        mesh = Mesh(np.array(jax.local_devices()[:1]), (data_axis,))
    if data_axis not in mesh.axis_names:
        raise ValueError(f"data_axis {data_axis!r} is not an axis of the mesh {mesh.axis_names}")

    kmax = max(ks)
    top = min(5, num_classes)
    # Bank layout: each of the D devices on the data axis holds n_local rows, a multiple
    # of train_chunk (>= kmax for top_k); rows past num_train are padding.
    devices = mesh.shape[data_axis]
    per_device = -(-num_train // devices)
    train_chunk = max(kmax, min(train_chunk_size, per_device))
    n_local = -(-per_device // train_chunk) * train_chunk
    padded = devices * n_local

    bank_sharding = NamedSharding(mesh, P(data_axis))
    replicated = NamedSharding(mesh, P())

    # float16 banks stay float16 on device; anything else is stored as float32.
    bank_dtype = np.float16 if train_features.dtype == np.float16 else np.float32

    def bank_piece(index):
        start, stop, _ = index[0].indices(padded)
        piece = train_features[start : min(stop, num_train), index[1]].astype(bank_dtype)
        return np.concatenate(
            [piece, np.zeros((stop - start - len(piece),) + piece.shape[1:], bank_dtype)]
        )

    bank = jax.make_array_from_callback((padded, dim), bank_sharding, bank_piece)
    padded_labels = np.zeros((padded,), np.int32)
    padded_labels[:num_train] = train_labels
    bank_labels = jax.make_array_from_callback((padded,), bank_sharding, lambda i: padded_labels[i])

    neighbours = jax.shard_map(
        lambda b, l, q: _local_top_k(
            b, l, q, kmax=kmax, train_chunk=train_chunk, num_train=num_train, data_axis=data_axis
        ),
        mesh=mesh,
        in_specs=(P(data_axis), P(data_axis), P()),
        out_specs=(P(), P()),
    )

    @jax.jit
    def predict_chunk(bank, bank_labels, queries):
        sims, labels = neighbours(bank, bank_labels, _l2_normalize(queries.astype(jnp.float32)))
        return {
            k: _weighted_votes(
                sims, labels, k=k, temperature=temperature, num_classes=num_classes, top=top
            )
            for k in ks
        }

    num_test = test_features.shape[0]
    chunk = min(test_chunk_size, max(num_test, 1))
    outputs = []
    for start in range(0, num_test, chunk):
        host = np.zeros((chunk, dim), np.float32)  # fixed shape: one compilation
        piece = test_features[start : start + chunk]
        host[: len(piece)] = piece
        queries = jax.make_array_from_callback(host.shape, replicated, lambda i: host[i])
        outputs.append(predict_chunk(bank, bank_labels, queries))
    result = {}
    for k in ks:
        parts = [
            jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), out[k]) for out in outputs
        ]
        classes = np.concatenate([p[0] for p in parts] or [np.zeros((0, top), np.int32)])
        votes = np.concatenate([p[1] for p in parts] or [np.zeros((0, top), np.float32)])
        result[k] = (classes[:num_test], votes[:num_test])
    return result


def knn_classify(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    test_chunk_size: int = 1024,
    train_chunk_size: int = 32768,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy (DINO protocol); arguments as `knn_predict`.

    Args:
      test_labels: [M] int in [0, num_classes), M >= 1.

    Returns:
      {k: {'top1': percent, 'top5': percent}}, percentages in [0, 100]. Top-5 counts
      the min(5, C) classes with most votes, among those that received a vote.
    """
    test_features = np.asarray(test_features)
    test_labels = np.asarray(test_labels)
    _check_features("test_features", test_features)
    if test_features.shape[0] == 0:
        raise ValueError("test_features is empty")
    _check_labels("test_labels", test_labels, test_features.shape[0], num_classes)
    predictions = knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        ks=ks,
        temperature=temperature,
        test_chunk_size=test_chunk_size,
        train_chunk_size=train_chunk_size,
        mesh=mesh,
        data_axis=data_axis,
    )
    result = {}
    for k, (classes, votes) in predictions.items():
        hits = (classes == test_labels[:, None]) & (votes > 0)
        result[k] = {
            "top1": float(100.0 * hits[:, 0].mean()),
            "top5": float(100.0 * hits.any(axis=1).mean()),
        }
    return result
