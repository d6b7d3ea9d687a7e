"""Host multi-crop: RandomResizedCrop statistics, flips, decoding and every bad-input case."""

import io
import logging

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


def test_crops_grouped_by_resolution():
    mc = MultiCrop((24, 8), (2, 6), (0.14, 0.05), (1.0, 0.14))
    groups = mc.crops(encode(smooth_image(60, 80)), np.random.default_rng(0))
    assert [g.shape for g in groups] == [(2, 24, 24, 3), (6, 8, 8, 3)]
    assert all(g.dtype == np.uint8 for g in groups)
    # same generator state, same crops; another, other crops
    again = mc.crops(encode(smooth_image(60, 80)), np.random.default_rng(0))
    other = mc.crops(encode(smooth_image(60, 80)), np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))
    assert not np.array_equal(groups[0], other[0])


def test_horizontal_flip_half_the_time():
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :8, 0] = 255  # red left half, blue right half
    image[:, 8:, 2] = 255
    mc = MultiCrop((8,), (200,), (1.0,), (1.0,))  # full-image crops
    (crops,) = mc.crops(image, np.random.default_rng(0))
    red_left = crops[:, :, 0, 0] > 128
    flipped = crops[:, :, 0, 2] > 128
    assert np.all(red_left.all(1) ^ flipped.all(1))
    assert abs(flipped.all(1).mean() - 0.5) < 4 * np.sqrt(0.25 / 200)


def test_bilinear_crop_matches_pil_resize_of_box():
    image = smooth_image(50, 70)
    mc = MultiCrop((20,), (1,), (0.3,), (0.6,))
    rng = np.random.default_rng(3)
    (crop,) = mc.crops(image, rng)
    rng = np.random.default_rng(3)
    left, top, w, h = random_resized_crop_box(rng, 70, 50, (0.3, 0.6))
    flip = rng.random(1)[0] < 0.5
    want = np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h)).resize((20, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(crop[0], want[:, ::-1] if flip else want)


def test_jpeg_draft_decoding_of_large_images_matches_full_decode():
    """A 1600 x 1200 JPEG with 16 px crops is decoded at 1/8 scale; result ~ full decode."""
    data = encode(smooth_image(1200, 1600), quality=95)
    mc = MultiCrop((16,), (8,), (0.3,), (1.0,))
    (fast,) = mc.crops(data, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    boxes = [random_resized_crop_box(rng, 1600, 1200, (0.3, 1.0)) for _ in range(8)]
    flips = rng.random(8) < 0.5
    full = Image.open(io.BytesIO(data)).convert("RGB")
    for crop, (l, t, w, h), flip in zip(fast, boxes, flips):
        want = np.asarray(full.resize((16, 16), Image.Resampling.BILINEAR, box=(l, t, l + w, t + h)))
        want = want[:, ::-1] if flip else want
        assert np.abs(crop.astype(int) - want).mean() < 2.0


def test_mode_conversions(tmp_path):
    mc = MultiCrop((8,), (2,), (0.5,), (1.0,))
    rgb = smooth_image(20, 24)
    cases = {
        "grey_png": encode(rgb, "PNG", mode="L"),
        "grey_jpeg": encode(rgb, "JPEG", mode="L"),
        "cmyk_jpeg": encode(rgb, "JPEG", mode="CMYK"),
        "rgba_png": encode(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "PNG"),
        "palette_png": encode(rgb, "PNG", mode="P"),
        "grey_array": rgb[..., 0],
        "grey_array_c1": rgb[..., :1],
        "rgba_array": np.dstack([rgb, rgb[..., :1]]),
    }
    for name, image in cases.items():
        (crops,) = mc.crops(image, np.random.default_rng(0))
        assert crops.shape == (2, 8, 8, 3) and crops.dtype == np.uint8, name
        if name.startswith("grey"):
            assert np.array_equal(crops[..., 0], crops[..., 2]), name


def test_sixteen_bit_png_keeps_its_range():
    value = np.full((12, 12), 40000, np.uint16)  # top 8 bits: 156
    buf = io.BytesIO()
    Image.fromarray(value).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    mc = MultiCrop((6,), (2,), (0.5,), (1.0,))
    (crops,) = mc.crops(buf.getvalue(), np.random.default_rng(0))
    assert np.all(crops == 40000 >> 8)
    (crops,) = mc.crops(value, np.random.default_rng(0))  # uint16 arrays too
    assert np.all(crops == 40000 >> 8)


def test_image_smaller_than_crop_is_upsampled():
    mc = MultiCrop((32,), (3,), (0.14,), (1.0,))
    (crops,) = mc.crops(encode(smooth_image(5, 4), "PNG"), np.random.default_rng(0))
    assert crops.shape == (3, 32, 32, 3)
    (crops,) = mc.crops(encode(smooth_image(1, 1), "PNG"), np.random.default_rng(0))
    assert crops.shape == (3, 32, 32, 3)


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
def test_bad_records_are_dropped_with_a_warning(name, caplog):
    mc = MultiCrop((8,), (2,), (0.5,), (1.0,))
    record = {"image": bad_records()[name], "label": 3, "path": f"/data/{name}"}
    with caplog.at_level(logging.WARNING, logger="swav_jax.data.multicrop"):
        assert mc.random_map(record, np.random.default_rng(0)) is None
    assert f"/data/{name}" in caplog.text


def test_decompression_bomb_is_dropped(monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 40 x 50 image is then a bomb
    mc = MultiCrop((8,), (2,), (0.5,), (1.0,))
    with caplog.at_level(logging.WARNING, logger="swav_jax.data.multicrop"):
        assert mc.random_map({"image": encode(smooth_image(40, 50)), "label": 0}, np.random.default_rng(0)) is None
    assert "DecompressionBomb" in caplog.text


def test_large_image_is_processed():
    data = encode(smooth_image(3000, 4000), quality=80)
    mc = MultiCrop((32, 16), (2, 2), (0.14, 0.05), (1.0, 0.14))
    out = mc.random_map({"image": data, "label": 1, "index": 5}, np.random.default_rng(0))
    assert out["label"] == 1 and out["index"] == 5
    assert [c.shape for c in out["crops"]] == [(2, 32, 32, 3), (2, 16, 16, 3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size_crops=(8, 4), num_crops=(2,), min_scale_crops=(0.1,), max_scale_crops=(1.0,)), "equal length"),
        (dict(size_crops=(8,), num_crops=(0,), min_scale_crops=(0.1,), max_scale_crops=(1.0,)), "positive"),
        (dict(size_crops=(8,), num_crops=(2,), min_scale_crops=(0.5,), max_scale_crops=(0.2,)), "min_scale"),
    ],
)
def test_bad_crop_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCrop(**kwargs)
