"""Config validation, once, before anything is built or compiled: a bad value names its
key. The keys every method shares are checked here; each method checks its own
(`Method.validate`)."""

from __future__ import annotations

import ml_collections

from swav_jax.checks import is_int, is_real, non_negative_int, positive_int, real, require
from swav_jax.methods import get_method, method_names
from swav_jax.optim import LARS_MODES

_SOURCES = ("tfds", "folder", "digits")
_DTYPES = ("float32", "bfloat16")
_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int) -> None:
    """Raises ConfigError for values that would fail later or silently train wrong."""
    batch = positive_int(config.batch_size, "batch_size")
    require(batch % num_devices == 0, "batch_size", f"global batch {batch} is not divisible by the {num_devices} devices")
    require(batch % num_processes == 0, "batch_size",
            f"global batch {batch} is not divisible by the {num_processes} processes")
    positive_int(config.epochs, "epochs")
    non_negative_int(config.seed, "seed")
    _validate_data(config.data)
    _validate_crops(config.crops)
    _validate_augment(config.augment)
    _validate_model(config.model, num_devices)
    _validate_optim(config.optim, int(config.epochs))
    _validate_eval(config.eval)
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "collapse_warning_steps"):
        positive_int(config[key], key)
    require(config.method in method_names(), "method", f"must be one of {method_names()}, got {config.method!r}")
    get_method(config.method).validate(config)


def _validate_data(data: ml_collections.ConfigDict) -> None:
    require(data.source in _SOURCES, "data.source", f"must be one of {_SOURCES}, got {data.source!r}")
    if data.source == "folder":
        require(bool(data.data_dir), "data.data_dir", "must name the image folder for data.source='folder'")
    if data.source == "tfds":
        require(bool(data.name), "data.name", "must name the TFDS data set for data.source='tfds'")
    if data.source == "digits":
        for key in ("split", "eval_split"):
            require(data[key] in ("train", "test"), f"data.{key}", f"digits has 'train' and 'test', got {data[key]!r}")
    for key in ("split", "eval_split"):
        require(isinstance(data[key], str) and bool(data[key]), f"data.{key}", f"must name a split, got {data[key]!r}")
    for key in ("num_workers", "read_threads", "prefetch", "image_size"):
        non_negative_int(data[key], f"data.{key}")
    positive_int(data.canvas_size, "data.canvas_size")
    require(isinstance(data.drop_remainder, bool), "data.drop_remainder", f"must be True or False, got {data.drop_remainder!r}")


def _validate_crops(crops: ml_collections.ConfigDict) -> None:
    groups = len(crops.size_crops)
    require(groups >= 1, "crops.size_crops", "needs at least one crop resolution")
    for key in ("num_crops", "min_scale_crops", "max_scale_crops"):
        require(len(crops[key]) == groups, f"crops.{key}", f"has {len(crops[key])} entries but crops.size_crops has {groups}")
    for i in range(groups):
        positive_int(crops.size_crops[i], f"crops.size_crops[{i}]")
        positive_int(crops.num_crops[i], f"crops.num_crops[{i}]")
        lo, hi = crops.min_scale_crops[i], crops.max_scale_crops[i]
        require(is_real(lo) and is_real(hi) and 0 < lo <= hi <= 1, f"crops.min_scale_crops[{i}]",
                f"scale range ({lo}, {hi}) must satisfy 0 < min <= max <= 1")
    num_views = sum(crops.num_crops)
    require(num_views >= 2, "crops.num_crops", f"needs at least 2 crops per image, got {num_views}")


def _validate_augment(augment: ml_collections.ConfigDict) -> None:
    # Hue is shifted by up to 0.2 s, and torchvision's hue factor must stay within 0.5.
    real(augment.color_jitter_strength, "augment.color_jitter_strength", low=0.0, high=2.5)
    for key in ("color_jitter_prob", "grayscale_prob", "blur_prob"):
        real(augment[key], f"augment.{key}", low=0.0, high=1.0)
    lo, hi = augment.blur_sigma
    require(is_real(lo) and is_real(hi) and 0 < lo <= hi, "augment.blur_sigma",
            f"must satisfy 0 < min <= max, got {tuple(augment.blur_sigma)}")
    size = augment.blur_kernel_size
    require(is_int(size) and size >= 1 and size % 2 == 1, "augment.blur_kernel_size",
            f"must be a positive odd integer, got {size!r}")
    for key in ("mean", "std"):
        require(len(augment[key]) == 3, f"augment.{key}", f"needs 3 (RGB) values, got {tuple(augment[key])}")
    require(all(is_real(s) and s > 0 for s in augment.std), "augment.std", f"must be > 0, got {tuple(augment.std)}")


def _validate_trunk(model: ml_collections.ConfigDict) -> None:
    require(model.arch in _ARCHS, "model.arch", f"must be one of {_ARCHS}, got {model.arch!r}")
    positive_int(model.width, "model.width")
    positive_int(model.base_width, "model.base_width")
    require(isinstance(model.small_stem, bool), "model.small_stem", f"must be a bool, got {model.small_stem!r}")
    require(model.dtype in _DTYPES, "model.dtype", f"must be one of {_DTYPES}, got {model.dtype!r}")


def _validate_model(model: ml_collections.ConfigDict, num_devices: int) -> None:
    _validate_trunk(model)
    group = model.sync_bn_group_size
    require(is_int(group) and (group == 0 or (group > 0 and num_devices % group == 0)), "model.sync_bn_group_size",
            f"must be 0 (all devices) or divide the {num_devices} devices, got {group!r}")


def _validate_optim(optim: ml_collections.ConfigDict, epochs: int) -> None:
    require(optim.lars_mode in LARS_MODES, "optim.lars_mode", f"must be one of {LARS_MODES}, got {optim.lars_mode!r}")
    real(optim.base_lr, "optim.base_lr", low=0.0, strict=True)
    real(optim.final_lr, "optim.final_lr", low=0.0)
    real(optim.start_warmup, "optim.start_warmup", low=0.0)
    non_negative_int(optim.warmup_epochs, "optim.warmup_epochs")
    require(optim.warmup_epochs <= epochs, "optim.warmup_epochs",
            f"{optim.warmup_epochs} warm-up epochs exceed the run's {epochs} epochs")
    require(isinstance(optim.scale_lr_with_batch, bool), "optim.scale_lr_with_batch",
            f"must be a bool, got {optim.scale_lr_with_batch!r}")
    real(optim.momentum, "optim.momentum", low=0.0)
    require(optim.momentum < 1, "optim.momentum", f"must be in [0, 1), got {optim.momentum!r}")
    real(optim.weight_decay, "optim.weight_decay", low=0.0)
    real(optim.trust_coefficient, "optim.trust_coefficient", low=0.0, strict=True)
    real(optim.lars_eps, "optim.lars_eps", low=0.0)


def _validate_eval(evaluation: ml_collections.ConfigDict) -> None:
    positive_int(evaluation.batch_size, "eval.batch_size")
    non_negative_int(evaluation.image_size, "eval.image_size")
    require(evaluation.feature_dtype in ("float32", "float16"), "eval.feature_dtype",
            f"must be float32 or float16, got {evaluation.feature_dtype!r}")
    require(len(evaluation.knn_k) >= 1, "eval.knn_k", "needs at least one k")
    for i, k in enumerate(evaluation.knn_k):
        positive_int(k, f"eval.knn_k[{i}]")
    real(evaluation.knn_temperature, "eval.knn_temperature", low=0.0, strict=True)
    non_negative_int(evaluation.knn_every_epochs, "eval.knn_every_epochs")
    positive_int(evaluation.linear_epochs, "eval.linear_epochs")
    positive_int(evaluation.linear_batch_size, "eval.linear_batch_size")
    real(evaluation.linear_lr, "eval.linear_lr", low=0.0, strict=True)
    real(evaluation.linear_weight_decay, "eval.linear_weight_decay", low=0.0)
    lo, hi = evaluation.crop_scale
    require(is_real(lo) and is_real(hi) and 0 < lo <= hi <= 1, "eval.crop_scale",
            f"must satisfy 0 < min <= max <= 1, got {tuple(evaluation.crop_scale)}")
    f = evaluation.finetune
    real(f.labels_fraction, "eval.finetune.labels_fraction", low=0.0, high=1.0, strict=True)
    require(isinstance(f.subset_file, str), "eval.finetune.subset_file", f"must be a path or '', got {f.subset_file!r}")
    positive_int(f.epochs, "eval.finetune.epochs")
    positive_int(f.batch_size, "eval.finetune.batch_size")
    real(f.lr, "eval.finetune.lr", low=0.0)
    real(f.lr_head, "eval.finetune.lr_head", low=0.0, strict=True)
    for i, d in enumerate(f.decay_epochs):
        positive_int(d, f"eval.finetune.decay_epochs[{i}]")
    real(f.gamma, "eval.finetune.gamma", low=0.0, strict=True)


def validate_eval_config(
    config: ml_collections.ConfigDict, evaluation: str, *, num_devices: int, num_processes: int
) -> None:
    """The keys `swav-jax eval <evaluation>` reads (knn, linear, finetune): data, the trunk,
    normalisation and eval; the global batch of the image protocols must divide over the
    devices and processes of the 1-D evaluation mesh. Pretraining keys are not checked."""
    _validate_data(config.data)
    _validate_trunk(config.model)
    _validate_augment(config.augment)
    _validate_eval(config.eval)
    non_negative_int(config.seed, "seed")
    positive_int(config.log_every_steps, "log_every_steps")
    if config.eval.image_size == 0:
        positive_int(config.crops.size_crops[0], "crops.size_crops[0]")
    batches = {
        "linear": ("eval.linear_batch_size", config.eval.linear_batch_size),
        "finetune": ("eval.finetune.batch_size", config.eval.finetune.batch_size),
    }
    if evaluation in batches:
        key, batch = batches[evaluation]
        for count, what in ((num_devices, "devices"), (num_processes, "processes")):
            require(batch % count == 0, key, f"global batch {batch} is not divisible by the {count} {what}")
