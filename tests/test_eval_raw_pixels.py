"""The raw-pixel kNN baseline (eval/knn_top1_raw_pixels) against a float64 NumPy restatement,
alone and as the trainer writes it at the end of a run."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import tiny_config
from swav_jax.eval.run import knn_eval_raw_pixels
from swav_jax.train.loop import train

CLASSES = ("a", "b", "c")
SIZE = 8  # images are 8 x 8; evaluated at 7 px: the evaluation transform then only crops
EVAL_SIZE = 7


def _write_folder(root, seed=0, per_class=(24, 8)):
    """root/{train,test}/<class>/*.png: a mid-grey background plus a per-class pattern and
    noise, the two scaled per image by a random contrast in [0.2, 3]. Cosines of centred
    pixels ignore that contrast; uncentred ones do not (the test checks that the two
    differ). Returns {split: (uint8 [N, 8, 8, 3], labels [N])} in the folder source's
    order (class, then file name)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(120, 136, size=(SIZE, SIZE, 3))
    patterns = rng.normal(0, 4, size=(len(CLASSES), SIZE, SIZE, 3))
    out = {}
    for split, n in zip(("train", "test"), per_class):
        images, labels = [], []
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name))
            for i in range(n):
                contrast = rng.uniform(0.2, 3.0)
                deviation = contrast * (patterns[label] + rng.normal(0, 20, size=(SIZE, SIZE, 3)))
                image = np.clip(background + deviation, 0, 255).astype(np.uint8)
                Image.fromarray(image).save(os.path.join(root, split, name, f"{i:03d}.png"))
                images.append(image)
                labels.append(label)
        out[split] = (np.stack(images), np.array(labels))
    return out


def _reference_knn(train, train_labels, test, test_labels, *, k, temperature, num_classes, centre=True):
    """Written from the protocol in float64: mean-centred pixels (mean of the bank), cosine
    similarity, the k most similar bank images vote exp(s / T) for their labels."""
    train = train.reshape(len(train), -1).astype(np.float64) / 255.0
    test = test.reshape(len(test), -1).astype(np.float64) / 255.0
    if centre:
        mean = train.mean(axis=0)
        train, test = train - mean, test - mean
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for row, label in zip(test @ train.T, test_labels):
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.bincount(train_labels[nearest], weights=np.exp(row[nearest] / temperature), minlength=num_classes)
        order = np.argsort(-votes, kind="stable")
        top1 += order[0] == label
        top5 += label in order[: min(5, num_classes)][votes[order[: min(5, num_classes)]] > 0]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def _config(root):
    c = tiny_config.get_config()
    c.data.source = "folder"
    c.data.data_dir = str(root)
    c.data.split, c.data.eval_split = "train", "test"
    c.eval.image_size = EVAL_SIZE
    c.eval.knn_k = (5, 20)
    c.eval.knn_temperature = 0.1
    return c


def _cropped(images):
    # The evaluation transform at 7 px on 8 px images: shorter side to round(7 * 256 / 224)
    # = 8 (no resize), centre crop 7 from the offset (8 - 7) // 2 = 0.
    return images[:, :EVAL_SIZE, :EVAL_SIZE]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    return root, _write_folder(root)


def _expected(data, k, temperature):
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    return _reference_knn(
        _cropped(xtr), ytr, _cropped(xte), yte, k=k, temperature=temperature, num_classes=len(CLASSES)
    )


def test_raw_pixel_knn_matches_float64_reference(folder):
    root, data = folder
    config = _config(root)
    result = knn_eval_raw_pixels(config)
    assert set(result) == {
        "eval/knn_top1_raw_pixels", "eval/knn_top5_raw_pixels",
        "eval/knn_top1@20_raw_pixels", "eval/knn_top5@20_raw_pixels",
    }
    for k, at in ((5, ""), (20, "@20")):
        top1, top5 = _expected(data, k, 0.1)
        assert result[f"eval/knn_top1{at}_raw_pixels"] == pytest.approx(top1, abs=1e-9), k
        assert result[f"eval/knn_top5{at}_raw_pixels"] == pytest.approx(top5, abs=1e-9), k
    # The data are built so that centring matters: uncentred pixels classify worse.
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    uncentred, _ = _reference_knn(
        _cropped(xtr), ytr, _cropped(xte), yte, k=5, temperature=0.1, num_classes=3, centre=False
    )
    assert result["eval/knn_top1_raw_pixels"] - uncentred > 20, uncentred


@pytest.mark.slow
def test_trainer_writes_the_raw_pixel_baseline_at_the_end(folder, tmp_path):
    root, data = folder
    config = _config(root)
    config.eval.knn_k = (5,)
    config.eval.knn_at_end = True
    config.eval.knn_raw_pixels = True
    config.batch_size = 24  # 72 training images: 3 steps
    train(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    last = records[-1]
    assert last["step"] == 3
    top1, top5 = _expected(data, 5, 0.1)
    assert last["eval/knn_top1_raw_pixels"] == pytest.approx(top1, abs=1e-9)
    assert last["eval/knn_top5_raw_pixels"] == pytest.approx(top5, abs=1e-9)
    assert "eval/knn_top1" in last and "eval/knn_top1_random_init" not in last
