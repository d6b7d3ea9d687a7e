"""Host multi-crop: RandomResizedCrop statistics, flips, decoding into the canvas, every bad-input case."""

import io

import numpy as np
import pytest
from PIL import Image

from swav_jax.data.multicrop import MultiCrop, random_resized_crop_box


def encode(array, fmt="JPEG", mode=None, **kw):
    buf = io.BytesIO()
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def smooth_image(h, w, seed=0):
    """A smooth colour image (JPEG-friendly, like a photo's low frequencies)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14)])
def test_random_resized_crop_scale_and_ratio_statistics(scale):
    rng = np.random.default_rng(0)
    width, height = 500, 375
    boxes = np.array([random_resized_crop_box(rng, width, height, scale) for _ in range(3000)])
    left, top, w, h = boxes.T
    assert np.all((left >= 0) & (top >= 0) & (left + w <= width) & (top + h <= height))
    area = w * h / (width * height)
    ratio = w / h
    # integer rounding of w and h moves area and ratio by at most ~1/min(w, h) relative
    slack = 2.5 / np.minimum(w, h)
    assert np.all(area >= scale[0] * (1 - slack)) and np.all(area <= scale[1] * (1 + slack))
    assert np.all(ratio >= 0.75 * (1 - slack)) and np.all(ratio <= 4 / 3 * (1 + slack))
    # the whole ranges are used (large boxes that do not fit are redrawn, so only
    # small scales keep the uniform shape)
    lo, hi = scale
    assert area.min() < lo + 0.05 * (hi - lo) and area.max() > hi - 0.05 * (hi - lo)
    if hi < 0.5:  # every attempt fits: area fraction U(lo, hi), log-ratio U(log 3/4, log 4/3)
        assert abs(area.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
        assert abs(np.log(ratio).mean()) < 0.01
        assert abs(np.log(ratio).std() - np.log(16 / 9) / np.sqrt(12)) < 0.01
    assert ratio.min() < 0.78 and ratio.max() > 1.28


def test_random_resized_crop_fallback_is_central_and_ratio_clamped():
    rng = np.random.default_rng(0)
    # 1000 x 100: no box of area >= 50% with ratio <= 4/3 fits, so all 10 attempts fail
    assert random_resized_crop_box(rng, 1000, 100, (0.5, 1.0)) == ((1000 - 133) // 2, 0, 133, 100)
    assert random_resized_crop_box(rng, 100, 1000, (0.5, 1.0)) == (0, (1000 - 133) // 2, 100, 133)


def test_sample_shapes_determinism_and_box_placement():
    mc = MultiCrop((24, 8), (2, 6), (0.14, 0.05), (1.0, 0.14), canvas_size=96)
    image = smooth_image(60, 80)
    canvas, boxes, flip = mc.sample(encode(image, "PNG"), np.random.default_rng(0))
    assert canvas.shape == (96, 96, 3) and canvas.dtype == np.uint8
    assert boxes.shape == (8, 4) and boxes.dtype == np.float32 and flip.shape == (8,) and flip.dtype == bool
    np.testing.assert_array_equal(canvas[:60, :80], image)  # top-left, lossless PNG
    assert not canvas[60:].any() and not canvas[:, 80:].any()
    # boxes are torchvision's, drawn group by group, then the flips
    rng = np.random.default_rng(0)
    want = [random_resized_crop_box(rng, 80, 60, s) for s, n in (((0.14, 1.0), 2), ((0.05, 0.14), 6)) for _ in range(n)]
    np.testing.assert_array_equal(boxes, [(t, l, h, w) for l, t, w, h in want])
    np.testing.assert_array_equal(flip, rng.random(8) < 0.5)
    again = mc.sample(encode(image, "PNG"), np.random.default_rng(0))
    other = mc.sample(encode(image, "PNG"), np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip((canvas, boxes, flip), again))
    assert not np.array_equal(boxes, other[1])


def test_flip_rate():
    mc = MultiCrop((8,), (400,), (0.5,), (1.0,), canvas_size=16)
    _, _, flip = mc.sample(smooth_image(16, 16), np.random.default_rng(0))
    assert abs(flip.mean() - 0.5) < 4 * np.sqrt(0.25 / 400)


def test_large_jpeg_is_shrunk_to_the_canvas_with_draft():
    """A 1600 x 1200 JPEG into a 64 px canvas: decoded at 1/8 by libjpeg, then resized."""
    data = encode(smooth_image(1200, 1600), quality=95)
    mc = MultiCrop((16,), (4,), (0.3,), (1.0,), canvas_size=64)
    canvas, boxes, _ = mc.sample(data, np.random.default_rng(0))
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 48), Image.Resampling.BILINEAR))
    assert np.abs(canvas[:48].astype(int) - want).mean() < 2.0
    assert not canvas[48:].any()
    rng = np.random.default_rng(0)
    orig = [random_resized_crop_box(rng, 1600, 1200, (0.3, 1.0)) for _ in range(4)]
    np.testing.assert_allclose(boxes, [(t * 0.04, l * 0.04, h * 0.04, w * 0.04) for l, t, w, h in orig], rtol=1e-5)


def palette_png(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).quantize(256).save(buf, format="PNG")
    return buf.getvalue()


def test_mode_conversions():
    mc = MultiCrop((8,), (2,), (0.5,), (1.0,), canvas_size=32)
    rgb = smooth_image(20, 24)
    cases = {
        "grey_png": encode(rgb, "PNG", mode="L"),
        "grey_jpeg": encode(rgb, "JPEG", mode="L"),
        "cmyk_jpeg": encode(rgb, "JPEG", mode="CMYK"),
        "rgba_png": encode(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "PNG"),
        "palette_png": palette_png(rgb),
        "grey_array": rgb[..., 0],
        "grey_array_c1": rgb[..., :1],
        "rgba_array": np.dstack([rgb, rgb[..., :1]]),
    }
    for name, image in cases.items():
        canvas, _, _ = mc.sample(image, np.random.default_rng(0))
        assert canvas.shape == (32, 32, 3) and canvas.dtype == np.uint8, name
        if name.startswith("grey"):
            np.testing.assert_array_equal(canvas[..., 0], canvas[..., 2], err_msg=name)
        lossy = {"rgba_png": 0, "rgba_array": 0, "palette_png": 6, "cmyk_jpeg": 8}  # alpha dropped
        if name in lossy:
            assert np.abs(canvas[:20, :24].astype(int) - rgb).mean() <= lossy[name], name


def test_sixteen_bit_png_keeps_its_range():
    value = np.full((12, 12), 40000, np.uint16)  # top 8 bits: 156
    buf = io.BytesIO()
    Image.fromarray(value).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    mc = MultiCrop((6,), (2,), (0.5,), (1.0,), canvas_size=12)
    for image in (buf.getvalue(), value):  # 16-bit PNG bytes and uint16 arrays
        canvas, _, _ = mc.sample(image, np.random.default_rng(0))
        assert np.all(canvas == 40000 >> 8)


def test_image_smaller_than_crop_gives_small_boxes():
    mc = MultiCrop((32,), (3,), (0.14,), (1.0,), canvas_size=32)
    for h, w in ((5, 4), (1, 1)):
        canvas, boxes, _ = mc.sample(encode(smooth_image(h, w), "PNG"), np.random.default_rng(0))
        assert np.all(boxes[:, 0] + boxes[:, 2] <= h) and np.all(boxes[:, 1] + boxes[:, 3] <= w)
        assert np.all(boxes[:, 2:] >= 1)


def bad_records():
    jpeg = encode(smooth_image(40, 50))
    return {
        "garbage": b"this is not an image",
        "empty": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "truncated_png": encode(smooth_image(40, 50), "PNG")[:200],
        "float_array": np.zeros((8, 8, 3), np.float32),
    }


@pytest.mark.parametrize("name", sorted(bad_records()))
def test_bad_records_are_marked_with_what_and_why(name):
    mc = MultiCrop((8,), (2,), (0.5,), (1.0,), canvas_size=64)
    record = {"image": bad_records()[name], "label": 3, "path": f"/data/{name}"}
    assert mc.random_map(record, np.random.default_rng(0))["bad"].startswith(f"/data/{name} (")


def test_decompression_bomb_is_marked_bad(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 40 x 50 image is then a bomb
    mc = MultiCrop((8,), (2,), (0.5,), (1.0,), canvas_size=64)
    out = mc.random_map({"image": encode(smooth_image(40, 50)), "label": 0, "index": 4}, np.random.default_rng(0))
    assert out["bad"].startswith("record 4 (DecompressionBomb")


def test_large_image_is_processed():
    data = encode(smooth_image(3000, 4000), quality=80)
    mc = MultiCrop((32, 16), (2, 2), (0.14, 0.05), (1.0, 0.14), canvas_size=128)
    out = mc.random_map({"image": data, "label": 1, "index": 5}, np.random.default_rng(0))
    assert out["label"] == 1 and out["index"] == 5
    assert out["canvas"].shape == (128, 128, 3) and out["canvas"][:96].any() and not out["canvas"][96:].any()
    assert np.all(out["boxes"][:, 0] + out["boxes"][:, 2] <= 96 + 1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size_crops=(8, 4), num_crops=(2,), min_scale_crops=(0.1,), max_scale_crops=(1.0,)), "equal length"),
        (dict(size_crops=(8,), num_crops=(0,), min_scale_crops=(0.1,), max_scale_crops=(1.0,)), "positive"),
        (dict(size_crops=(8,), num_crops=(2,), min_scale_crops=(0.5,), max_scale_crops=(0.2,)), "min_scale"),
        (dict(size_crops=(8,), num_crops=(2,), min_scale_crops=(0.1,), max_scale_crops=(1.0,), canvas_size=0), "canvas_size"),
    ],
)
def test_bad_crop_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCrop(**{"canvas_size": 32, **kwargs})
