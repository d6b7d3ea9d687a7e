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

Speed: everything is vectorised over the crops, and the colour work runs on the three
channel planes in few passes over memory (`_colour_planes`: every crop runs one fixed
chain in which each of its ops takes the level that keeps its order, the other levels
being exact identities). Measured on TPU: docs/TPU.md.
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


def _grey(rgb):
    """Luma (torchvision rgb_to_grayscale) of channel planes rgb: 3 x [...] -> [...]."""
    r, g, b = rgb
    return GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b


def _saturate(rgb, f):
    """torchvision adjust_saturation by `f` [N, 1, 1] on channel planes rgb."""
    offset = (1.0 - f) * _grey(rgb)
    return tuple(jnp.clip(f * ch + offset, 0.0, 1.0) for ch in rgb)


def _rotate_hue(rgb, shift):
    """Rotate hue by `shift` [N, 1, 1] (fraction of a turn), torchvision's HSV round trip,
    on channel planes rgb (3 x [N, H, W] in [0, 1])."""
    r, g, b = rgb
    # The max channel is found by comparing the channels, not by `maxc == r`: XLA may
    # compute a value twice in one fusion, rounding the copies differently (XLA:CPU
    # contracts some of them into FMAs), and `maxc == r` then fails for every channel.
    r_max = (r >= g) & (r >= b)
    g_max = ~r_max & (g >= b)
    maxc = jnp.where(r_max, r, jnp.where(g_max, g, b))
    minc = jnp.minimum(jnp.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    h = jnp.where(r_max, bc - gc, jnp.where(g_max, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    h = jnp.mod(h + shift, 1.0)
    v = maxc
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # select_n on the sector index (jnp.select would stack six conditions in HBM)
    return (
        jax.lax.select_n(i, v, q, p, p, t, v),
        jax.lax.select_n(i, t, v, v, q, p, p),
        jax.lax.select_n(i, p, p, t, v, v, q),
    )


def _where(on, new, old):
    """Per crop (`on`: bool [N, 1, 1]) the planes `new` or `old` (3 x [N, H, W] each)."""
    return tuple(jnp.where(on, a, b) for a, b in zip(new, old))


def _mixing_level(level, rgb, on):
    """level(rgb), for a level that mixes the channels and leaves every crop whose `on`
    [N, 1, 1] is False unchanged.

    On CPU a conditional skips the level when no crop uses it, which also ends a fused
    pass there: XLA:CPU erases optimization barriers and fuses across anything but a
    conditional, and without one it recomputes the whole chain before the level in each
    consumer of the level's values (the augmentation 8 times slower: docs/TPU.md). On
    TPU no conditional: XLA fuses the level with the per-channel levels around it.
    """
    def skip_unused(rgb):
        return jax.lax.cond(jnp.any(on), level, lambda rgb: rgb, rgb)

    return jax.lax.platform_dependent(rgb, cpu=skip_unused, default=level)


def _colour_planes(rgb, factors: jax.Array, order: jax.Array, jitter: jax.Array, grey: jax.Array):
    """ColorJitter, then grayscale, on channel planes rgb (3 x float [N, H, W] in [0, 1]).

    factors, order: as in `color_jitter`; jitter, grey: bool [N], whether each crop is
    jittered, converted to grey. Returns 3 x [N, H, W].

    Why it is laid out this way: XLA fuses any chain of per-channel maps
    x -> clip(a x + c) (brightness: c = 0; contrast: c = (1 - f) mean grey level) into
    one pass over the planes, but every map that mixes the channels (saturation's grey
    level, the hue's HSV round trip, grayscale) splits the fused pass. So every crop runs
    one fixed chain with only four mixing levels:

      gap 0 | saturation, if before hue | gap 1 | hue | gap 2 | saturation, if after hue | gap 3 | grey

    each gap holding two per-channel levels. Brightness and contrast go into the gap
    their position in `order` falls in, the earlier of the two on the gap's first level;
    every other level is the identity, exactly (a = 1, c = 0; saturation factor 1; the
    hue and grey skipped). The contrast's mean grey level is that of the image entering
    it: a first run of the chain through the ops before the contrast, reduced to its
    mean, which XLA fuses into one read of the crops. Bytes moved on TPU: docs/TPU.md.
    """
    pos = jnp.argsort(order, axis=1)  # [N, 4]: each op's position
    at_b, at_c, at_s, at_h = (pos[:, op] for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE))
    f_b, f_c, f_s = (factors[:, op] for op in (BRIGHTNESS, CONTRAST, SATURATION))
    shift = factors[:, HUE, None, None]
    sat_first = at_s < at_h

    def gap(at):
        """The gap (0..3) that brightness or contrast at position `at` [N] falls in."""
        after_s, after_h = (at > at_s).astype(jnp.int32), (at > at_h).astype(jnp.int32)
        return jnp.where(sat_first, after_s + after_h, 2 * after_h + after_s)

    level_b = 2 * gap(at_b) + (at_b > at_c)
    level_c = 2 * gap(at_c) + (at_c > at_b)
    levels = jnp.arange(8)[:, None]

    def coefficients(until, grey):
        """Per-crop coefficients of the levels, with the jitter ops at positions < until
        [N]: per-channel levels x -> clip(a x + w mean) (a, w: [8, N]), the saturation
        factors before / after the hue ([2, N]), hue and grey switches ([N])."""
        is_b = jitter & (level_b == levels) & (at_b < until)
        is_c = jitter & (level_c == levels) & (at_c < until)
        a = jnp.where(is_b, f_b, jnp.where(is_c, f_c, 1.0))
        w = jnp.where(is_c, 1.0 - f_c, 0.0)
        sat_on = jitter & (at_s < until) & (sat_first == jnp.array([[True], [False]]))
        return a, w, jnp.where(sat_on, f_s, 1.0), jitter & (at_h < until), grey

    def chain(rgb, coefficients, mean):
        """The chain with `coefficients`; contrast against `mean` [N]."""
        a, w, sat, hue, grey, mean = jax.tree.map(lambda v: v[..., None, None], (*coefficients, mean))
        for k in range(4):  # gap k, then the mixing level after it
            for level in (2 * k, 2 * k + 1):
                rgb = tuple(jnp.clip(a[level] * ch + w[level] * mean, 0.0, 1.0) for ch in rgb)
            if k == 1:
                rgb = _mixing_level(lambda rgb: _where(hue, _rotate_hue(rgb, shift), rgb), rgb, hue)
            elif k == 3:
                rgb = _mixing_level(lambda rgb: _where(grey, (_grey(rgb),) * 3, rgb), rgb, grey)
            else:  # saturation; its factor is 1 (the identity, exactly) where it does not apply
                f = sat[k // 2]
                rgb = _mixing_level(lambda rgb: _saturate(rgb, f), rgb, f != 1.0)
        return rgb

    mean = _grey(chain(rgb, coefficients(at_c, jnp.zeros_like(grey)), jnp.zeros_like(f_c))).mean(axis=(1, 2))
    return chain(rgb, coefficients(jnp.full_like(at_c, 4), grey), mean)


def _planes(x):
    """[..., 3] -> its three channel planes."""
    return tuple(x[..., k] for k in range(3))


def color_jitter(x: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
    """torchvision ColorJitter with given parameters.

    x: float [N, H, W, 3] in [0, 1]; factors: [N, 4] (brightness, contrast,
    saturation, hue); order: int [N, 4], the ops applied first to last.
    """
    n = x.shape[0]
    return jnp.stack(_colour_planes(_planes(x), factors, order, jnp.ones(n, bool), jnp.zeros(n, bool)), axis=-1)


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
    rgb = _planes(crops.astype(jnp.float32) / 255.0)
    x = jnp.stack(_colour_planes(rgb, params.factors, params.order, params.jitter, params.grey), axis=-1)
    # x is materialised here, so that the blur's reflect padding fuses into the sum over its
    # taps. Otherwise XLA fuses the padding into the colour work, and each tap then reads
    # the padded array: on TPU that was 23 times the traffic of x (docs/TPU.md).
    x = jax.lax.optimization_barrier(x)
    sel = lambda m, a, b: jnp.where(m[:, None, None, None], a, b)  # noqa: E731
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
        # one key per crop; applied to all crops at once (not under vmap, which would turn
        # `_mixing_level`'s conditionals into selects of both branches)
        params = jax.tree.map(lambda a: a[:, 0], jax.vmap(lambda key: sample_params(key, 1, augment_config))(keys))
        out = apply_params(flat, params, augment_config, dtype)
        images.append(out.reshape((n, b) + out.shape[1:]))
        view += n
    return images
