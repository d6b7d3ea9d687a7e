"""Labelled subsets for fine-tuning: class-balanced by a seed, or exactly a file's list."""

import os

import numpy as np
import pytest
from PIL import Image

import tiny_config
from swav_jax.data.sources import FolderSource, SubsetSource, digits_source
from swav_jax.eval.run import labelled_subset
from swav_jax.eval.subsets import balanced_subset, read_subset_file, subset_from_names


def _labels(sizes, unlabeled=0, seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)] + [np.full(unlabeled, -1)])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.37, 1.0])
def test_balanced_subset_is_class_balanced(fraction):
    labels = _labels([130, 120, 110, 100, 90, 80, 75, 75, 60, 60], unlabeled=40)
    chosen = balanced_subset(labels, fraction, seed=3)
    labelled = int((labels >= 0).sum())
    assert len(chosen) == max(10, round(fraction * labelled))
    assert len(np.unique(chosen)) == len(chosen) and np.all(np.diff(chosen) > 0)
    assert np.all(labels[chosen] >= 0)
    counts = np.bincount(labels[chosen], minlength=10)
    sizes = np.bincount(labels[labels >= 0])
    # Equal shares (within one) except where a class has fewer images than its share.
    full = counts == sizes
    if (~full).any():
        assert counts[~full].max() - counts[~full].min() <= 1
        assert np.all(counts[full] <= counts[~full].min())


def test_balanced_subset_gives_small_classes_all_and_follows_the_seed():
    labels = _labels([100, 100, 3])
    chosen = balanced_subset(labels, 0.3, seed=0)
    counts = np.bincount(labels[chosen])
    assert counts.tolist() == [29, 29, 3]  # round(0.3 x 203) = 61
    again = balanced_subset(labels, 0.3, seed=0)
    np.testing.assert_array_equal(chosen, again)
    assert not np.array_equal(chosen, balanced_subset(labels, 0.3, seed=1))
    with pytest.raises(ValueError, match="fraction"):
        balanced_subset(labels, 0.0, seed=0)
    with pytest.raises(ValueError, match="no labelled"):
        balanced_subset(np.full(5, -1), 0.5, seed=0)


def _image_folder(root, per_class):
    for c, n in enumerate(per_class):
        os.makedirs(root / f"n0{c}", exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((4, 4, 3), 10 * c + i, np.uint8)).save(root / f"n0{c}" / f"n0{c}_{i}.png")


def test_subset_file_is_followed_exactly(tmp_path):
    _image_folder(tmp_path / "data" / "train", [4, 5, 3])
    config = tiny_config.get_config()
    config.data.source = "folder"
    config.data.data_dir = str(tmp_path / "data")
    listed = ["n02_1.png", "n00_3.png", "n01_0.png", "n01_4.png"]
    (tmp_path / "1percent.txt").write_text("\n".join(listed) + "\n\n")
    config.eval.finetune.subset_file = str(tmp_path / "1percent.txt")
    source = FolderSource(str(tmp_path / "data" / "train"))
    indices, name = labelled_subset(config, source)
    assert name == "finetune_1percent"
    subset = SubsetSource(source, indices)
    assert subset.file_names() == listed
    assert subset.labels().tolist() == [2, 0, 1, 1]
    assert [subset[i]["label"] for i in range(4)] == [2, 0, 1, 1]
    assert subset[0]["path"].endswith(os.path.join("n02", "n02_1.png"))

    (tmp_path / "bad.txt").write_text("n00_3.png\nn09_9.png\n")
    with pytest.raises(ValueError, match=r"1 of the 2 names .*'n09_9.png'"):
        subset_from_names(source.file_names(), read_subset_file(str(tmp_path / "bad.txt")))
    with pytest.raises(ValueError, match="more than once"):
        subset_from_names(source.file_names(), ["n00_3.png", "n00_3.png"])
    with pytest.raises(ValueError, match="lists no file names"):
        (tmp_path / "empty.txt").write_text("\n")
        read_subset_file(str(tmp_path / "empty.txt"))


def test_fraction_subset_on_the_digits():
    config = tiny_config.get_config()
    config.eval.finetune.labels_fraction = 0.1
    source = digits_source("train", 16)
    indices, name = labelled_subset(config, source)
    assert name == "finetune_10pct" and len(indices) == 144
    counts = np.bincount(source.labels()[indices], minlength=10)
    assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="no file names"):
        source.file_names()
