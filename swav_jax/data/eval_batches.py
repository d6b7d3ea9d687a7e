"""Deterministic evaluation batches: resize + centre crop, labels, this process's shard.

The evaluation transform of docs/ALGORITHM.md §11: resize the shorter side to size * 256 / 224
(256 for 224 px), centre crop `size` (bilinear, antialiased as torchvision's PIL path).
Each process reads a contiguous block of the records, so gathering processes in order
gives the records in their original order.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import jax
import numpy as np
from PIL import Image

from swav_jax.data.multicrop import open_image, to_rgb

log = logging.getLogger(__name__)


def resize_center_crop(image: bytes | np.ndarray, size: int) -> np.ndarray | None:
    """uint8 [size, size, 3], or None for an undecodable image."""
    try:
        img = to_rgb(open_image(image))
        w, h = img.size
        short = max(int(round(size * 256 / 224)), size)
        scale = short / min(w, h)
        new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("skipping an undecodable evaluation image: %s", e)
        return None


def process_block(num_records: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous block of records."""
    p, n = jax.process_index(), jax.process_count()
    return num_records * p // n, num_records * (p + 1) // n


def eval_batches(source, *, size: int, batch_size: int, num_threads: int = 8) -> Iterator[dict[str, Any]]:
    """Yields {'image': uint8 [b, size, size, 3], 'label': int32 [b], 'mask': bool [b]}.

    Every process yields the same number of batches of `batch_size` (the last padded,
    `mask` False on padding and on undecodable images), as `extract_features` needs.
    """
    start, stop = process_block(len(source))
    # Every process must yield the same number of batches: size them by the largest block.
    largest = -(-len(source) // jax.process_count())
    num_batches = -(-largest // batch_size)
    blank = np.zeros((size, size, 3), np.uint8)
    with ThreadPoolExecutor(num_threads) as pool:
        for b in range(num_batches):
            indices = range(start + b * batch_size, min(start + (b + 1) * batch_size, stop))
            records = [source[i] for i in indices]
            images = list(pool.map(lambda r: resize_center_crop(r["image"], size), records))
            mask = np.zeros((batch_size,), bool)
            mask[: len(images)] = [im is not None for im in images]
            labels = np.full((batch_size,), -1, np.int32)
            labels[: len(records)] = [int(r["label"]) for r in records]
            images = [blank if im is None else im for im in images]
            images += [blank] * (batch_size - len(images))
            yield {"image": np.stack(images), "label": labels, "mask": mask}
