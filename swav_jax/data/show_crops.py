"""What the network is trained on: a PNG grid of the V augmented crops per image.

One row per image, one column per crop (crop-major, as the model sees them: the
`size_crops[0]` crops first). Crops pass through exactly the training transforms,
host (`MultiCrop`) then device (`crop_groups`, `augment_crops`), and are
de-normalised for viewing; smaller crops sit at their true size in the top-left
corner of their cell.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from PIL import Image

from swav_jax.data.augment import augment_crops, denormalize
from swav_jax.data.crop_resize import crop_groups
from swav_jax.data.multicrop import MultiCrop

PAD = 4  # pixels between cells
BACKGROUND = 255


def augmented_views(image: bytes | np.ndarray, config, seed: int = 0) -> list[np.ndarray]:
    """The V crops of one image after host and device augmentation, uint8 [S_v, S_v, 3]."""
    canvas, boxes, flip = MultiCrop.from_config(config).sample(image, np.random.default_rng(seed))
    c = config.crops
    groups = crop_groups(canvas[None], boxes[None], flip[None], c.size_crops, c.num_crops)
    key = jax.random.key(seed)
    augment = jax.jit(lambda k, x: augment_crops(k, x, config.augment))
    views = []
    for g, crops in enumerate(groups):  # crops: [n_g, 1, S, S, 3]
        out = augment(jax.random.fold_in(key, g), crops[:, 0])
        views.extend(denormalize(np.asarray(out), config.augment))
    return views


def show_crops(image_paths: Sequence[str], config, out_path: str, seed: int = 0) -> np.ndarray:
    """Writes the grid PNG to `out_path`; returns it as uint8 [rows, cols, 3]."""
    if not image_paths:
        raise ValueError("show_crops: give at least one image path")
    rows = []
    for i, path in enumerate(image_paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
            rows.append(augmented_views(data, config, seed=seed + i))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"show_crops: cannot read image {path!r}: {e}") from e
    cell = max(config.crops.size_crops)
    num_views = len(rows[0])
    grid = np.full(
        (len(rows) * (cell + PAD) + PAD, num_views * (cell + PAD) + PAD, 3), BACKGROUND, np.uint8
    )
    for r, views in enumerate(rows):
        for c, view in enumerate(views):
            y, x = PAD + r * (cell + PAD), PAD + c * (cell + PAD)
            grid[y : y + view.shape[0], x : x + view.shape[1]] = view
    Image.fromarray(grid).save(out_path)
    return grid
