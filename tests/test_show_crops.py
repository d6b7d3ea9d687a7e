"""`swav-jax show-crops`: every crop at its size, its box's scale within the config's
range, small images magnified to a readable size, a frame around each panel."""

import numpy as np
import pytest
from PIL import Image

import tiny_config
from swav_jax.data.show_crops import MIN_DISPLAY_PX, augmented_views, show_crops


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


def test_views_sizes_boxes_and_scales(image_file):
    config = tiny_config.get_config()  # crops 2 x 16 px (scale 0.6-1) + 2 x 8 px (0.3-0.6), canvas 16
    image, views, boxes, scales = augmented_views(image_file.read_bytes(), config, seed=3)
    assert image.shape == (12, 10, 3)  # smaller than the canvas: not resized
    assert [v.shape for v in views] == [(16, 16, 3)] * 2 + [(8, 8, 3)] * 2
    np.testing.assert_allclose(scales, boxes[:, 2] * boxes[:, 3] / (12 * 10))
    # RandomResizedCrop rounds the box to whole pixels: the scale is within a pixel row of its range.
    lo, hi = [0.6, 0.6, 0.3, 0.3], [1.0, 1.0, 0.6, 0.6]
    assert np.all(scales >= np.array(lo) - 0.2) and np.all(scales <= np.array(hi) + 0.2)


def test_large_images_are_shrunk_into_the_canvas_and_scales_stay_relative(tmp_path):
    config = tiny_config.get_config()
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((40, 80, 3), 200, np.uint8)).save(path)
    image, _, boxes, scales = augmented_views(path.read_bytes(), config)
    assert image.shape == (8, 16, 3)  # fit into 16 px, aspect kept
    np.testing.assert_allclose(scales, boxes[:, 2] * boxes[:, 3] / (8 * 16))


def test_png_is_magnified_labelled_and_framed(image_file, tmp_path):
    config = tiny_config.get_config()
    out = tmp_path / "crops.png"
    drawn = show_crops([str(image_file), str(image_file)], config, str(out))
    assert len(drawn) == 2 and [v.shape[0] for v in drawn[0]] == [16, 16, 8, 8]
    png = np.asarray(Image.open(out).convert("RGB"))
    # Two rows, each at least the magnified 16 px crop high; the image column and four crops wide.
    assert png.shape[0] >= 2 * MIN_DISPLAY_PX and png.shape[1] >= MIN_DISPLAY_PX * (2 + 2 * 8 / 16 + 1)


def test_unreadable_image_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        show_crops([str(bad)], tiny_config.get_config(), str(tmp_path / "x.png"))
