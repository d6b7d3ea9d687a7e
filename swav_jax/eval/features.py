"""Frozen-feature extraction, sharded over the mesh's data axis (docs/ALGORITHM.md §11).

`extract_features` runs a pure, jittable `feature_fn(images [b, H, W, 3]) -> [b, F]`
(for a SwAV model: `jax.tree_util.Partial(apply, variables)` of the frozen network with
eval-mode BatchNorm, returning pooled backbone features; see `as_tree_fn`) over an
iterable of host batches and returns the features and labels as NumPy arrays, in a
deterministic order with every padding example removed.

Batches are process-local dicts of NumPy arrays:

  'image': [B, H, W, 3] uint8 or float, given to `feature_fn` as is (so `feature_fn`
           does any conversion and normalisation it needs);
  'label': [B] int;
  'mask':  [B] bool, optional: False marks a padding example (default all True).

Each batch is padded to a fixed process-local size (the first batch's size rounded up
to a multiple of this process's shards on the data axis), laid out as one global
`jax.Array` sharded over `data_axis`, run through jitted `feature_fn`, and gathered
back to host memory batch by batch, so device memory holds one batch at a time.

Multi-process (designed for; tested with one process): every process passes its own
shard of the data; the global batch is the process-local batches laid out along the data
axis (`jax.make_array_from_process_local_data`), labels and masks travel the same way, and
`process_allgather` gives every process every feature, so every process returns the same
arrays. Each process must yield the same number of batches of the same size (pad the
last ones with mask=False examples); otherwise the collectives of a batch would not match
up. With process_count() == 1 the global batch is the local one.

Host memory: N x F x itemsize on every process (ImageNet train at F = 2048: 10.5 GB in
float32, 5.2 GB in float16), twice that briefly when the per-batch pieces are joined.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.tree_util import Partial

FeatureFn = Callable[[jax.Array], jax.Array]


def as_tree_fn(feature_fn: FeatureFn) -> Partial:
    """`feature_fn` as a pytree that jitted code takes as an argument.

    A `jax.tree_util.Partial(apply, variables)` stays as it is: its `variables` become
    traced arguments of the jitted step, placed as they are (replicated over the mesh, or
    uncommitted). Any other callable is wrapped with no arguments, so whatever arrays it
    closes over are baked into the compiled program as constants: fine for small ones,
    but pass network weights through a Partial (and in multi-process runs, where closed-
    over global arrays cannot be baked in, always).
    """
    return feature_fn if isinstance(feature_fn, Partial) else Partial(feature_fn)


def local_shard_count(mesh: Mesh, data_axis: str = "data") -> int:
    """How many distinct slices of the data axis this process's devices hold.

    A process-local batch must be a multiple of this to be laid out over the mesh.
    """
    if data_axis not in mesh.axis_names:
        raise ValueError(f"data_axis {data_axis!r} is not an axis of the mesh {mesh.axis_names}")
    n = mesh.shape[data_axis]
    index_map = NamedSharding(mesh, P(data_axis)).addressable_devices_indices_map((n,))
    return len({idx[0].indices(n) for idx in index_map.values()})


def padded_batch_size(batch_size: int, mesh: Mesh, data_axis: str = "data") -> int:
    """`batch_size` rounded up to a multiple of `local_shard_count(mesh, data_axis)`."""
    shards = local_shard_count(mesh, data_axis)
    return -(-batch_size // shards) * shards


def shard_batch(
    batch: Mapping[str, np.ndarray], *, mesh: Mesh, data_axis: str = "data", size: int
) -> dict[str, jax.Array]:
    """Pads a process-local batch to `size` rows and lays it out over the mesh.

    Args:
      batch: {'image': [B, ...], 'label': [B] int, 'mask'?: [B] bool} NumPy arrays.
      mesh: the device mesh; rows are sharded over `data_axis`, replicated over others.
      size: process-local size after padding, a multiple of `local_shard_count`.

    Returns:
      {'image', 'label' int32, 'mask' bool}: global jax.Arrays whose first dimension is
      `size` times the number of processes feeding the data axis. Padding rows are
      zeros with mask False.
    """
    for key in ("image", "label"):
        if key not in batch:
            raise ValueError(f"batch is missing the key {key!r} (has {sorted(batch)})")
    image = np.asarray(batch["image"])
    label = np.asarray(batch["label"])
    b = image.shape[0]
    if image.ndim != 4:
        raise ValueError(f"batch['image'] must have shape [B, H, W, C], got {image.shape}")
    if label.shape != (b,):
        raise ValueError(f"batch['label'] must have shape [{b}], got {label.shape}")
    mask = np.asarray(batch.get("mask", np.ones((b,), bool)), dtype=bool)
    if mask.shape != (b,):
        raise ValueError(f"batch['mask'] must have shape [{b}], got {mask.shape}")
    if b > size:
        raise ValueError(
            f"a batch of {b} examples is larger than the first batch's padded size {size}; "
            "batches must not grow"
        )
    pad = size - b

    def padded(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x

    sharding = NamedSharding(mesh, P(data_axis))
    local = {"image": padded(image), "label": padded(label.astype(np.int32)), "mask": padded(mask)}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


@functools.partial(jax.jit, static_argnames="dtype")
def apply_feature_fn(feature_fn: Partial, images: jax.Array, dtype: np.dtype) -> jax.Array:
    """The jitted feature step: `feature_fn(images)` cast to `dtype` on device.

    Module level, so that repeated extractions with the same function (an online monitor
    every few epochs) reuse the compiled program."""
    return feature_fn(images).astype(dtype)


def extract_features(
    feature_fn: FeatureFn,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    mesh: Mesh,
    data_axis: str = "data",
    dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every non-padding example, gathered to host memory.

    Args:
      feature_fn: pure jittable `images [b, H, W, 3] -> features [b, F]`, applied per
        example (no statistics across the batch: eval-mode BatchNorm); preferably a
        `jax.tree_util.Partial(apply, variables)`, see `as_tree_fn`.
      batches: iterable of process-local batches (see the module docstring).
      mesh: device mesh; the batch is sharded over `data_axis`.
      dtype: host storage dtype, np.float32 or np.float16 (half the host memory; the
        cast happens on device, before the transfer).

    Returns:
      features: [N, F] `dtype`, N = number of mask-True examples over all processes;
        order: batch by batch, and within a batch the global batch order (process-local
        batches concatenated in mesh device order; input order for one process).
      labels: [N] int32, aligned with `features`.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    if data_axis not in mesh.axis_names:
        raise ValueError(f"data_axis {data_axis!r} is not an axis of the mesh {mesh.axis_names}")
    feature_fn = as_tree_fn(feature_fn)
    size = None
    features, labels = [], []
    for batch in batches:
        if size is None:
            size = padded_batch_size(np.shape(batch["image"])[0], mesh, data_axis)
        placed = shard_batch(batch, mesh=mesh, data_axis=data_axis, size=size)
        out = apply_feature_fn(feature_fn, placed["image"], dtype=dtype)
        if out.ndim != 2:
            raise ValueError(f"feature_fn must return [b, F] features, got shape {out.shape}")
        host = multihost_utils.process_allgather(
            {"features": out, "label": placed["label"], "mask": placed["mask"]}, tiled=True
        )
        keep = host["mask"]
        features.append(host["features"][keep])
        labels.append(host["label"][keep])
    if size is None:
        raise ValueError("batches is empty")
    return np.concatenate(features), np.concatenate(labels)
