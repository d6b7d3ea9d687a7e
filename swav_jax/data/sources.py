"""Random-access image sources for grain.

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose
records are dicts

  {'image': encoded image bytes, or uint8 [H, W] / [H, W, C] array (C in 1, 3, 4),
   'label': int, -1 when unlabeled}

Decoding, colour conversion and cropping happen later, per element, in
`swav_jax.data.multicrop`, so a bad file costs one record and never the run.

Sources (`c.data.source`):
  tfds    `tfds.data_source(c.data.name, split=..., data_dir=c.data.data_dir)`:
          ArrayRecord files read without TensorFlow; images stay encoded.
  folder  `c.data.data_dir/<split>/` if that folder exists, else `c.data.data_dir`
          itself for the training split. Class sub-folders (`<class>/**/*.jpg`, labels
          from the sorted folder names) or a flat folder of images (label -1).
  digits  scikit-learn's bundled 8x8 digits (1797 images), upscaled bilinearly to
          `c.data.image_size` px (0 keeps 8 px), grey replicated to RGB uint8.
          Deterministic split: the first 1437 images (80%) are 'train', the last
          360 are 'test'.
Plus `ArraySource(images, labels)` for any in-memory arrays, and `SubsetSource(source,
indices)` for some records of another source (the labelled subsets of fine-tuning).

Every source also gives every record's label (`labels()`), the number of classes
(`num_classes()`) and, where records have file names (folder, tfds), `file_names()`,
without decoding images; the TFDS source reads every record once for them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
DIGITS_TRAIN_FRACTION = 0.8


class ArraySource:
    """In-memory images as a grain data source.

    Args:
      images: uint8 [N, H, W], [N, H, W, C] (C in 1, 3, 4), or a sequence of N such
        [H, W(, C)] arrays of differing sizes.
      labels: int [N], or None for unlabeled data (label -1).
    """

    def __init__(self, images: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | None = None):
        if len(images) == 0:
            raise ValueError("ArraySource: images is empty")
        for i in (0, len(images) - 1):
            im = np.asarray(images[i])
            if im.dtype != np.uint8 or im.ndim not in (2, 3) or (im.ndim == 3 and im.shape[-1] not in (1, 3, 4)):
                raise ValueError(
                    "ArraySource: images must be uint8 [H, W] or [H, W, C] with C in (1, 3, 4), "
                    f"got dtype {im.dtype} shape {im.shape} at index {i}"
                )
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"ArraySource: {len(labels)} labels for {len(images)} images")
        self._images = images
        self._labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = -1 if self._labels is None else int(self._labels[index])
        return {"image": self._images[index], "label": label}

    def labels(self) -> np.ndarray:
        """int64 [N], -1 for unlabeled data."""
        return np.full((len(self),), -1, np.int64) if self._labels is None else self._labels.copy()

    def num_classes(self) -> int:
        return int(self.labels().max()) + 1

    def file_names(self) -> list[str]:
        raise ValueError("in-memory images (ArraySource, the digits) have no file names")

    def __repr__(self) -> str:
        return f"ArraySource(num_records={len(self)})"


class FolderSource:
    """Image files under a root folder, read as encoded bytes.

    `root/<class>/**/<image>` gives labels from the sorted class-folder names;
    a root holding only image files gives label -1 for all. A file that cannot be
    read gives empty bytes, which the decoder counts as a bad record.
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"c.data.data_dir: image folder {root!r} does not exist")
        entries = sorted(os.listdir(root))
        classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        paths, labels = [], []
        if classes:
            for label, name in enumerate(classes):
                for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                    dirnames.sort()
                    for f in sorted(filenames):
                        if f.lower().endswith(IMAGE_EXTENSIONS):
                            paths.append(os.path.join(dirpath, f))
                            labels.append(label)
        else:
            paths = [os.path.join(root, e) for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
            labels = [-1] * len(paths)
        if not paths:
            raise ValueError(
                f"c.data.data_dir: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root!r} "
                "or its class sub-folders"
            )
        self.root = root
        self.classes = classes
        self._paths = paths
        self._labels = labels

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self._paths[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        return {"image": data, "label": self._labels[index], "path": path}

    def labels(self) -> np.ndarray:
        """int64 [N], -1 for a flat folder."""
        return np.asarray(self._labels, np.int64)

    def num_classes(self) -> int:
        return len(self.classes)

    def file_names(self) -> list[str]:
        """Each record's file name without its folder, e.g. 'n01440764_10026.JPEG'."""
        return [os.path.basename(p) for p in self._paths]

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, num_records={len(self)}, num_classes={len(self.classes)})"


class TfdsSource:
    """A TFDS ArrayRecord data set, images left encoded (decoded by our pipeline)."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # heavy import, only when used

        try:
            self._source = tfds.data_source(
                name,
                split=split,
                data_dir=data_dir or None,
                download=False,
                decoders={"image": tfds.decode.SkipDecoding()},
            )
        except Exception as e:  # tfds raises many types for missing data
            raise ValueError(
                f"c.data.name={name!r}, split={split!r}, c.data.data_dir={data_dir!r}: cannot "
                f"open the TFDS data set as ArrayRecord ({type(e).__name__}: {e}). Prepare it "
                "with `tfds build` (file_format=array_record), or convert TFRecord files with "
                "`tfds convert_format --out_file_format=array_record`."
            ) from e
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": record["image"], "label": int(record.get("label", -1))}

    def _column(self, key: str, default: Any) -> list[Any]:
        # ArrayRecord rows are whole examples: reading a field reads the record.
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda i: self._source[i].get(key, default), range(len(self))))

    def labels(self) -> np.ndarray:
        """int64 [N] (-1 without a 'label' feature); reads every record once."""
        return np.asarray(self._column("label", -1), np.int64)

    def num_classes(self) -> int:
        try:  # a ClassLabel feature knows its classes; otherwise scan the labels
            return int(self._source.dataset_info.features["label"].num_classes)
        except (AttributeError, KeyError, TypeError):
            return int(self.labels().max()) + 1

    def file_names(self) -> list[str]:
        """The 'file_name' feature (imagenet2012 has it); reads every record once."""
        names = self._column("file_name", None)
        if any(n is None for n in names):
            raise ValueError(f"the TFDS data set {self.name!r} has no 'file_name' feature to match a subset file")
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, num_records={len(self)})"


class SubsetSource:
    """The records `indices` of `source`, in that order (labels and names follow)."""

    def __init__(self, source, indices: Sequence[int]):
        indices = np.asarray(indices, np.int64)
        if indices.ndim != 1 or len(indices) == 0:
            raise ValueError(f"SubsetSource: indices must be a non-empty list, got shape {indices.shape}")
        if indices.min() < 0 or indices.max() >= len(source):
            raise ValueError(f"SubsetSource: indices must lie in [0, {len(source)}) for {source!r}")
        self._source = source
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]

    def labels(self) -> np.ndarray:
        return self._source.labels()[self._indices]

    def num_classes(self) -> int:
        return self._source.num_classes()

    def file_names(self) -> list[str]:
        names = self._source.file_names()
        return [names[i] for i in self._indices]

    def __repr__(self) -> str:
        return f"SubsetSource({self._source!r}, num_records={len(self)})"


def digits_source(split: str, image_size: int) -> ArraySource:
    """scikit-learn's digits as uint8 RGB [N, S, S, 3]; 'train' first 80%, 'test' the rest."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', got split {split!r}")
    if image_size < 0:
        raise ValueError(f"c.data.image_size must be >= 0, got {image_size}")
    digits = load_digits()
    # Values are 0..16; scale to 0..255 before resizing.
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    size = image_size or grey.shape[1]
    if size != grey.shape[1]:
        grey = np.stack(
            [np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in grey]
        )
    images = np.repeat(grey[..., None], 3, axis=-1)
    n_train = int(len(images) * DIGITS_TRAIN_FRACTION)
    part = slice(0, n_train) if split == "train" else slice(n_train, None)
    return ArraySource(images[part], digits.target[part])


def make_source(data_config, split: str):
    """The data source `data_config.source` names, for `split`.

    Args:
      data_config: `config.data` (source, name, data_dir, split, image_size).
      split: e.g. `data_config.split` or `data_config.eval_split`.
    Returns:
      a grain RandomAccessDataSource of {'image', 'label'} records.
    """
    kind = data_config.source
    if kind == "tfds":
        source = TfdsSource(data_config.name, split, data_config.data_dir)
    elif kind == "folder":
        root = data_config.data_dir
        if not root:
            raise ValueError("c.data.data_dir must name the image folder for c.data.source='folder'")
        split_root = os.path.join(root, split)
        if os.path.isdir(split_root):
            root = split_root
        elif split != data_config.split:
            raise ValueError(
                f"c.data.data_dir={root!r} has no folder {split!r} for that split; only the "
                f"training split ({data_config.split!r}) may use the root folder itself"
            )
        source = FolderSource(root)
    elif kind == "digits":
        source = digits_source(split, data_config.image_size)
    else:
        raise ValueError(f"c.data.source must be 'tfds', 'folder' or 'digits', got {kind!r}")
    if len(source) == 0:
        raise ValueError(f"c.data: the {kind} data set {source!r} (split {split!r}) is empty")
    return source
