"""Input pipeline throughput: host part (grain) and device part, images/s.

Generates ImageNet-like JPEGs (500 x 375, quality 90, noise with a photo-like
spectrum, ~110 KiB like ImageNet's mean), then measures for the default recipe
(2 x 224 + 6 x 96 crops, canvas 512):
  decode        PIL decode to RGB only: the floor the host part is compared with
  host          MultiCrop.sample: decode into the canvas + crop boxes and flips,
                one thread: images/s per CPU core
  pil_crops     for comparison, the classic host pipeline: decode + 8 PIL
                crop-and-resize + flips (what crop_resize.py moves to the device)
  grain         the whole host pipeline (host_dataset over a FolderSource: file read,
                shuffle, sample, batch stacking) at the given worker counts
  device        crop_groups (cut + resize + flip) and augment_crops (colour, blur,
                normalise), each jitted, on one batch on jax.devices()[0]

Usage: python bench/pipeline.py [--num-images 64] [--batch 32] [--workers 0 2] [--json out.json]
Each rate is the best of --repeats runs (the machine may be shared; best = least
disturbed).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # swav_jax from a checkout

from swav_jax.data.multicrop import random_resized_crop_box  # noqa: E402


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """Noise octaves with amplitude ~ 1/frequency (natural images' spectrum) + grain."""
    img = np.zeros((height, width, 3), np.float32)
    for octave in range(8):
        n = 2 ** (octave + 1)
        coarse = rng.normal(0, 1, (n * 3 // 4 + 1, n + 1, 3)).astype(np.float32)
        layers = [
            np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.Resampling.BICUBIC))
            for c in range(3)
        ]
        img += np.stack(layers, -1) * (60.0 / (octave + 1))
    img += rng.normal(0, 22, img.shape)
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def make_jpegs(folder: str, num: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        buf = io.BytesIO()
        Image.fromarray(photo_like(rng)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
        with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
            f.write(out[-1])
    return out


def best_rate(fn, count: int, repeats: int) -> float:
    """Best items/s over `repeats` timed calls of fn() (which processes `count` items)."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - t))
    return max(rates)


class ImageNetSized:
    """A data source of ImageNet's length cycling over a few records."""

    def __init__(self, source, length: int = 1_281_167):
        self._source, self._length = source, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        return self._source[index % len(self._source)]


def pil_crops(data: bytes, multicrop, rng: np.random.Generator) -> list[np.ndarray]:
    """Baseline: torchvision-style host crops with PIL (crop, bilinear resize, flip)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = []
    for size, n, scale in zip(multicrop.size_crops, multicrop.num_crops, multicrop.scales):
        for _ in range(n):
            left, top, w, h = random_resized_crop_box(rng, img.width, img.height, scale)
            crop = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(np.asarray(crop))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="batch for the grain and device parts")
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-device", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    import grain
    import jax

    from swav_jax.configs.base import get_config
    from swav_jax.data import pipeline
    from swav_jax.data.augment import augment_crops
    from swav_jax.data.crop_resize import crop_groups
    from swav_jax.data.multicrop import MultiCrop
    from swav_jax.data.sources import FolderSource

    config = get_config()  # 2 x 224 (0.14, 1) + 6 x 96 (0.05, 0.14), canvas 512
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = [ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")]
    results: dict[str, object] = {
        "cpu": model[0] if model else platform.processor(),
        "cpu_count": os.cpu_count(),
        "crops": f"{tuple(config.crops.num_crops)} x {tuple(config.crops.size_crops)}",
        "canvas": config.data.canvas_size,
    }
    multicrop = MultiCrop.from_config(config)
    with tempfile.TemporaryDirectory() as folder:
        jpegs = make_jpegs(folder, args.num_images)
        n = len(jpegs)
        results["mean_jpeg_kib"] = round(float(np.mean([len(j) for j in jpegs])) / 1024, 1)

        def decode_all():
            for data in jpegs:
                Image.open(io.BytesIO(data)).convert("RGB")

        def host_all():
            rng = np.random.default_rng(0)
            for data in jpegs:
                multicrop.sample(data, rng)

        def pil_all():
            rng = np.random.default_rng(0)
            for data in jpegs:
                pil_crops(data, multicrop, rng)

        decode = best_rate(decode_all, n, args.repeats)
        host = best_rate(host_all, n, args.repeats)
        pil = best_rate(pil_all, n, args.repeats)
        results["decode_img_per_s_per_core"] = round(decode, 1)
        results["host_img_per_s_per_core"] = round(host, 1)
        results["host_time_over_decode_time"] = round(decode / host, 2)
        results["pil_crops_img_per_s_per_core"] = round(pil, 1)
        results["pil_crops_time_over_decode_time"] = round(decode / pil, 2)

        # grain's index shuffle is slow for tiny data sets (~0.4 ms an index for 64
        # records, 5 us for ImageNet's 1,281,167): read the files as an ImageNet-sized set.
        source = ImageNetSized(FolderSource(folder))
        config.batch_size = args.batch
        for workers in args.workers:
            config.data.num_workers = workers
            steps = max(2, 4 * n // args.batch)
            it = iter(pipeline.host_dataset(config, source, seed=0, shard_options=grain.sharding.NoSharding()))
            next(it)  # start-up (worker processes) not timed

            def grain_steps():
                for _ in range(steps):
                    next(it)

            rate = best_rate(grain_steps, steps * args.batch, args.repeats)
            results[f"grain_img_per_s_workers_{workers}"] = round(rate, 1)
            it.close()
        # Threads of a closed iterator may still finish a batch from the folder we delete now.
        logging.getLogger("swav_jax.data.multicrop").setLevel(logging.ERROR)

    if not args.skip_device:
        device = jax.devices()[0]
        results["device"] = f"{device.platform}: {device.device_kind}"
        rng = np.random.default_rng(0)
        samples = [multicrop.sample(jpegs[i % n], rng) for i in range(args.batch)]
        canvas, boxes, flip = (jax.device_put(np.stack([s[k] for s in samples]), device) for k in range(3))
        c = config.crops

        crop = jax.jit(lambda canvas, boxes, flip: crop_groups(canvas, boxes, flip, c.size_crops, c.num_crops))

        @jax.jit
        def augment(key, groups):
            return [
                augment_crops(jax.random.fold_in(key, g), x.reshape((-1,) + x.shape[2:]), config.augment)
                for g, x in enumerate(groups)
            ]

        key = jax.random.key(0)
        groups = jax.block_until_ready(crop(canvas, boxes, flip))
        jax.block_until_ready(augment(key, groups))
        crop_rate = best_rate(lambda: jax.block_until_ready(crop(canvas, boxes, flip)), args.batch, args.repeats)
        aug_rate = best_rate(lambda: jax.block_until_ready(augment(key, groups)), args.batch, args.repeats)
        results["device_crop_img_per_s"] = round(crop_rate, 1)
        results["device_augment_img_per_s"] = round(aug_rate, 1)
        results["device_img_per_s"] = round(1 / (1 / crop_rate + 1 / aug_rate), 1)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
