"""Config validation before anything is compiled: a bad value names its key."""

from __future__ import annotations

import logging

import ml_collections

from swav_jax.train.errors import ConfigError


_METHODS = ("swav", "excb")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def _positive_int(value, key: str) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
             f"must be a positive integer, got {value!r}")
    return value


def effective_queue_length(config: ml_collections.ConfigDict) -> int:
    """The release rounds the queue down to a multiple of the global batch."""
    length = int(config.swav.queue_length)
    return length - length % int(config.batch_size)


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int) -> None:
    """Raises ConfigError for values that would fail later or silently train wrong."""
    batch = _positive_int(config.batch_size, "batch_size")
    _require(batch % num_devices == 0, "batch_size",
             f"global batch {batch} is not divisible by the {num_devices} devices")
    _require(batch % num_processes == 0, "batch_size",
             f"global batch {batch} is not divisible by the {num_processes} processes")
    _positive_int(config.epochs, "epochs")

    crops = config.crops
    groups = len(crops.size_crops)
    _require(groups >= 1, "crops.size_crops", "needs at least one crop resolution")
    for key in ("num_crops", "min_scale_crops", "max_scale_crops"):
        _require(len(crops[key]) == groups, f"crops.{key}",
                 f"has {len(crops[key])} entries but crops.size_crops has {groups}")
    for i in range(groups):
        _positive_int(crops.size_crops[i], f"crops.size_crops[{i}]")
        _positive_int(crops.num_crops[i], f"crops.num_crops[{i}]")
        lo, hi = crops.min_scale_crops[i], crops.max_scale_crops[i]
        _require(0 < lo <= hi <= 1, f"crops.min_scale_crops[{i}]",
                 f"scale range ({lo}, {hi}) must satisfy 0 < min <= max <= 1")
    num_views = sum(crops.num_crops)
    _require(num_views >= 2, "crops.num_crops", f"needs at least 2 crops per image, got {num_views}")

    model = config.model
    _positive_int(model.width, "model.width")
    _require(model.dtype in ("float32", "bfloat16"), "model.dtype",
             f"must be float32 or bfloat16, got {model.dtype!r}")
    group = model.sync_bn_group_size
    _require(group == 0 or (group > 0 and num_devices % group == 0), "model.sync_bn_group_size",
             f"must be 0 (all devices) or divide the {num_devices} devices, got {group}")

    _require(config.method in _METHODS, "method", f"must be one of {_METHODS}, got {config.method!r}")
    if config.method == "excb":
        _validate_excb(config)
    else:
        _validate_swav(config)


def _validate_excb(config: ml_collections.ConfigDict) -> None:
    _require(config.crops.num_crops[0] >= 2, "crops.num_crops",
             f"ExCB's teacher needs at least 2 global crops (the first group), got {config.crops.num_crops[0]}")
    excb = config.excb
    for key in ("num_clusters", "hidden_dim", "proj_dim"):
        _positive_int(excb[key], f"excb.{key}")
    _require(isinstance(excb.hidden_layers, int) and excb.hidden_layers >= 0, "excb.hidden_layers",
             f"must be an integer >= 0, got {excb.hidden_layers!r}")
    for key in ("teacher_temperature", "student_temperature"):
        _require(excb[key] > 0, f"excb.{key}", f"must be > 0, got {excb[key]}")
    for key in ("teacher_momentum", "tracker_momentum"):
        _require(0 <= excb[key] <= 1, f"excb.{key}", f"must be in [0, 1], got {excb[key]}")
    for key in ("centroid_weight_decay", "centroid_weight_decay_end"):
        _require(excb[key] >= 0, f"excb.{key}", f"must be >= 0, got {excb[key]}")
    samples = excb.init_samples
    _require(isinstance(samples, int) and (samples == 0 or samples >= excb.num_clusters), "excb.init_samples",
             f"must be 0 (random unit centroids) or at least excb.num_clusters = {excb.num_clusters} "
             f"(k-means needs a sample per centroid), got {samples!r}")


def _validate_swav(config: ml_collections.ConfigDict) -> None:
    crops, batch = config.crops, config.batch_size
    num_views = sum(crops.num_crops)
    swav = config.swav
    assign = tuple(swav.crops_for_assign)
    _require(len(assign) >= 1 and len(set(assign)) == len(assign), "swav.crops_for_assign",
             f"must name distinct crops, got {assign}")
    _require(all(isinstance(a, int) and 0 <= a < num_views for a in assign), "swav.crops_for_assign",
             f"crop indices must be in [0, {num_views}), got {assign}")
    _require(all(a < crops.num_crops[0] for a in assign), "swav.crops_for_assign",
             f"assigning crops must be of the first resolution group (crops 0..{crops.num_crops[0] - 1}),"
             f" got {assign}")
    _require(swav.epsilon > 0, "swav.epsilon", f"must be > 0, got {swav.epsilon}")
    _require(swav.temperature > 0, "swav.temperature", f"must be > 0, got {swav.temperature}")
    _positive_int(swav.sinkhorn_iterations, "swav.sinkhorn_iterations")
    _require(swav.freeze_prototypes_niters >= 0, "swav.freeze_prototypes_niters",
             f"must be >= 0, got {swav.freeze_prototypes_niters}")
    _require(swav.queue_length >= 0, "swav.queue_length", f"must be >= 0, got {swav.queue_length}")
    if swav.queue_length > 0:
        _require(effective_queue_length(config) > 0, "swav.queue_length",
                 f"{swav.queue_length} is shorter than the global batch {batch}; the release rounds it "
                 "down to a multiple of the global batch, which leaves no queue")
        _require(swav.epoch_queue_starts >= 0, "swav.epoch_queue_starts",
                 f"must be >= 0, got {swav.epoch_queue_starts}")
        if effective_queue_length(config) != swav.queue_length:
            logging.warning("config.swav.queue_length %d rounded down to %d (a multiple of the global batch)",
                            swav.queue_length, effective_queue_length(config))

    model = config.model
    _require(len(model.num_prototypes) >= 1, "model.num_prototypes", "needs at least one prototype head")
    for i, k in enumerate(model.num_prototypes):
        _positive_int(k, f"model.num_prototypes[{i}]")
    _positive_int(model.proj_dim, "model.proj_dim")
    _require(model.hidden_dim >= 0, "model.hidden_dim", f"must be >= 0 (0: a single linear head), got {model.hidden_dim}")
    smallest = max(model.num_prototypes)
    sinkhorn_samples = batch + effective_queue_length(config)
    if smallest > sinkhorn_samples:
        logging.warning(
            "Each Sinkhorn problem has %d samples for %d prototypes (K > N): equipartition is loose "
            "and learning can stall (SPEC §9). Consider a queue (config.swav.queue_length) or fewer "
            "prototypes.", sinkhorn_samples, smallest)
