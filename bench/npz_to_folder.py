"""Writes labelled images from an .npz file as an image folder for `data.source=folder`.

    python bench/npz_to_folder.py DATA.npz OUT_DIR [--test 1000]

DATA.npz holds `images` (uint8 [N, H, W, 3] or [N, H, W]), `labels` (int [N]) and
optionally `classes` (N_classes names; else the labels' numbers name the folders).
The last --test images go to OUT_DIR/test/<class>/, the others to OUT_DIR/train/<class>/,
one PNG each named by its index in the file (zero-padded, so the folder source's sorted
order is the file's order). Train with

    --config.data.source=folder --config.data.data_dir=OUT_DIR
    --config.data.split=train --config.data.eval_split=test
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image


def write_folder(images: np.ndarray, labels: np.ndarray, classes, out_dir: str, num_test: int) -> dict:
    """Writes the PNGs; returns {'train': count, 'test': count}."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 [N, H, W(, 3)], got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape [{len(images)}], got {labels.shape}")
    if not 0 <= num_test < len(images):
        raise ValueError(f"--test must be in [0, {len(images)}), got {num_test}")
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"labels must lie in [0, {len(names)}), got [{labels.min()}, {labels.max()}]")
    width = len(str(len(images) - 1))
    first_test = len(images) - num_test
    counts = {"train": 0, "test": 0}
    for i, (image, label) in enumerate(zip(images, labels)):
        split = "train" if i < first_test else "test"
        folder = os.path.join(out_dir, split, names[int(label)])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:0{width}d}.png"))
        counts[split] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("npz")
    parser.add_argument("out_dir")
    parser.add_argument("--test", type=int, default=1000, help="the last N images form the test split")
    args = parser.parse_args(argv)
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        print(f"error: {args.out_dir} exists and is not empty", file=sys.stderr)
        return 1
    with np.load(args.npz) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            print(f"error: {args.npz} lacks {sorted(missing)} (has {data.files})", file=sys.stderr)
            return 1
        classes = data["classes"] if "classes" in data.files else None
        try:
            counts = write_folder(data["images"], data["labels"], classes, args.out_dir, args.test)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"wrote {counts['train']} train and {counts['test']} test images under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
