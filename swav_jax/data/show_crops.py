"""What the network is trained on: a PNG of the V augmented crops of some images.

One row per image: the image with its crop boxes outlined and numbered, then its crops
in the order the model sees them (the `size_crops[0]` crops first), each at its true
size relative to the others, labelled with its number, its size in pixels and its
area scale (fraction of the image the box covers). Crops pass through exactly the
training transforms, host (`MultiCrop`) then device (`crop_groups`, `augment_crops`),
and are de-normalised for viewing. Small images are magnified (nearest neighbour, so
pixels stay pixels) until the largest crop is `MIN_DISPLAY_PX` on screen; every panel
has a frame, so white crops stay visible.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from swav_jax.data.augment import augment_crops, denormalize
from swav_jax.data.crop_resize import crop_groups
from swav_jax.data.multicrop import MultiCrop, open_image

MIN_DISPLAY_PX = 160  # the largest crop is drawn at least this many screen pixels wide
DPI = 100
FRAME = "0.25"


def _augmenter(config):
    """The device augmentation of `config`, jitted (one compilation per crop size)."""
    return jax.jit(lambda k, x: augment_crops(k, x, config.augment))


def augmented_views(
    image: bytes | np.ndarray, config, seed: int = 0, *, augment=None
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """One image through the training transforms (`augment`: `_augmenter(config)`, to
    share its compilations between images).

    Returns:
      (image uint8 [h, w, 3] as decoded into the canvas, crops: V uint8 [S_v, S_v, 3],
       boxes float32 [V, 4] (top, left, height, width) in the image's canvas pixels,
       scales float32 [V]: box area / image area).
    """
    width, height = open_image(image).size
    canvas, boxes, flip = MultiCrop.from_config(config).sample(image, np.random.default_rng(seed))
    c = config.crops
    groups = crop_groups(canvas[None], boxes[None], flip[None], c.size_crops, c.num_crops)
    key = jax.random.key(seed)
    augment = augment or _augmenter(config)
    views = []
    for g, crops in enumerate(groups):  # crops: [n_g, 1, S, S, 3]
        out = augment(jax.random.fold_in(key, g), crops[:, 0])
        views.extend(denormalize(np.asarray(out), config.augment))
    # The image fills the canvas's top-left corner, shrunk by `fit` when larger than it.
    fit = min(1.0, config.data.canvas_size / max(width, height))
    shown_h, shown_w = max(1, round(height * fit)), max(1, round(width * fit))
    scales = boxes[:, 2] * boxes[:, 3] / (shown_h * shown_w)
    return canvas[:shown_h, :shown_w], views, boxes, scales.astype(np.float32)


def show_crops(image_paths: Sequence[str], config, out_path: str, seed: int = 0) -> list[list[np.ndarray]]:
    """Writes the PNG to `out_path`; returns the crops drawn, per image (uint8 [S, S, 3])."""
    if not image_paths:
        raise ValueError("show_crops: give at least one image path")
    rows, augment = [], _augmenter(config)
    for i, path in enumerate(image_paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
            rows.append(augmented_views(data, config, seed=seed + i, augment=augment))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"show_crops: cannot read image {path!r}: {e}") from e

    sizes = [int(s) for s, n in zip(config.crops.size_crops, config.crops.num_crops) for _ in range(n)]
    largest = max(sizes)
    magnify = max(1, math.ceil(MIN_DISPLAY_PX / largest))
    # Column widths in crop pixels: the image column as wide as the largest crop.
    widths = [largest] + sizes
    gap, label = 28, 44  # screen pixels between panels and for the two-line labels
    fig_w = (sum(widths) * magnify + gap * (len(widths) + 1)) / DPI
    fig_h = len(rows) * (largest * magnify + label + gap) / DPI
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    grid = fig.add_gridspec(
        len(rows), len(widths), width_ratios=widths,
        left=gap / DPI / fig_w, right=1 - gap / DPI / fig_w, bottom=gap / 2 / DPI / fig_h, top=1 - label / DPI / fig_h,
        wspace=gap * len(widths) / (sum(widths) * magnify), hspace=(label + gap) / (largest * magnify),
    )
    for r, (image, views, boxes, scales) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        _panel(ax, image, f"image {image.shape[1]}x{image.shape[0]} px\n(crop boxes)")
        for v, (top, left, h, w) in enumerate(boxes):
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), w, h, fill=False, linewidth=1.2, edgecolor=f"C{v % 10}"))
            ax.text(left, top, str(v + 1), color=f"C{v % 10}", fontsize=7, va="top", ha="left", fontweight="bold")
        for v, view in enumerate(views):
            ax = fig.add_subplot(grid[r, v + 1])
            _panel(ax, view, f"{v + 1}: {view.shape[0]} px\nscale {scales[v]:.2f}", edge=f"C{v % 10}")
    fig.savefig(out_path, dpi=DPI)
    return [views for _, views, _, _ in rows]


def _panel(ax, image: np.ndarray, title: str, edge: str = FRAME) -> None:
    """The image at its pixel size in a framed axes, top-anchored, with a title."""
    ax.imshow(image, interpolation="nearest")
    ax.set_anchor("N")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(edge)
        spine.set_linewidth(1.5)
    ax.set_title(title, fontsize=8, pad=3)
