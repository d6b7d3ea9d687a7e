"""Device side of multi-crop augmentation: colour distortion, blur, normalisation.

Pure, jittable JAX functions of an rng and a crop batch; they run per device inside
the jitted train step. docs/ALGORITHM.md §2, in the release's order:

  RandomApply(ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s), p=0.8)  random op order per crop
  RandomGrayscale(p=0.2)
  GaussianBlur(p=0.5, sigma ~ U(0.1, 2), kernel blur_kernel_size, reflect padding)
  Normalize(mean, std)

The colour operations follow torchvision's float-tensor definitions
(`torchvision.transforms.functional` on [0, 1] images, each op clamped to [0, 1];
grey = 0.2989 R + 0.587 G + 0.114 B). Every crop draws its own parameters.

Speed: everything is vectorised over the crops. The random order of the four jitter
ops costs one hue conversion per crop, not four: brightness, contrast and saturation
are all blends `clip(f * x + (1 - f) * ref)` (ref = 0, the mean grey level, or the
grey image), so the three op slots before the hue slot and the three after it are
evaluated as blends whose factor is 1 (the identity, exactly) when the slot is not
active for that crop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

GREY_WEIGHTS = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op indices


class AugmentParams(NamedTuple):
    """Per-crop random parameters of `augment_crops` (N crops).

    jitter:  bool [N]       colour jitter applied
    factors: float32 [N, 4] brightness, contrast, saturation, hue factors
    order:   int32 [N, 4]   permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE)
    grey:    bool [N]       converted to grayscale
    blur:    bool [N]       blurred
    sigma:   float32 [N]    blur sigma
    """

    jitter: jax.Array
    factors: jax.Array
    order: jax.Array
    grey: jax.Array
    blur: jax.Array
    sigma: jax.Array


def sample_params(rng: jax.Array, num: int, augment_config) -> AugmentParams:
    """Independent augmentation parameters for `num` crops (torchvision's ranges)."""
    cfg = augment_config
    s = cfg.color_jitter_strength
    keys = jax.random.split(rng, 7)
    bcs = jax.random.uniform(keys[0], (num, 3), minval=max(0.0, 1.0 - 0.8 * s), maxval=1.0 + 0.8 * s)
    hue = jax.random.uniform(keys[1], (num, 1), minval=-0.2 * s, maxval=0.2 * s)
    order = jnp.argsort(jax.random.uniform(keys[2], (num, 4)), axis=1).astype(jnp.int32)
    lo, hi = cfg.blur_sigma
    return AugmentParams(
        jitter=jax.random.bernoulli(keys[3], cfg.color_jitter_prob, (num,)),
        factors=jnp.concatenate([bcs, hue], axis=1),
        order=order,
        grey=jax.random.bernoulli(keys[4], cfg.grayscale_prob, (num,)),
        blur=jax.random.bernoulli(keys[5], cfg.blur_prob, (num,)),
        sigma=jax.random.uniform(keys[6], (num,), minval=lo, maxval=hi),
    )


def grey_level(x: jax.Array) -> jax.Array:
    """[..., 3] -> [..., 1] luma (torchvision rgb_to_grayscale)."""
    w = jnp.asarray(GREY_WEIGHTS, x.dtype)
    return (x * w).sum(-1, keepdims=True)


def _blend_slot(x: jax.Array, op: jax.Array, factors: jax.Array, active: jax.Array) -> jax.Array:
    """One jitter slot holding brightness, contrast or saturation (hue slots: inactive).

    x: [N, H, W, 3] in [0, 1]; op: int [N]; factors: [N, 4]; active: bool [N].
    """
    grey = grey_level(x)
    mean = grey.mean(axis=(1, 2, 3), keepdims=True)
    op = op[:, None, None, None]
    ref = jnp.where(op == CONTRAST, mean, jnp.where(op == SATURATION, grey, 0.0))
    f = jnp.take_along_axis(factors, jnp.minimum(op[:, 0, 0], SATURATION), axis=1)[:, :, None, None]
    f = jnp.where(active[:, None, None, None], f, 1.0)
    return jnp.clip(f * x + (1.0 - f) * ref, 0.0, 1.0)


def adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotate hue by `shift` [N] (fraction of a turn), torchvision's HSV round trip."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    minc = jnp.min(x, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    h = jnp.where(
        maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc)
    )
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    h = jnp.mod(h + shift[:, None, None], 1.0)
    v = maxc
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    rgb = (
        jnp.select([i == k for k in range(6)], [v, q, p, p, t, v]),
        jnp.select([i == k for k in range(6)], [t, v, v, q, p, p]),
        jnp.select([i == k for k in range(6)], [p, p, t, v, v, q]),
    )
    return jnp.stack(rgb, axis=-1)


def color_jitter(x: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
    """torchvision ColorJitter with given parameters.

    x: float [N, H, W, 3] in [0, 1]; factors: [N, 4] (brightness, contrast,
    saturation, hue); order: int [N, 4], the ops applied first to last.
    """
    hue_slot = jnp.argmax(order == HUE, axis=1)
    for slot in range(3):  # slots that may come before the hue
        x = _blend_slot(x, order[:, slot], factors, slot < hue_slot)
    x = adjust_hue(x, factors[:, HUE])
    for slot in range(1, 4):  # slots that may come after it
        x = _blend_slot(x, order[:, slot], factors, slot > hue_slot)
    return x


def gaussian_blur(x: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur with reflect padding (torchvision GaussianBlur).

    x: float [N, H, W, C]; sigma: [N]. The kernel is clamped to the largest odd size
    not above min(H, W), so small crops keep a valid reflect padding.
    """
    _, h, w, _ = x.shape
    k = min(kernel_size, min(h, w) if min(h, w) % 2 else min(h, w) - 1)
    half = k // 2
    t = jnp.arange(k, dtype=x.dtype) - half
    kern = jnp.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    kern = kern / kern.sum(axis=1, keepdims=True)  # [N, k]
    if half == 0:
        return x
    xp = jnp.pad(x, ((0, 0), (half, half), (0, 0), (0, 0)), mode="reflect")
    x = sum(kern[:, j, None, None, None] * xp[:, j : j + h] for j in range(k))
    xp = jnp.pad(x, ((0, 0), (0, 0), (half, half), (0, 0)), mode="reflect")
    return sum(kern[:, j, None, None, None] * xp[:, :, j : j + w] for j in range(k))


def apply_params(crops: jax.Array, params: AugmentParams, augment_config, dtype=jnp.float32) -> jax.Array:
    """Deterministic part of `augment_crops`: uint8 [N, H, W, 3] -> normalised dtype."""
    cfg = augment_config
    x = crops.astype(jnp.float32) / 255.0
    sel = lambda m, a, b: jnp.where(m[:, None, None, None], a, b)  # noqa: E731
    x = sel(params.jitter, color_jitter(x, params.factors, params.order), x)
    x = sel(params.grey, jnp.broadcast_to(grey_level(x), x.shape), x)
    x = sel(params.blur, gaussian_blur(x, params.sigma, cfg.blur_kernel_size), x)
    mean = jnp.asarray(cfg.mean, jnp.float32)
    std = jnp.asarray(cfg.std, jnp.float32)
    return ((x - mean) / std).astype(dtype)


def augment_crops(rng: jax.Array, crops: jax.Array, augment_config, dtype=jnp.float32) -> jax.Array:
    """Random colour jitter, grayscale, blur and normalisation, independently per crop.

    Args:
      rng: PRNG key (fold in the device index and resolution group before calling).
      crops: uint8 [N, H, W, 3].
      augment_config: `config.augment`.
      dtype: output dtype (compute is float32).
    Returns:
      dtype [N, H, W, 3], normalised with augment_config.mean / std.
    """
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != jnp.uint8:
        raise ValueError(f"crops must be uint8 [N, H, W, 3], got {crops.dtype} {crops.shape}")
    params = sample_params(rng, crops.shape[0], augment_config)
    return apply_params(crops, params, augment_config, dtype)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 [..., 3] -> `dtype` (x / 255 - mean) / std: the evaluation-side input, normalised
    as `apply_params` normalises the augmented training crops."""
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def denormalize(images: np.ndarray, augment_config) -> np.ndarray:
    """Inverse of the normalisation, to uint8 for viewing: [..., 3] -> uint8 [..., 3]."""
    x = np.asarray(images, np.float32) * np.asarray(augment_config.std) + np.asarray(augment_config.mean)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _crop_keys(step_key: jax.Array, views: jax.Array, samples: jax.Array) -> jax.Array:
    """[len(views), len(samples)] keys, one per (crop index, global sample index)."""
    per_view = lambda v: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(step_key, v), i))(samples)
    return jax.vmap(per_view)(views)


def augment_views(
    rng: jax.Array,
    step: jax.Array,
    crops: tuple[jax.Array, ...],
    augment_config: ml_collections.ConfigDict,
    *,
    dtype,
    data_axis: str | tuple[str, ...],
) -> list[jax.Array]:
    """Device-side augmentation of this device's crops, inside the step's `shard_map`.

    One key per crop of each sample, folded from (rng, step, crop index, the sample's
    index in the global batch): the augmentation does not depend on how the batch is
    split over devices.

    Args:
      rng: [2] uint32 raw key data (the state's `rng`).
      step: [] int32, the state's step.
      crops: one uint8 [num_crops_g, b, S_g, S_g, 3] array per resolution group (b the
        local batch), crop-major over the groups.
      augment_config: `config.augment`.
      dtype: output dtype (the model's compute dtype).
      data_axis: the mesh axis name(s) the batch is split over.

    Returns:
      One [num_crops_g, b, S_g, S_g, 3] `dtype` array per group, normalised.
    """
    local_batch = crops[0].shape[1]
    first = jax.lax.axis_index(data_axis) * local_batch
    step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    images = []
    view = 0
    for group in crops:
        n, b = group.shape[:2]
        keys = _crop_keys(step_key, view + jnp.arange(n), first + jnp.arange(b)).reshape(n * b)
        flat = group.reshape((n * b,) + group.shape[2:])
        out = jax.vmap(
            lambda key, image: augment_crops(key, image[None], augment_config, dtype=dtype)[0]
        )(keys, flat)
        images.append(out.reshape((n, b) + out.shape[1:]))
        view += n
    return images
