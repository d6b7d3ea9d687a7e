"""Evaluation programs over a checkpoint: kNN, the linear probe (on augmented images, the
release's protocol, or on cached features) and semi-supervised fine-tuning.

Used by `swav-jax eval knn|linear|finetune`, by the trainer's online kNN monitor and at
the end of the demo. Frozen features are the pooled backbone output with eval-mode
BatchNorm, of images resized and centre-cropped to `eval.image_size` (0: the first crop
resolution); the image protocols train on RandomResizedCrop crops of that size
(docs/ALGORITHM.md section 11). The raw-pixel baseline (`knn_eval_raw_pixels`) runs the
same kNN on the mean-centred pixels of the evaluation images.
"""

from __future__ import annotations

import functools
import hashlib
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
from swav_jax.eval import images, subsets
from swav_jax.eval.features import extract_features
from swav_jax.eval.knn import knn_classify
from swav_jax.eval.linear import init_linear, linear_apply, probe_lr, train_linear_probe
from swav_jax.methods.scaffold import init_variables
from swav_jax.models import ResNet, build_backbone, build_model
from swav_jax.models.swav import torch_linear_bias_init, torch_linear_kernel_init
from swav_jax.train.checkpoint import newest_that_restores


def load_variables(path: str) -> tuple[dict[str, Any], int]:
    """({'params', 'batch_stats'}, step) from a training workdir or a checkpoint folder.

    `path` may be a workdir or its checkpoints/ folder (the newest checkpoint that
    restores: damaged ones are skipped with a warning), one step folder
    (checkpoints/<step>), or a folder written by `swav-jax convert` (step -1).
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    if steps and not os.path.isdir(os.path.join(path, "state")):
        step, variables, _ = newest_that_restores(
            path, steps, lambda s: convert.load_variables(os.path.join(path, str(s), "state"))
        )
        return variables, step
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


def eval_image_size(config: ml_collections.ConfigDict) -> int:
    """Side of the evaluated images: eval.image_size, or the first crop resolution."""
    return int(config.eval.image_size or config.crops.size_crops[0])


def _eval_batch_per_process(config: ml_collections.ConfigDict) -> int:
    return int(config.eval.batch_size) // jax.process_count()


def _split_features(config, fn: Partial, split: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """fn(uint8 images [b, S, S, 3]) -> [b, F] over one split of `config.data` (the
    evaluation transform at S = eval.image_size or the first crop size); features, labels."""
    source = sources.make_source(config.data, split)
    batches = eval_batches(source, size=eval_image_size(config), batch_size=_eval_batch_per_process(config))
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
    mesh = images.eval_mesh()
    train_x, train_y = extract_split(config, variables, config.data.split, mesh)
    test_x, test_y = extract_split(config, variables, config.data.eval_split, mesh)
    return _knn_results(config, train_x, train_y, test_x, test_y, mesh, suffix)


def knn_reference_levels(config: ml_collections.ConfigDict) -> dict:
    """The reference levels `config.eval` asks for, beside a learned kNN: the same network
    at random initialisation (keys ending '_random_init', with eval.knn_random_init) and
    mean-centred raw pixels ('_raw_pixels', with eval.knn_raw_pixels); {} for neither."""
    results = {}
    if config.eval.knn_random_init:
        results.update(knn_eval(config, random_init_variables(config), suffix="_random_init"))
    if config.eval.knn_raw_pixels:
        results.update(knn_eval_raw_pixels(config))
    return results


def knn_eval_raw_pixels(config: ml_collections.ConfigDict) -> dict:
    """The same kNN as `knn_eval` on mean-centred pixels instead of network features: the
    evaluation images (same transform and size) flattened to S * S * 3 values in [0, 1],
    minus the mean image of the bank (train split), for bank and queries alike. Returns
    {'eval/knn_top1_raw_pixels': %, ...}. Host memory: (N + M) x S * S * 3 float32 (4660
    images at 32 px: 57 MB), so meant for small data sets, not ImageNet."""
    mesh = images.eval_mesh()
    pixels = Partial(_pixels)
    train_x, train_y = _split_features(config, pixels, config.data.split, mesh)
    test_x, test_y = _split_features(config, pixels, config.data.eval_split, mesh)
    mean = train_x.mean(axis=0, dtype=np.float64).astype(train_x.dtype)
    return _knn_results(config, train_x - mean, train_y, test_x - mean, test_y, mesh, "_raw_pixels")


def linear_features_eval(config: ml_collections.ConfigDict, variables: dict[str, Any]) -> dict:
    """The linear probe on cached frozen features (the fast variant of the release's
    protocol: same optimiser and schedule, no crop augmentation). Returns
    {'eval/linear_features_top1_final': %, ..._top5_final, ..._top1_best, ..._top5_best}."""
    mesh = images.eval_mesh()
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
    return {
        "eval/linear_features_top1_final": metrics["test_top1"],
        "eval/linear_features_top5_final": metrics["test_top5"],
        "eval/linear_features_top1_best": metrics["best_test_top1"],
        "eval/linear_features_top5_best": metrics["best_test_top5"],
    }


def _probe_forward(frozen, params, batch_stats, images_, train):
    del train  # the trunk is always in eval mode
    return linear_apply(params, jax.lax.stop_gradient(frozen(images_))), batch_stats


def probe_classifier(
    config: ml_collections.ConfigDict, variables: dict[str, Any], num_classes: int, evaluated: str
) -> images.Classifier:
    """The release's linear probe: the frozen trunk of `variables` in eval mode (`feature_fn`),
    a Linear(F, C) head (`linear.init_linear`, key from config.seed) trained with
    eval.linear_lr on the per-epoch cosine, eval.linear_weight_decay, eval.linear_epochs,
    global batch eval.linear_batch_size. `evaluated` names the checkpoint (settings)."""
    e = config.eval
    epochs, lr = int(e.linear_epochs), float(e.linear_lr)
    feature_dim = build_backbone(config.model).num_features
    key = jax.random.split(jax.random.key(int(config.seed)))[0]
    return images.Classifier(
        name="linear",
        forward=_probe_forward,
        frozen=feature_fn(config, variables),
        init=lambda: (jax.jit(init_linear, static_argnums=(1, 2))(key, feature_dim, num_classes), {}),
        learning_rates=lambda epoch: probe_lr(lr, epoch, epochs),
        epochs=epochs,
        batch_size=int(e.linear_batch_size),
        momentum=0.9,
        weight_decay=float(e.linear_weight_decay),
        settings={
            **_image_settings(config, evaluated, num_classes),
            "epochs": epochs, "batch_size": int(e.linear_batch_size), "lr": lr,
            "weight_decay": float(e.linear_weight_decay),
        },
    )


def _finetune_forward(backbone: ResNet, frozen, params, batch_stats, images_, train):
    mean, std = frozen
    trunk = {"params": params["backbone"], "batch_stats": batch_stats}
    x = normalize(images_, mean, std, backbone.dtype)
    if train:
        features, updated = backbone.apply(trunk, x, True, mutable=["batch_stats"])
        batch_stats = updated["batch_stats"]
    else:
        features = backbone.apply(trunk, x, False)
    return linear_apply(params["head"], features), batch_stats


def multistep_lr(base_lr: float, epoch: int, decay_epochs, gamma: float) -> float:
    """torch MultiStepLR stepped once per epoch: base_lr * gamma ** #{d in decay_epochs: d <= epoch}."""
    return base_lr * gamma ** sum(int(d) <= epoch for d in decay_epochs)


def finetune_classifier(
    config: ml_collections.ConfigDict, variables: dict[str, Any], num_classes: int, evaluated: str, name: str,
    *, subset: str = "",
) -> images.Classifier:
    """The release's semi-supervised fine-tuning: the whole trunk of `variables` plus a new
    Linear(F, C) head (PyTorch's default init, key from config.seed), BatchNorm in train
    mode over the global batch; SGD momentum 0.9, no weight decay, eval.finetune.lr for the
    trunk and eval.finetune.lr_head for the head, both multiplied by eval.finetune.gamma
    at each of eval.finetune.decay_epochs. `evaluated` names the checkpoint and `subset`
    the training images (both recorded in the settings)."""
    f = config.eval.finetune
    backbone = build_backbone(config.model, bn_axis_name=images.DATA_AXIS)
    dim = backbone.num_features
    lr, lr_head, gamma, decay = float(f.lr), float(f.lr_head), float(f.gamma), tuple(int(d) for d in f.decay_epochs)

    def init():
        k_kernel, k_bias = jax.random.split(jax.random.split(jax.random.key(int(config.seed)))[0])
        head = {
            "kernel": torch_linear_kernel_init(k_kernel, (dim, num_classes), jnp.float32),
            "bias": torch_linear_bias_init(dim)(k_bias, (num_classes,), jnp.float32),
        }
        params = {"backbone": variables["params"]["backbone"], "head": head}
        return params, variables["batch_stats"]["backbone"]

    return images.Classifier(
        name=name,
        forward=functools.partial(_finetune_forward, backbone),
        frozen=(np.asarray(config.augment.mean, np.float32), np.asarray(config.augment.std, np.float32)),
        init=init,
        learning_rates=lambda epoch: {
            "backbone": multistep_lr(lr, epoch, decay, gamma), "head": multistep_lr(lr_head, epoch, decay, gamma)
        },
        epochs=int(f.epochs),
        batch_size=int(f.batch_size),
        momentum=0.9,
        weight_decay=0.0,
        settings={
            **_image_settings(config, evaluated, num_classes),
            "epochs": int(f.epochs), "batch_size": int(f.batch_size), "lr": lr, "lr_head": lr_head,
            "decay_epochs": list(decay), "gamma": gamma, "subset": subset,
        },
    )


def _image_settings(config, evaluated: str, num_classes: int) -> dict[str, Any]:
    return {
        "evaluated": evaluated,
        "data": config.data.to_dict(),
        "model": config.model.to_dict(),
        "image_size": eval_image_size(config),
        "crop_scale": [float(x) for x in config.eval.crop_scale],
        "seed": int(config.seed),
        "num_classes": num_classes,
    }


def _run_image_protocol(config, classifier, train_source, directory, *, max_epochs) -> dict:
    mesh = images.eval_mesh()
    data = images.augmented_batches(
        config, train_source, mesh, batch_size=classifier.batch_size, size=eval_image_size(config),
        crop_scale=tuple(config.eval.crop_scale),
    )
    eval_source = sources.make_source(config.data, config.data.eval_split)
    _, result = images.train_classifier(
        classifier,
        data,
        lambda: eval_batches(eval_source, size=eval_image_size(config), batch_size=_eval_batch_per_process(config)),
        mesh=mesh,
        num_classes=int(classifier.settings["num_classes"]),
        directory=directory,
        log_every_steps=int(config.log_every_steps),
        max_epochs=max_epochs,
    )
    return result


def linear_eval(
    config: ml_collections.ConfigDict, variables: dict[str, Any], workdir: str, *, evaluated: str = "",
    max_epochs: int | None = None,
) -> dict:
    """The release's linear probe on augmented images of the training split, validated on
    `data.eval_split` after every epoch; checkpoints and per-epoch metrics in
    WORKDIR/linear_probe/. Returns {'eval/linear_top1_final': %, 'eval/linear_top5_final',
    'eval/linear_top1_best', 'eval/linear_top5_best'} (best: the epoch of highest top-1),
    and 'best_epoch', 'epochs_done'."""
    train_source = sources.make_source(config.data, config.data.split)
    classifier = probe_classifier(config, variables, train_source.num_classes(), evaluated)
    result = _run_image_protocol(
        config, classifier, train_source, os.path.join(workdir, "linear_probe"), max_epochs=max_epochs
    )
    return {**images.result_metrics("linear", result), "best_epoch": result["best_epoch"],
            "epochs_done": result["epochs_done"]}


def labelled_subset(config: ml_collections.ConfigDict, source) -> tuple[np.ndarray, str]:
    """(record indices, name) of the fine-tuning subset of `source`: the names listed in
    eval.finetune.subset_file (name 'finetune_<file stem>'), else a class-balanced
    fraction eval.finetune.labels_fraction drawn with config.seed (name 'finetune_<pct>pct')."""
    f = config.eval.finetune
    if f.subset_file:
        stem = os.path.splitext(os.path.basename(f.subset_file))[0]
        wanted = subsets.read_subset_file(f.subset_file)
        return subsets.subset_from_names(source.file_names(), wanted, what=f.subset_file), f"finetune_{stem}"
    fraction = float(f.labels_fraction)
    indices = subsets.balanced_subset(source.labels(), fraction, int(config.seed))
    return indices, f"finetune_{100 * fraction:g}pct"


def finetune_eval(
    config: ml_collections.ConfigDict, variables: dict[str, Any], workdir: str, *, evaluated: str = "",
    max_epochs: int | None = None,
) -> dict:
    """The release's semi-supervised fine-tuning on the labelled subset (`labelled_subset`)
    of the training split, validated on `data.eval_split` after every epoch; checkpoints,
    per-epoch metrics and the subset's list (subset.txt: file names, else record indices)
    in WORKDIR/<name>/. Returns {'eval/<name>_top1_final': %, ..._top5_final, ..._top1_best,
    ..._top5_best}, 'best_epoch', 'epochs_done', 'subset_size'."""
    source = sources.make_source(config.data, config.data.split)
    indices, name = labelled_subset(config, source)
    subset = sources.SubsetSource(source, indices)
    if int(config.eval.finetune.batch_size) > len(subset):
        raise ValueError(
            f"config.eval.finetune.batch_size={config.eval.finetune.batch_size} exceeds the {len(subset)} "
            "images of the labelled subset: use a smaller batch"
        )
    described = f"{len(indices)} images, sha1 of indices {hashlib.sha1(indices.tobytes()).hexdigest()[:16]}"
    classifier = finetune_classifier(config, variables, source.num_classes(), evaluated, name, subset=described)
    directory = os.path.join(workdir, name)
    if jax.process_index() == 0:
        _write_subset(directory, source, indices)
    result = _run_image_protocol(config, classifier, subset, directory, max_epochs=max_epochs)
    return {**images.result_metrics(name, result), "best_epoch": result["best_epoch"],
            "epochs_done": result["epochs_done"], "subset_size": len(indices)}


def _write_subset(directory: str, source, indices: np.ndarray) -> None:
    """WORKDIR/<name>/subset.txt: the subset's file names for a folder source (the SimCLR
    format), else its record indices (names of TFDS records would cost a pass over the data)."""
    os.makedirs(directory, exist_ok=True)
    if isinstance(source, sources.FolderSource):
        names = source.file_names()
        lines = [names[i] for i in indices]
    else:
        lines = [str(i) for i in indices]
    with open(os.path.join(directory, "subset.txt"), "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
