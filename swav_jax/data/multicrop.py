"""Host side of multi-crop: decode into a fixed canvas and draw the crop boxes.

The host does only what needs the encoded file or Python randomness; pixels are cut
and resized on the accelerator (`crop_resize.py`), because PIL's resize of two 224 px
crops alone costs about twice a 500 x 375 JPEG decode (see docs/BENCHMARKS.md).

  record {'image': bytes | uint8 array, 'label': int(, 'index': int)}
    -> {'canvas': uint8 [C, C, 3]     the RGB image at the top-left, zeros elsewhere
        'boxes':  float32 [V, 4]      (top, left, height, width) per crop, canvas pixels
        'flip':   bool [V]            horizontal flip per crop
        'label':  int(, 'index': int)}

with C = c.data.canvas_size and V = sum(c.crops.num_crops), crops ordered by group
(all `size_crops[0]` crops first). Boxes follow torchvision's RandomResizedCrop on the
original image (area scale U(min, max), log-uniform aspect ratio in [3/4, 4/3], 10
attempts, then the central crop); flips are Bernoulli(0.5). All randomness comes from
the `np.random.Generator` grain hands to `random_map`, seeded by the pipeline seed and
the element's position, so results do not depend on the number of workers.

Images larger than the canvas are shrunk to fit (aspect kept; JPEGs first decoded at
1/2, 1/4 or 1/8 scale by libjpeg when that still covers the fit, `Image.draft`, then
PIL's antialiased bilinear resize); boxes are scaled with them.

Bad input: undecodable or truncated files and decompression bombs (more than
2 x `PIL.Image.MAX_IMAGE_PIXELS` pixels) make `random_map` return {'bad': what and why}
instead; `pipeline.py` replaces the element, counts the record and warns. Grayscale,
palette, CMYK, RGBA (alpha dropped) and 16-bit images are converted to RGB uint8;
images smaller than a crop are upsampled, as torchvision does.
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

RATIO = (3.0 / 4.0, 4.0 / 3.0)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def random_resized_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, crop_width, crop_height).

    10 attempts at area fraction U(scale) and log-uniform aspect ratio (w/h) in `ratio`;
    otherwise the central crop clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def open_image(image: bytes | np.ndarray) -> Image.Image:
    """A lazily decoded PIL image from encoded bytes or a uint8 [H, W(, C)] array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise OSError("empty image data")
        return Image.open(io.BytesIO(image))
    array = np.asarray(image)
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 or uint16, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB uint8 for any PIL mode; 16-bit grey keeps its top 8 bits (not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


class MultiCrop(grain.transforms.RandomMap):
    """grain random map: record -> canvas, crop boxes and flips (see module doc).

    Args:
      size_crops: crop size per group, e.g. (224, 96).
      num_crops: crops per group, e.g. (2, 6).
      min_scale_crops, max_scale_crops: RandomResizedCrop area range per group.
      canvas_size: side C of the square uint8 canvas images are decoded into.
    """

    def __init__(
        self,
        size_crops: Sequence[int],
        num_crops: Sequence[int],
        min_scale_crops: Sequence[float],
        max_scale_crops: Sequence[float],
        canvas_size: int,
    ):
        groups = (size_crops, num_crops, min_scale_crops, max_scale_crops)
        if len({len(g) for g in groups}) != 1 or not size_crops:
            raise ValueError(
                "c.crops.size_crops, num_crops, min_scale_crops and max_scale_crops must be "
                f"non-empty and of equal length, got {[tuple(g) for g in groups]}"
            )
        for s, n, lo, hi in zip(*groups):
            if s <= 0 or n <= 0:
                raise ValueError(f"c.crops: sizes and counts must be positive, got size {s}, count {n}")
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"c.crops: need 0 < min_scale <= max_scale <= 1, got ({lo}, {hi})")
        if canvas_size <= 0:
            raise ValueError(f"c.data.canvas_size must be positive, got {canvas_size}")
        self.size_crops = tuple(int(s) for s in size_crops)
        self.num_crops = tuple(int(n) for n in num_crops)
        self.scales = tuple((float(lo), float(hi)) for lo, hi in zip(min_scale_crops, max_scale_crops))
        self.canvas_size = int(canvas_size)

    @classmethod
    def from_config(cls, config) -> "MultiCrop":
        c = config.crops
        return cls(c.size_crops, c.num_crops, c.min_scale_crops, c.max_scale_crops, config.data.canvas_size)

    def sample(self, image: bytes | np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(canvas uint8 [C, C, 3], boxes float32 [V, 4], flip bool [V]) for one image.

        Raises whatever PIL raises on bad input.
        """
        img = open_image(image)
        width, height = img.size
        boxes = np.array(
            [
                random_resized_crop_box(rng, width, height, scale)
                for n, scale in zip(self.num_crops, self.scales)
                for _ in range(n)
            ],
            np.float32,
        ).reshape(-1, 4)
        flip = rng.random(len(boxes)) < 0.5
        c = self.canvas_size
        if max(width, height) > c:
            fit = c / max(width, height)
            target = (max(1, min(c, round(width * fit))), max(1, min(c, round(height * fit))))
            img.draft(None, target)  # JPEG only: decode at the coarsest scale still >= target
            img = to_rgb(img).resize(target, Image.Resampling.BILINEAR)
        else:
            img = to_rgb(img)  # decodes (and raises on truncated data)
        pixels = np.asarray(img)
        fx, fy = pixels.shape[1] / width, pixels.shape[0] / height
        canvas = np.zeros((c, c, 3), np.uint8)
        canvas[: pixels.shape[0], : pixels.shape[1]] = pixels
        left, top, w, h = boxes.T
        return canvas, np.stack([top * fy, left * fx, h * fy, w * fx], axis=1), flip

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        try:
            canvas, boxes, flip = self.sample(record["image"], rng)
        except Exception as e:  # any decoder failure: skip this record, never the run
            where = record.get("path") or f"record {record.get('index', '?')}"
            return {"bad": f"{where} ({type(e).__name__}: {e})"}
        out = {"canvas": canvas, "boxes": boxes, "flip": flip, "label": record["label"]}
        if "index" in record:
            out["index"] = record["index"]
        return out
