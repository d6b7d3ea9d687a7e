"""Device crop + resize against PIL's crop-then-bilinear-resize (torchvision's resized_crop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from swav_jax.data.crop_resize import crop_groups, crop_resize, resize_weights
from swav_jax.data.multicrop import MultiCrop


def pil_resized_crop(image, top, left, height, width, size, flip):
    out = Image.fromarray(image).crop((left, top, left + width, top + height))
    out = out.resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def textured(h, w, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 3 + 2, w // 3 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)).astype(int)
    return np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [16, 7])
def test_crop_resize_matches_pil(size):
    image = textured(40, 50)
    canvas = np.zeros((2, 64, 64, 3), np.uint8)
    canvas[0, :40, :50] = image
    canvas[1, :40, :50] = image[::-1]
    boxes = np.array(
        [
            [(0, 0, 40, 50), (3, 5, 5, 7), (10, 20, 30, 30), (39, 49, 1, 1)],  # whole, up, down, 1 px
            [(1, 2, 16, 16), (0, 30, 40, 20), (20, 0, 7, 33), (5, 5, 12, 9)],
        ],
        np.float32,
    )
    flip = np.array([[False, True, False, True], [True, False, True, False]])
    got = np.asarray(crop_resize(jnp.asarray(canvas), jnp.asarray(boxes), jnp.asarray(flip), size))
    assert got.shape == (4, 2, size, size, 3) and got.dtype == np.uint8
    for b in range(2):
        for n in range(4):
            t, l, h, w = boxes[b, n].astype(int)
            want = pil_resized_crop(canvas[b, :40, :50], t, l, h, w, size, flip[b, n])
            diff = np.abs(got[n, b].astype(int) - want)
            assert diff.max() <= 1, (b, n, diff.max())  # PIL rounds its row pass to uint8


def test_resize_weights_rows_sum_to_one_inside_the_box():
    w = np.asarray(resize_weights(jnp.array([2.0, 7.5]), jnp.array([10.0, 3.25]), 6, 20))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert not w[0, :, :2].any() and not w[0, :, 12:].any()  # taps only inside [2, 12)
    assert np.all(w >= 0)


def test_sample_then_crop_groups_is_torchvision_resized_crop():
    image = textured(30, 36, seed=1)
    mc = MultiCrop((20, 8), (2, 3), (0.14, 0.05), (1.0, 0.14), canvas_size=40)
    canvas, boxes, flip = mc.sample(image, np.random.default_rng(3))
    groups = jax.jit(lambda c, b, f: crop_groups(c, b, f, (20, 8), (2, 3)))(canvas[None], boxes[None], flip[None])
    assert [g.shape for g in groups] == [(2, 1, 20, 20, 3), (3, 1, 8, 8, 3)]
    crops = [np.asarray(g)[k, 0] for g in groups for k in range(g.shape[0])]
    for crop, box, f, size in zip(crops, boxes.astype(int), flip, (20, 20, 8, 8, 8)):
        want = pil_resized_crop(image, *box, size, f)
        assert np.abs(crop.astype(int) - want).max() <= 1


def test_crop_groups_under_jit_on_sharded_batches():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    spec = jax.sharding.PartitionSpec("data")
    fn = jax.jit(
        jax.shard_map(
            lambda c, b, f: crop_groups(c, b, f, (6,), (2,)),
            mesh=mesh, in_specs=spec, out_specs=jax.sharding.PartitionSpec(None, "data"),
        )
    )
    canvas = np.stack([textured(12, 12, seed=i) for i in range(8)])
    boxes = np.tile(np.array([[0, 0, 12, 12], [2, 3, 6, 5]], np.float32), (8, 1, 1))
    flip = np.zeros((8, 2), bool)
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    (out,) = jax.block_until_ready(fn(put(canvas), put(boxes), put(flip)))
    assert out.shape == (2, 8, 6, 6, 3)
    unsharded = np.asarray(crop_groups(canvas, boxes, flip, (6,), (2,))[0])
    assert np.abs(np.asarray(out).astype(int) - unsharded).max() <= 1  # float sums may round apart
    whole = np.asarray(Image.fromarray(canvas[3]).resize((6, 6), Image.Resampling.BILINEAR))
    assert np.abs(np.asarray(out)[0, 3].astype(int) - whole).max() <= 1  # crop 0: the whole image
