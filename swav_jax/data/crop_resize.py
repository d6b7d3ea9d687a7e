"""Device side of RandomResizedCrop: cut boxes out of canvases and resize them.

The arithmetic of torchvision's `resized_crop` on PIL images (crop, then PIL
bilinear resize), in float32 instead of PIL's fixed point: output pixel i of a
box [start, start + length) resized to `size` sits at
`center = start + (i + 0.5) * length / size`, and input pixel j (inside the box only)
weighs `max(0, 1 - |j + 0.5 - center| / max(length / size, 1))`, normalised; the
kernel widens when shrinking (antialiasing). Rows and columns are separable, so each
crop is two small matrix products with its weight matrices, which is what
accelerators are fast at; a horizontal flip reverses the column weights.
Results match PIL to +-1 (PIL rounds its intermediate row pass to uint8), and a
pixel may round differently (+-1) on another device layout (float summation order).

Cost: about 2 GFLOP per image for 2 x 224 + 6 x 96 crops from a 512 canvas (dense
weights over the whole canvas), a few percent of a ResNet-50 multi-crop step; in
exchange the host only decodes (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def resize_weights(start: jax.Array, length: jax.Array, size: int, canvas: int) -> jax.Array:
    """PIL bilinear weights: start, length [...] -> float32 [..., size, canvas]."""
    start = start.astype(jnp.float32)[..., None, None]
    length = length.astype(jnp.float32)[..., None, None]
    scale = length / size
    center = start + (jnp.arange(size, dtype=jnp.float32)[:, None] + 0.5) * scale  # [..., size, 1]
    pos = jnp.arange(canvas, dtype=jnp.float32) + 0.5  # pixel centres, [canvas]
    w = jnp.maximum(0.0, 1.0 - jnp.abs(pos - center) / jnp.maximum(scale, 1.0))
    w = jnp.where((pos > start) & (pos < start + length), w, 0.0)
    total = w.sum(-1, keepdims=True)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def crop_resize(canvas: jax.Array, boxes: jax.Array, flip: jax.Array, size: int) -> jax.Array:
    """Crops of a batch of canvases, crop-major.

    Args:
      canvas: uint8 [B, C, C, 3].
      boxes: float32 [B, n, 4], (top, left, height, width) in canvas pixels.
      flip: bool [B, n], flip the crop horizontally.
      size: output side S.
    Returns:
      uint8 [n, B, S, S, 3].
    """
    c = canvas.shape[1]
    wy = resize_weights(boxes[..., 0], boxes[..., 2], size, c)  # [B, n, S, C]
    wx = resize_weights(boxes[..., 1], boxes[..., 3], size, c)
    wx = jnp.where(flip[..., None, None], wx[..., ::-1, :], wx)
    rows = jnp.einsum("bniy,byxc->bnixc", wy, canvas.astype(jnp.float32))
    out = jnp.einsum("bnixc,bnjx->nbijc", rows, wx)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def crop_groups(
    canvas: jax.Array, boxes: jax.Array, flip: jax.Array, size_crops: Sequence[int], num_crops: Sequence[int]
) -> tuple[jax.Array, ...]:
    """All crop groups: boxes/flip [B, V] split by `num_crops` -> uint8 [n_g, B, S_g, S_g, 3] each."""
    out, start = [], 0
    for size, n in zip(size_crops, num_crops):
        out.append(crop_resize(canvas, boxes[:, start : start + n], flip[:, start : start + n], size))
        start += n
    return tuple(out)
