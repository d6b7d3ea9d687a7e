"""Evaluation programs over a checkpoint: kNN and linear probe on frozen features.

Used by `swav-jax eval knn|linear`, by the trainer's online kNN monitor and at the end
of the demo. Features are the pooled backbone output with eval-mode BatchNorm, of
images resized and centre-cropped to the first crop resolution (SPEC §8). The
raw-pixel baseline (`knn_eval_raw_pixels`) runs the same kNN on the mean-centred pixels
of those images.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from swav_jax import convert
from swav_jax.data import sources
from swav_jax.data.augment import normalize
from swav_jax.data.eval_batches import eval_batches
from swav_jax.eval.features import extract_features
from swav_jax.eval.knn import knn_classify
from swav_jax.eval.linear import train_linear_probe
from swav_jax.methods.scaffold import init_variables
from swav_jax.models import ResNet, build_backbone, build_model


def load_variables(path: str) -> tuple[dict[str, Any], int]:
    """({'params', 'batch_stats'}, step) from a training workdir or a checkpoint folder.

    `path` may be a workdir (its latest checkpoint under checkpoints/), a checkpoints/
    folder, one step folder (checkpoints/<step>), or a folder written by `swav-jax
    convert` (step -1).
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    if steps and not os.path.isdir(os.path.join(path, "state")):
        path = os.path.join(path, str(max(steps)))
    step = int(os.path.basename(path)) if os.path.basename(path).isdigit() else -1
    if os.path.isdir(os.path.join(path, "state")):
        path = os.path.join(path, "state")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return convert.load_variables(path), step


def random_init_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The network of `config` at initialisation (the seed of `config.seed`), for baselines.

    Every method's trunk is `config.model`'s ResNet: this is SwAV's network at
    initialisation, whose backbone is what the evaluations read."""
    init = jax.jit(lambda key: init_variables(build_model(config.model), config, key))
    variables = init(jax.random.key(config.seed))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _apply_features(backbone: ResNet, mean, std, variables, images):
    trunk = {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}
    return backbone.apply(trunk, normalize(images, mean, std, backbone.dtype), False)


@functools.cache
def _features_of(backbone: ResNet) -> Callable:
    # One function object per (hashable) backbone: jit caches on it, so evaluating other
    # weights of the same architecture reuses the compiled program.
    return functools.partial(_apply_features, backbone)


def feature_fn(config: ml_collections.ConfigDict, variables: dict[str, Any]) -> Partial:
    """uint8 images [b, H, W, 3] -> pooled features [b, F] float32 of the trunk under
    `variables['params']['backbone']` (every method keeps it there), as a jittable pytree."""
    mean = jnp.asarray(config.augment.mean, jnp.float32)
    std = jnp.asarray(config.augment.std, jnp.float32)
    # The module is static (bound into the function); normalisation constants and
    # weights are traced arguments, so one compiled program serves every checkpoint.
    return Partial(_features_of(build_backbone(config.model)), mean, std, variables)


def _eval_mesh():
    return jax.make_mesh((jax.device_count(),), ("data",))


def _split_features(config, fn: Partial, split: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """fn(uint8 images [b, S, S, 3]) -> [b, F] over one split of `config.data` (the
    evaluation transform at S = eval.image_size or the first crop size); features, labels."""
    source = sources.make_source(config.data, split)
    size = int(config.eval.image_size or config.crops.size_crops[0])
    batch_size = int(config.eval.batch_size) // jax.process_count()
    batches = eval_batches(source, size=size, batch_size=batch_size)
    features, labels = extract_features(fn, batches, mesh=mesh, dtype=np.dtype(config.eval.feature_dtype))
    keep = labels >= 0
    return features[keep], labels[keep]


def extract_split(config, variables, split: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features and labels of one split of `config.data`."""
    replicated = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return _split_features(config, feature_fn(config, replicated), split, mesh)


def _pixels(images: jax.Array) -> jax.Array:
    """uint8 [b, H, W, 3] -> [b, H * W * 3] float32 in [0, 1]."""
    return images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0


def _num_classes(*label_arrays: np.ndarray) -> int:
    return int(max(int(np.max(a)) for a in label_arrays)) + 1


def _knn_results(config, train_x, train_y, test_x, test_y, mesh, suffix: str) -> dict:
    ks = tuple(int(k) for k in config.eval.knn_k)
    result = knn_classify(
        train_x, train_y, test_x, test_y,
        num_classes=_num_classes(train_y, test_y),
        ks=ks,
        temperature=float(config.eval.knn_temperature),
        mesh=mesh,
    )
    out = {}
    for i, k in enumerate(ks):
        at = "" if i == 0 else f"@{k}"
        out[f"eval/knn_top1{at}{suffix}"] = result[k]["top1"]
        out[f"eval/knn_top5{at}{suffix}"] = result[k]["top5"]
    return out


def knn_eval(config: ml_collections.ConfigDict, variables: dict[str, Any], *, suffix: str = "") -> dict:
    """Weighted kNN (k = config.eval.knn_k, T = config.eval.knn_temperature) on the train
    split as the bank and `data.eval_split` as queries. Returns {'eval/knn_top1': %, ...};
    the first k gives the plain keys, others e.g. 'eval/knn_top1@200'; `suffix` is
    appended to every key (e.g. '_random_init')."""
    mesh = _eval_mesh()
    train_x, train_y = extract_split(config, variables, config.data.split, mesh)
    test_x, test_y = extract_split(config, variables, config.data.eval_split, mesh)
    return _knn_results(config, train_x, train_y, test_x, test_y, mesh, suffix)


def knn_eval_raw_pixels(config: ml_collections.ConfigDict) -> dict:
    """The same kNN as `knn_eval` on mean-centred pixels instead of network features: the
    evaluation images (same transform and size) flattened to S * S * 3 values in [0, 1],
    minus the mean image of the bank (train split), for bank and queries alike. Returns
    {'eval/knn_top1_raw_pixels': %, ...}. Host memory: (N + M) x S * S * 3 float32 (4660
    images at 32 px: 57 MB), so meant for small data sets, not ImageNet."""
    mesh = _eval_mesh()
    pixels = Partial(_pixels)
    train_x, train_y = _split_features(config, pixels, config.data.split, mesh)
    test_x, test_y = _split_features(config, pixels, config.data.eval_split, mesh)
    mean = train_x.mean(axis=0, dtype=np.float64).astype(train_x.dtype)
    return _knn_results(config, train_x - mean, train_y, test_x - mean, test_y, mesh, "_raw_pixels")


def linear_eval(config: ml_collections.ConfigDict, variables: dict[str, Any]) -> dict:
    """The linear probe on cached frozen features (the fast variant of SPEC §8's protocol:
    same optimiser and schedule, no crop augmentation). Returns {'eval/linear_top1': %, ...}."""
    mesh = _eval_mesh()
    train_x, train_y = extract_split(config, variables, config.data.split, mesh)
    test_x, test_y = extract_split(config, variables, config.data.eval_split, mesh)
    _, metrics = train_linear_probe(
        train_x, train_y, test_x, test_y,
        num_classes=_num_classes(train_y, test_y),
        epochs=int(config.eval.linear_epochs),
        batch_size=int(config.eval.linear_batch_size),
        lr=float(config.eval.linear_lr),
        weight_decay=float(config.eval.linear_weight_decay),
        seed=int(config.seed),
    )
    return {"eval/linear_top1": metrics["test_top1"], "eval/linear_top5": metrics["test_top5"]}
