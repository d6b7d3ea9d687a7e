"""Device augmentation against float64 NumPy references written from torchvision's definitions."""

import colorsys
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.configs.base import get_config
from swav_jax.data import augment
from swav_jax.errors import ConfigError
from swav_jax.train.validate import validate_config

GREY = np.array([0.2989, 0.587, 0.114])


# ---------------------------------------------------------------- NumPy references
def ref_grey(x):
    return (x * GREY).sum(-1, keepdims=True)


def ref_brightness(x, f):
    return np.clip(f * x, 0, 1)


def ref_contrast(x, f):
    return np.clip(f * x + (1 - f) * ref_grey(x).mean(), 0, 1)


def ref_saturation(x, f):
    return np.clip(f * x + (1 - f) * ref_grey(x), 0, 1)


def ref_hue(x, shift):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*x[idx])
        out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def ref_jitter(x, factors, order):
    ops = (ref_brightness, ref_contrast, ref_saturation, ref_hue)
    for op in order:
        x = ops[op](x, factors[op])
    return x


def ref_blur(x, sigma, k):
    k = min(k, min(x.shape[:2]) if min(x.shape[:2]) % 2 else min(x.shape[:2]) - 1)
    t = np.arange(k) - (k - 1) / 2
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    half = k // 2
    xp = np.pad(x, ((half, half), (0, 0), (0, 0)), mode="reflect")
    x = sum(w[j] * xp[j : j + x.shape[0]] for j in range(k))
    xp = np.pad(x, ((0, 0), (half, half), (0, 0)), mode="reflect")
    return sum(w[j] * xp[:, j : j + x.shape[1]] for j in range(k))


def ref_augment(crop_u8, p, cfg):
    x = crop_u8.astype(np.float64) / 255
    if p["jitter"]:
        x = ref_jitter(x, p["factors"], p["order"])
    if p["grey"]:
        x = np.repeat(ref_grey(x), 3, axis=-1)
    if p["blur"]:
        x = ref_blur(x, p["sigma"], cfg.blur_kernel_size)
    return (x - np.array(cfg.mean)) / np.array(cfg.std)


# ---------------------------------------------------------------- tests
@pytest.fixture
def cfg():
    return get_config().augment


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("op", range(4))
def test_single_ops_match_reference(op):
    x = _images(3, 6).astype(np.float64) / 255
    factors = np.array([[1.5, 0.4, 1.7, 0.13], [0.3, 1.6, 0.2, -0.17], [0.9, 1.1, 0.6, 0.5]])
    ops = (ref_brightness, ref_contrast, ref_saturation, ref_hue)
    # order puts `op` first, hue last unless op is hue; check via a one-op application
    f = np.ones_like(factors)
    f[:, 3] = 0.0
    f[:, op] = factors[:, op]
    order = np.tile([op] + [o for o in range(4) if o != op], (3, 1))
    got = augment.color_jitter(jnp.asarray(x, jnp.float32), jnp.asarray(f, jnp.float32), jnp.asarray(order))
    want = np.stack([ops[op](x[i], factors[i, op]) for i in range(3)])
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_color_jitter_random_order_matches_reference():
    n = 24  # every permutation of 4 ops once
    x = _images(n, 5, seed=1).astype(np.float64) / 255
    perms = np.array(list(itertools.permutations(range(4))))
    rng = np.random.default_rng(2)
    factors = np.concatenate([rng.uniform(0.2, 1.8, (n, 3)), rng.uniform(-0.2, 0.2, (n, 1))], axis=1)
    got = augment.color_jitter(
        jnp.asarray(x, jnp.float32), jnp.asarray(factors, jnp.float32), jnp.asarray(perms, jnp.int32)
    )
    want = np.stack([ref_jitter(x[i], factors[i], perms[i]) for i in range(n)])
    np.testing.assert_allclose(np.asarray(got), want, atol=3e-5)


def test_color_jitter_jitted_matches_reference():
    """Jitted, as in the train step (the tests above run it op by op): XLA fuses the chain,
    and fused code may compute a value twice and round the copies differently (XLA:CPU
    contracts some products into FMAs). A hue whose branch compared two such copies
    (`maxc == r`) failed here for some crops while the chain was fused on CPU."""
    n = 48  # every permutation of 4 ops twice
    x = _images(n, 12, seed=8).astype(np.float64) / 255
    perms = np.array(list(itertools.permutations(range(4))) * 2)
    rng = np.random.default_rng(9)
    factors = np.concatenate([rng.uniform(0.2, 1.8, (n, 3)), rng.uniform(-0.2, 0.2, (n, 1))], axis=1)
    got = jax.jit(augment.color_jitter)(
        jnp.asarray(x, jnp.float32), jnp.asarray(factors, jnp.float32), jnp.asarray(perms, jnp.int32)
    )
    want = np.stack([ref_jitter(x[i], factors[i], perms[i]) for i in range(n)])
    np.testing.assert_allclose(np.asarray(got), want, atol=3e-5)


@pytest.mark.parametrize("size,kernel", [(30, 23), (12, 23), (9, 5)])
def test_gaussian_blur_matches_reference(size, kernel):
    x = _images(2, size, seed=3).astype(np.float64) / 255
    sigma = np.array([0.1, 2.0]) if size > 9 else np.array([0.7, 1.3])
    got = augment.gaussian_blur(jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32), kernel)
    want = np.stack([ref_blur(x[i], sigma[i], kernel) for i in range(2)])
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_apply_params_matches_reference(cfg):
    n = 8
    crops = _images(n, 12, seed=4)
    params = augment.sample_params(jax.random.key(0), n, cfg)
    # force a mix of every switch
    params = params._replace(
        jitter=jnp.array([1, 1, 0, 0, 1, 0, 1, 0], bool),
        grey=jnp.array([0, 1, 0, 1, 0, 0, 1, 1], bool),
        blur=jnp.array([1, 0, 1, 0, 0, 1, 1, 0], bool),
    )
    got = np.asarray(augment.apply_params(jnp.asarray(crops), params, cfg))
    p_np = jax.tree.map(np.asarray, params._asdict())
    for i in range(n):
        pi = {k: v[i] for k, v in p_np.items()}
        np.testing.assert_allclose(got[i], ref_augment(crops[i], pi, cfg), atol=2e-4, err_msg=f"crop {i}")


def test_sample_params_ranges_and_rates(cfg):
    n = 4000
    p = jax.tree.map(np.asarray, augment.sample_params(jax.random.key(1), n, cfg))
    s = cfg.color_jitter_strength
    assert np.all((p.factors[:, :3] >= 1 - 0.8 * s) & (p.factors[:, :3] <= 1 + 0.8 * s))
    assert np.all(np.abs(p.factors[:, 3]) <= 0.2 * s)
    assert np.all((p.sigma >= 0.1) & (p.sigma <= 2.0))
    assert np.all(np.sort(p.order, axis=1) == np.arange(4))
    tol = 4 * np.sqrt(0.25 / n)
    assert abs(p.jitter.mean() - 0.8) < tol
    assert abs(p.grey.mean() - 0.2) < tol
    assert abs(p.blur.mean() - 0.5) < tol
    # hue's slot is uniform over the four positions
    hue_slot = np.argmax(p.order == augment.HUE, axis=1)
    assert np.all(np.abs(np.bincount(hue_slot, minlength=4) / n - 0.25) < tol)
    # factors cover their ranges and are not shared between crops
    assert p.factors[:, 0].min() < 0.3 and p.factors[:, 0].max() > 1.7
    assert len(np.unique(p.factors[:, 1])) == n


def test_augment_crops_shapes_dtypes_and_per_crop_randomness(cfg):
    # every random op on, so each crop's own parameters must show in its pixels
    cfg.color_jitter_prob = cfg.grayscale_prob = cfg.blur_prob = 1.0
    crops = jnp.asarray(np.repeat(_images(1, 16, seed=5), 16, axis=0))  # 16 identical crops
    fn = jax.jit(lambda k, x: augment.augment_crops(k, x, cfg, dtype=jnp.bfloat16))
    out = fn(jax.random.key(0), crops)
    assert out.shape == crops.shape and out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert len({out[i].tobytes() for i in range(16)}) == 16  # every crop augmented differently
    again = np.asarray(fn(jax.random.key(0), crops), np.float32)
    np.testing.assert_array_equal(out, again)
    other = np.asarray(fn(jax.random.key(1), crops), np.float32)
    assert not np.array_equal(out, other)


def test_augment_crops_identity_when_all_off(cfg):
    cfg = get_config().augment
    cfg.color_jitter_prob = 0.0
    cfg.grayscale_prob = 0.0
    cfg.blur_prob = 0.0
    crops = _images(3, 8, seed=6)
    out = np.asarray(augment.augment_crops(jax.random.key(0), jnp.asarray(crops), cfg))
    want = (crops / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_array_equal(augment.denormalize(out, cfg), crops)


def test_bad_arguments(cfg):
    with pytest.raises(ValueError, match="uint8"):
        augment.augment_crops(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.float32), cfg)
    config = get_config()  # bad settings are the config validation's to report
    config.augment.blur_kernel_size = 4
    with pytest.raises(ConfigError, match="augment.blur_kernel_size"):
        validate_config(config, num_devices=1, num_processes=1)


def test_augment_views_do_not_depend_on_the_sharding(cfg):
    """Each crop's parameters come from its sample's index in the global batch: the
    augmented views are the same whether the batch sits on one device or on eight."""
    cfg.color_jitter_prob = cfg.grayscale_prob = cfg.blur_prob = 1.0
    cfg.blur_kernel_size = 5
    rng = np.random.default_rng(7)
    crops = (rng.integers(0, 256, (2, 16, 12, 12, 3), np.uint8), rng.integers(0, 256, (3, 16, 6, 6, 3), np.uint8))
    key, step = jax.random.key_data(jax.random.key(3)), jnp.int32(5)

    def views(devices):
        mesh = jax.make_mesh((1, len(devices)), ("data", "bn"), devices=devices)
        spec = P(None, ("data", "bn"))
        local = lambda k, s, *c: tuple(augment.augment_views(k, s, c, cfg, dtype=jnp.float32, data_axis=("data", "bn")))
        fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), spec, spec), out_specs=spec))
        placed = [jax.device_put(c, NamedSharding(mesh, spec)) for c in crops]
        return [np.asarray(v) for v in fn(key, step, *placed)]

    for one, eight in zip(views(jax.devices()[:1]), views(jax.devices()[:8]), strict=True):
        # XLA vectorises the colour maths differently for 16 and 2 samples per device
        # (measured: 3e-6); one grey level is 1 / (255 x std) = 0.017 here.
        np.testing.assert_allclose(eight, one, atol=2e-5)
    # and not trivially: the two crops of a sample and two samples differ
    one = views(jax.devices()[:1])[0]
    assert not np.allclose(one[0], one[1]) and not np.allclose(one[0, 0], one[0, 1])
