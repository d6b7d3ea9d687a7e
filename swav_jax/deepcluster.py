"""DeepCluster-v2 (SwAV paper, appendix; the release's main_deepclusterv2.py): memory bank,
per-epoch clustering into labels, and the loss.

Pure jax.numpy; imports only `kmeans` from the package.

  init_bank           an empty bank: embeddings and the dataset index of each row
  update_bank         write a step's assigning-crop embeddings at its slot of the bank
  cluster_bank        k-means per head (head h on bank h % A) -> centroids and the
                      label of every dataset sample
  gather_assignments  local labels -> [H, N] labels by dataset index, over all devices
  deepcluster_loss    cross-entropy of scores / T against the labels, every crop

The bank. Each device keeps the embeddings of its own local batches: [A, n, D] for the
A assigning crops, n = steps_per_epoch * B rows (B = local batch), and the dataset
index of each row. Step s writes its batch at rows [(s mod S) * B, (s mod S + 1) * B),
S = steps_per_epoch, so the bank is a ring over the last S steps and, at the start of
every epoch (s a multiple of S), it holds exactly the previous epoch's steps: the
release's bank, which it rewrites from row 0 each epoch. The training stream is one
shuffled sequence in which a batch may straddle two passes over the data, so a sample
may sit in the bank twice or not at all; a sample not there has no label this epoch
(-100) and is ignored by the loss, as the release ignores the samples its
drop_last loader left out.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from swav_jax.kmeans import AxisName, spherical_kmeans

UNASSIGNED = -100  # label of a sample no device holds; torch's ignore_index default
EMPTY = -1  # dataset index of a bank row not written yet


def _check_crops(crops_for_assign: Sequence[int], num_views: int) -> tuple[int, ...]:
    crops = tuple(int(c) for c in crops_for_assign)
    if not crops or len(set(crops)) != len(crops) or not all(0 <= c < num_views for c in crops):
        raise ValueError(
            f"crops_for_assign must name distinct crops in [0, {num_views}), got {tuple(crops_for_assign)}"
        )
    return crops


def _check_index(name: str, index: jax.Array, length: int) -> None:
    if index.shape != (length,) or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array of shape ({length},), got {index.dtype} {index.shape}"
        )


def init_bank(num_banks: int, size: int, dim: int) -> tuple[jax.Array, jax.Array]:
    """An empty bank: ([num_banks, size, dim] float32 zeros, [size] int32 all EMPTY).

    `size` is this device's row count, or the global one when the arrays are built
    for sharding over the data axis (dimension 1 of the bank, 0 of the index)."""
    return jnp.zeros((num_banks, size, dim), jnp.float32), jnp.full((size,), EMPTY, jnp.int32)


def update_bank(
    bank: jax.Array,
    bank_index: jax.Array,
    embeddings: jax.Array,
    index: jax.Array,
    step: jax.Array | int,
    *,
    crops_for_assign: Sequence[int],
) -> tuple[jax.Array, jax.Array]:
    """Writes one step's local batch into its slot of the bank (module docstring).

    Args:
      bank: [A, n, D] float32, this device's bank; A = len(crops_for_assign) and n a
        multiple of B (n = steps_per_epoch * B).
      bank_index: [n] int32 dataset index of each bank row (EMPTY if not written yet).
      embeddings: [V, B, D] float, this device's embeddings of the step, crop-major;
        treated as constants.
      index: [B] int dataset index of each sample of the local batch.
      step: [] int, the global step that produced `embeddings` (0-based).
      crops_for_assign: the views stored, bank a holds view crops_for_assign[a].

    Returns:
      (bank, bank_index) with rows [(step mod S) * B, (step mod S + 1) * B) replaced,
      S = n // B.
    """
    if bank.ndim != 3 or embeddings.ndim != 3:
        raise ValueError(
            f"bank must have shape [A, n, D] and embeddings [V, B, D], got {bank.shape} and "
            f"{embeddings.shape}"
        )
    crops = _check_crops(crops_for_assign, embeddings.shape[0])
    num_banks, size, dim = bank.shape
    batch = embeddings.shape[1]
    if num_banks != len(crops) or dim != embeddings.shape[2] or batch < 1 or size % batch:
        raise ValueError(
            f"bank of shape {bank.shape} does not fit embeddings {embeddings.shape} with "
            f"crops_for_assign={crops}: it needs [{len(crops)}, steps_per_epoch * {batch}, "
            f"{embeddings.shape[2]}]"
        )
    _check_index("bank_index", bank_index, size)
    _check_index("index", index, batch)
    start = (jnp.asarray(step, jnp.int32) % (size // batch)) * batch
    newest = jax.lax.stop_gradient(embeddings[jnp.array(crops)]).astype(bank.dtype)
    bank = jax.lax.dynamic_update_slice(bank, newest, (0, start, 0))
    bank_index = jax.lax.dynamic_update_slice(bank_index, index.astype(bank_index.dtype), (start,))
    return bank, bank_index


def gather_assignments(
    labels: jax.Array, bank_index: jax.Array, *, num_samples: int, axis_name: AxisName = None
) -> jax.Array:
    """Every sample's label per head, from the labels of each device's bank rows.

    One collective: a `pmax` of [H, N] arrays that start at UNASSIGNED. A sample held in
    several rows (of one device or of several) gets the largest of their labels, the same
    on any device layout (the release's scatter leaves the choice to torch).

    Args:
      labels: [H, n] int, this device's label of each bank row per head; rows with a
        negative label (masked by the k-means) are skipped.
      bank_index: [n] int dataset index of each row; rows outside [0, num_samples)
        (EMPTY) are skipped.
      num_samples: N, the data set size.
      axis_name: the data axis name(s) the bank is sharded over; None for one device.

    Returns:
      [H, N] int32, the same on every device: label of each dataset sample per head,
      UNASSIGNED (-100) where no row holds the sample.
    """
    if labels.ndim != 2 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be an integer array of shape [H, n], got {labels.dtype} {labels.shape}"
        )
    _check_index("bank_index", bank_index, labels.shape[1])
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    keep = (labels >= 0) & (bank_index >= 0) & (bank_index < num_samples)
    # Skipped rows aim past the end, where mode="drop" discards them.
    target = jnp.where(keep, bank_index.astype(jnp.int32), num_samples)
    heads = jnp.arange(labels.shape[0])[:, None]
    out = jnp.full((labels.shape[0], num_samples), UNASSIGNED, jnp.int32)
    out = out.at[heads, target].max(labels.astype(jnp.int32), mode="drop")
    return out if axis_name is None else jax.lax.pmax(out, axis_name)


def cluster_bank(
    bank: jax.Array,
    bank_index: jax.Array,
    key: jax.Array,
    *,
    num_clusters: Sequence[int],
    num_samples: int,
    num_iters: int = 10,
    axis_name: AxisName = None,
    chunk_rows: int | None = None,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The release's `cluster_memory`: k-means per head, then every sample's label.

    Head h clusters bank h % A with key `jax.random.split(key, H)[h]` (the heads
    alternate banks, as the release does); rows whose index is EMPTY are masked out.

    Args:
      bank: [A, n, D] float32 this device's bank (unit rows).
      bank_index: [n] int dataset index of each row.
      key: PRNG key, the same on every device.
      num_clusters: K of each head, H = len(num_clusters).
      num_samples: N, the data set size.
      num_iters: k-means updates per head (release: 10).
      axis_name, chunk_rows: as `spherical_kmeans`.

    Returns:
      centroids: tuple over heads of [K_h, D] float32 unit rows (the heads' new
        prototypes), the same on every device; NaN if the index-0 device holds fewer
        than K_h written rows.
      assignments: [H, N] int32 label of every sample per head, UNASSIGNED where no
        device holds it (`gather_assignments`).
    """
    if bank.ndim != 3 or bank.shape[0] < 1:
        raise ValueError(f"bank must have shape [A, n, D] with A >= 1, got {bank.shape}")
    _check_index("bank_index", bank_index, bank.shape[1])
    num_clusters = tuple(num_clusters)
    if not num_clusters:
        raise ValueError("num_clusters must name at least one head")
    valid = bank_index >= 0
    keys = jax.random.split(key, len(num_clusters))
    centroids, labels = [], []
    for h, k in enumerate(num_clusters):
        head_centroids, head_labels = spherical_kmeans(
            bank[h % bank.shape[0]], keys[h], num_clusters=k, num_iters=num_iters,
            mask=valid, axis_name=axis_name, chunk_rows=chunk_rows,
        )
        centroids.append(head_centroids)
        labels.append(head_labels)
    assignments = gather_assignments(
        jnp.stack(labels), bank_index, num_samples=num_samples, axis_name=axis_name
    )
    return tuple(centroids), assignments


def deepcluster_loss(
    scores: Sequence[jax.Array], labels: jax.Array, *, temperature: float = 0.1
) -> jax.Array:
    """Cross-entropy of every crop's scores / T against its sample's label, mean over heads.

    Per head, the mean over the V x B (crop, sample) pairs whose label is not UNASSIGNED,
    as torch's CrossEntropyLoss(ignore_index=-100) on the V crops stacked; a head with
    no labelled pair contributes 0 (torch: NaN). Labels other than UNASSIGNED outside
    [0, K_h) make the loss NaN.

    Args:
      scores: one [V, B, K_h] float array per head (prototype scores, crop-major).
      labels: [H, B] int, each local sample's label per head (all V crops share it).
      temperature: T > 0 (release: 0.1).

    Returns:
      float32 scalar, the local-batch loss (the release's per-process loss; its
      gradients are averaged over devices, as DDP does).
    """
    scores = tuple(scores)
    if not scores or any(s.ndim != 3 for s in scores):
        raise ValueError(
            f"scores must be a non-empty sequence of [V, B, K] arrays, got shapes {[s.shape for s in scores]}"
        )
    if any(s.shape[:2] != scores[0].shape[:2] or not jnp.issubdtype(s.dtype, jnp.floating) for s in scores):
        raise ValueError(
            f"every head's scores must be floating point with the same [V, B], got "
            f"{[(str(s.dtype), s.shape) for s in scores]}"
        )
    batch = scores[0].shape[1]
    if labels.shape != (len(scores), batch) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be an integer array of shape ({len(scores)}, {batch}) [H, B], got "
            f"{labels.dtype} {labels.shape}"
        )
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    head_losses = []
    for s, target in zip(scores, labels):
        logits = s.astype(jnp.float32) / temperature  # [V, B, K]
        labelled = target != UNASSIGNED  # [B]
        picked = jnp.take_along_axis(
            logits, jnp.where(labelled, target, 0)[None, :, None], axis=-1, mode="fill", fill_value=jnp.nan
        )[..., 0]
        ce = jax.nn.logsumexp(logits, axis=-1) - picked  # [V, B]
        count = s.shape[0] * jnp.sum(labelled)
        head_losses.append(jnp.sum(jnp.where(labelled, ce, 0.0)) / jnp.maximum(count, 1))
    return sum(head_losses) / len(head_losses)
