"""Sharded feature extraction: equal to an unsharded float64 restatement, padding dropped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.tree_util import Partial

from swav_jax.eval.features import extract_features, local_shard_count, padded_batch_size

_W = np.random.default_rng(0).normal(size=(4 * 4 * 3, 5)) / 8.0


def _apply(w, images):
    # Per example, like an eval-mode network: uint8 images -> [b, 5].
    x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
    return jnp.tanh(x @ w)


def _feature_fn(images):  # weights closed over (baked into the program)
    return _apply(jnp.asarray(_W, jnp.float32), images)


_TRACED_FEATURE_FN = Partial(_apply, jnp.asarray(_W, jnp.float32))  # weights as an argument


def _data(rng, n):
    return rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 100, n)


def _batches(images, labels, sizes, masks=None):
    start = 0
    for i, size in enumerate(sizes):
        batch = {"image": images[start : start + size], "label": labels[start : start + size]}
        if masks is not None and masks[i] is not None:
            batch["mask"] = masks[i]
        start += size
        yield batch


@pytest.mark.parametrize(
    "mesh_kind,feature_fn", [("plain", _feature_fn), ("make_mesh", _TRACED_FEATURE_FN)]
)
def test_sharded_equals_unsharded_with_partial_and_masked_batches(mesh_kind, feature_fn):
    rng = np.random.default_rng(1)
    images, labels = _data(rng, 29)
    sizes = (12, 12, 5)  # 12 and 5 do not divide 8 devices; the last batch is partial
    mask = np.ones(12, bool)
    mask[[3, 10]] = False  # a data pipeline's own padding examples
    masks = (None, mask, None)
    mesh = (
        Mesh(np.array(jax.devices()), ("data",))
        if mesh_kind == "plain"
        else jax.make_mesh((8,), ("data",))
    )
    features, out_labels = extract_features(
        feature_fn, _batches(images, labels, sizes, masks), mesh=mesh
    )

    keep = np.concatenate([np.ones(12, bool), mask, np.ones(5, bool)])
    expected = np.tanh((images.reshape(29, -1) / 255.0) @ _W)[keep]  # float64, unsharded
    assert features.dtype == np.float32 and features.shape == (27, 5)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_labels, labels[keep])

    one_device = Mesh(np.array(jax.devices()[:1]), ("data",))
    single, single_labels = extract_features(
        _feature_fn, _batches(images, labels, sizes, masks), mesh=one_device
    )
    np.testing.assert_allclose(features, single, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out_labels, single_labels)


def test_float16_storage_and_mesh_with_two_axes():
    rng = np.random.default_rng(2)
    images, labels = _data(rng, 20)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    assert local_shard_count(mesh) == 4 and padded_batch_size(10, mesh) == 12
    features, out_labels = extract_features(
        _feature_fn, _batches(images, labels, (10, 10)), mesh=mesh, dtype=np.float16
    )
    assert features.dtype == np.float16 and features.shape == (20, 5)
    expected = np.tanh((images.reshape(20, -1) / 255.0) @ _W)
    np.testing.assert_allclose(features, expected, atol=2e-3)
    np.testing.assert_array_equal(out_labels, labels)


def test_bad_batches():
    rng = np.random.default_rng(3)
    images, labels = _data(rng, 20)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    with pytest.raises(ValueError, match="empty"):
        extract_features(_feature_fn, [], mesh=mesh)
    with pytest.raises(ValueError, match="must not grow"):
        extract_features(_feature_fn, _batches(images, labels, (4, 16)), mesh=mesh)
    with pytest.raises(ValueError, match="label"):
        extract_features(_feature_fn, [{"image": images}], mesh=mesh)
    with pytest.raises(ValueError, match="data_axis"):
        extract_features(_feature_fn, _batches(images, labels, (8,)), mesh=mesh, data_axis="batch")


def test_feature_fn_of_new_weights_reuses_the_compiled_program():
    """The online kNN evaluates new weights every time: one program per architecture."""
    import tiny_config
    from swav_jax.eval import features
    from swav_jax.eval.run import feature_fn, random_init_variables

    config = tiny_config.get_config()
    mesh = jax.make_mesh((8,), ("data",))
    images, labels = _data(np.random.default_rng(1), 16)
    first = random_init_variables(config)
    config.seed += 1
    second = random_init_variables(config)
    out = []
    for variables in (first, second, first):
        batches = _batches(images, labels, [8, 8])
        out.append(extract_features(feature_fn(config, variables), batches, mesh=mesh)[0])
        if len(out) == 1:
            compiled = features.apply_feature_fn._cache_size()
    assert features.apply_feature_fn._cache_size() == compiled
    assert not np.allclose(out[0], out[1]) and np.array_equal(out[0], out[2])
