"""Labelled subsets for semi-supervised fine-tuning: class-balanced by a seed, or a list
of file names (the SimCLR subset files the release fine-tunes on: one image file name per
line, e.g. `n01440764_10026.JPEG`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of round(fraction x L) of the L labelled records (label >= 0), spread as
    evenly as possible over the classes present.

    Every class gets the same count, or one more (the classes receiving the remainder
    are drawn with the seed); a class with fewer records gives all of them and the
    others share its deficit. At least one record per class. Within a class the records
    are a seeded random choice.

    Args:
      labels: int [N], -1 for unlabeled records (never chosen).
      fraction: in (0, 1].
      seed: the draw's seed (np.random.default_rng).

    Returns:
      int64 [M], sorted record indices.
    """
    labels = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the labels fraction must be in (0, 1], got {fraction}")
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise ValueError("the training split has no labelled records to choose a subset from")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labelled])
    members = [rng.permutation(labelled[labels[labelled] == c]) for c in classes]
    sizes = np.array([len(m) for m in members])
    remaining = max(len(classes), int(round(fraction * len(labelled))))
    take = np.zeros_like(sizes)
    while remaining > 0:
        open_classes = np.flatnonzero(take < sizes)
        share = remaining // len(open_classes)
        if share == 0:
            take[rng.choice(open_classes, remaining, replace=False)] += 1
            break
        added = np.minimum(share, sizes[open_classes] - take[open_classes])
        take[open_classes] += added
        remaining -= int(added.sum())
    return np.sort(np.concatenate([m[:k] for m, k in zip(members, take)])).astype(np.int64)


def read_subset_file(path: str) -> list[str]:
    """The file names listed in `path`, one per line (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ValueError(f"cannot read the subset file {path!r}: {e}") from None
    if not names:
        raise ValueError(f"the subset file {path!r} lists no file names")
    return names


def subset_from_names(file_names: Sequence[str], wanted: Sequence[str], *, what: str = "the subset file") -> np.ndarray:
    """Indices of the records named `wanted`, in its order.

    Raises ValueError naming the first missing, repeated or ambiguous names.
    """
    where: dict[str, int] = {}
    ambiguous = set()
    for i, name in enumerate(file_names):
        if name in where:
            ambiguous.add(name)
        where[name] = i
    missing = [n for n in wanted if n not in where]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(wanted)} names in {what} are not in the training split "
            f"(first: {missing[:3]})"
        )
    clashes = sorted(ambiguous.intersection(wanted))
    if clashes:
        raise ValueError(f"names in {what} match several training records: {clashes[:3]}")
    if len(set(wanted)) != len(wanted):
        seen, repeated = set(), []
        for n in wanted:
            if n in seen:
                repeated.append(n)
            seen.add(n)
        raise ValueError(f"{what} lists names more than once: {repeated[:3]}")
    return np.array([where[n] for n in wanted], np.int64)
