"""Host side of multi-crop: decode, RandomResizedCrop per crop, horizontal flip.

One record in, uint8 crops grouped by resolution out (SPEC §7, torchvision semantics):

  record {'image': bytes | uint8 array, 'label': int}
    -> {'crops': (uint8 [num_crops[0], S0, S0, 3], uint8 [num_crops[1], S1, S1, 3], ...),
        'label': int}

All randomness comes from the `np.random.Generator` grain hands to `random_map`,
seeded from the pipeline seed and the element's position, so the crops do not depend
on the number of workers.

Speed: crop boxes are drawn from the image header before decoding, so a JPEG whose
every crop box is at least twice the crop size is decoded at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling, `Image.draft`). Each crop is then PIL's bilinear resize of
its box (antialiased when shrinking), exactly torchvision's `resized_crop` on PIL
images at full resolution.

Bad input: undecodable or truncated files and decompression bombs (more than
2 x `PIL.Image.MAX_IMAGE_PIXELS`) make `random_map` log a warning and return None,
grain's marker for a dropped element; `pipeline.py` replaces it. Grayscale, palette,
CMYK, RGBA (alpha dropped) and 16-bit images are converted to RGB uint8; images
smaller than a crop are upsampled, as torchvision does.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

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
    """grain random map: record -> uint8 crops grouped by resolution.

    Args:
      size_crops: crop size per group, e.g. (224, 96).
      num_crops: crops per group, e.g. (2, 6).
      min_scale_crops, max_scale_crops: RandomResizedCrop area range per group.
    """

    def __init__(
        self,
        size_crops: Sequence[int],
        num_crops: Sequence[int],
        min_scale_crops: Sequence[float],
        max_scale_crops: Sequence[float],
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
        self.size_crops = tuple(int(s) for s in size_crops)
        self.num_crops = tuple(int(n) for n in num_crops)
        self.scales = tuple((float(lo), float(hi)) for lo, hi in zip(min_scale_crops, max_scale_crops))

    @classmethod
    def from_config(cls, crops_config) -> "MultiCrop":
        c = crops_config
        return cls(c.size_crops, c.num_crops, c.min_scale_crops, c.max_scale_crops)

    def crops(self, image: bytes | np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """uint8 crops, one [num_crops[g], size_crops[g], size_crops[g], 3] array per group.

        Raises whatever PIL raises on bad input.
        """
        img = open_image(image)
        width, height = img.size
        boxes = [
            [random_resized_crop_box(rng, width, height, scale) for _ in range(n)]
            for n, scale in zip(self.num_crops, self.scales)
        ]
        flips = [rng.random(n) < 0.5 for n in self.num_crops]
        # Largest power-of-two JPEG downscale that still leaves every box >= its crop size.
        shrink = min(
            min(w, h) / size for group, size in zip(boxes, self.size_crops) for _, _, w, h in group
        )
        factor = 1.0
        if shrink >= 2.0:
            s = 8 if shrink >= 8 else 4 if shrink >= 4 else 2
            drafted = img.draft(None, (width // s, height // s))  # None unless JPEG
            if drafted is not None:
                factor = drafted[1][2] / width
        img = to_rgb(img)  # decodes (and raises on truncated data)
        out = []
        for group, group_flips, size in zip(boxes, flips, self.size_crops):
            arrays = np.empty((len(group), size, size, 3), np.uint8)
            for k, ((left, top, w, h), flip) in enumerate(zip(group, group_flips)):
                if factor == 1.0:  # torchvision: crop, then resize the crop
                    crop = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
                else:  # the box in the reduced image has fractional corners
                    box = (left * factor, top * factor, (left + w) * factor, (top + h) * factor)
                    crop = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
                arrays[k] = np.asarray(crop)[:, ::-1] if flip else np.asarray(crop)
            out.append(arrays)
        return tuple(out)

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        try:
            crops = self.crops(record["image"], rng)
        except Exception as e:  # any decoder failure: skip this record, never the run
            where = record.get("path", "")
            log.warning("skipping bad image record %s(%s: %s)", f"{where} " if where else "", type(e).__name__, e)
            return None
        out = {"crops": crops, "label": record["label"]}
        if "index" in record:
            out["index"] = record["index"]
        return out
