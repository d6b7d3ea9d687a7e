"""Classifiers trained on augmented images, epoch by epoch: the release's linear probe
(eval_linear.py) and semi-supervised fine-tuning (eval_semisup.py).

Both train on RandomResizedCrop + horizontal-flip batches of the training images, made
by the training input pipeline (`data.pipeline`: host crop boxes and flips, crops cut and
resized on the device) with one crop group of one `size` px crop per image and area
scale `crop_scale`; PyTorch SGD (`linear.probe_optimizer`), mean cross-entropy, a
learning rate constant within an epoch; after every epoch, validation on the resize +
centre-crop batches of `data.eval_batches`. What differs is the `Classifier`: its
forward, trained parameters, initialisation and learning rates (`run.probe_classifier`,
`run.finetune_classifier`).

The step runs per device under `jax.shard_map` over a 1-D mesh ('data',) of every device
of every process: each device takes its share of the global batch, gradients and the
loss are averaged over 'data' (every share has the same size), hit counts summed;
parameters, BN statistics and optimiser state are replicated. A BatchNorm that the
forward runs in train mode with axis name 'data' sees the whole global batch.

An epoch is `N // batch_size` steps of the pipeline's stream (a reshuffled pass over the
data, batches may straddle passes; docs/ALGORITHM.md section 2.1), where the release's
DataLoader makes `ceil(N / batch)` batches of a fresh permutation, the last smaller.

Checkpoints: `directory/checkpoints/<step>/{state, data, settings}` (orbax), written
at the end of every epoch: the `ClassifierState`, the input stream's position and the
run's settings. A rerun with the same directory resumes from the latest one and
refuses one saved with other settings. Per-epoch metrics are appended to
`directory/metrics.jsonl` (step = epochs done); progress lines (rate, ETA) go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swav_jax.data import pipeline
from swav_jax.eval.features import padded_batch_size, shard_batch
from swav_jax.eval.linear import classification_sums, percentages, probe_optimizer
from swav_jax.train.metrics import MetricsWriter, Progress

log = logging.getLogger(__name__)

DATA_AXIS = "data"
# Forward of a classifier, per device: (frozen, params, batch_stats, images uint8
# [b, S, S, 3], train) -> (logits [b, C] float32, batch_stats).
Forward = Callable[[Any, Any, Any, jax.Array, bool], tuple[jax.Array, Any]]


class Classifier(NamedTuple):
    """What a protocol trains, and how.

    name: prefix of its metric keys ('linear', 'finetune_10pct').
    forward: see `Forward`; `train` is a Python bool (the train step passes True).
    frozen: arrays the forward reads but does not train (a frozen trunk, normalisation
      constants), placed replicated.
    init: () -> (params, batch_stats) of the initial classifier (host or device arrays).
    learning_rates: epoch -> the LR of every parameter that epoch, a tree prefix of
      params (one float for all, or e.g. {'backbone': lr, 'head': lr_head}).
    epochs, batch_size (global), momentum, weight_decay: the optimisation.
    settings: JSON-able description of the run, stored with every checkpoint; resuming
      with other settings is refused.
    """

    name: str
    forward: Forward
    frozen: Any
    init: Callable[[], tuple[Any, Any]]
    learning_rates: Callable[[int], Any]
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    settings: Mapping[str, Any]


@flax.struct.dataclass
class ClassifierState:
    """What a run carries from epoch to epoch; what the checkpoints hold.

    step: [] int32, training steps done.
    params, batch_stats: the classifier's trained parameters and BN running statistics
      ({} when it has none), float32, replicated.
    opt_state: the SGD momentum buffers.
    best: {'top1', 'top5'} float32 and {'epoch'} int32: the validation accuracies of the
      epoch with the highest top-1 so far (the first on ties), epoch counted from 1;
      top1 -1 before the first epoch.
    last: {'top1', 'top5'}: the validation accuracies after the latest epoch.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    best: dict[str, jax.Array]
    last: dict[str, jax.Array]


def eval_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 1-D ('data',) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


def augmented_batches(
    config: ml_collections.ConfigDict,
    source,
    mesh: Mesh,
    *,
    batch_size: int,
    size: int,
    crop_scale: tuple[float, float],
) -> pipeline.TrainIterator:
    """RandomResizedCrop(size, scale=crop_scale) + flip batches of `source`: the training
    pipeline with one crop per image (`config.data` for reading, `config.seed` for the
    stream). Yields {'crops': (uint8 [1, G, size, size, 3],), 'label': int32 [G]},
    G = batch_size, sharded over 'data'."""
    c = config.copy_and_resolve_references()
    c.batch_size = int(batch_size)
    c.crops.size_crops = (int(size),)
    c.crops.num_crops = (1,)
    c.crops.min_scale_crops = (float(crop_scale[0]),)
    c.crops.max_scale_crops = (float(crop_scale[1]),)
    return pipeline.make_train_iterator(c, mesh=mesh, data_axis=DATA_AXIS, source=source)


def _replicated(tree: Any, mesh: Mesh) -> Any:
    """Host values (the same on every process) as arrays replicated over the mesh."""
    sharding = NamedSharding(mesh, P())

    def place(x):
        x = np.asarray(x)
        if x.dtype == np.float64:  # Python floats (learning rates)
            x = x.astype(np.float32)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, jax.device_get(tree))


def _fetch(tree: Any) -> Any:
    """Replicated global arrays -> host NumPy (valid in multi-process runs)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _apply_lr(lrs: Any, params: Any, updates: Any) -> Any:
    """params - lr * updates, with `lrs` a tree prefix of params."""
    return jax.tree.map(lambda lr, p, u: jax.tree.map(lambda a, b: a - lr * b, p, u), lrs, params, updates)


def make_steps(classifier: Classifier, mesh: Mesh, tx: optax.GradientTransformation):
    """(train_step, eval_step), jitted `shard_map`s over `mesh`'s 'data' axis.

    train_step(frozen, state, crops, labels, lrs) -> (state, sums): crops the pipeline's
      tuple with one uint8 [1, G, S, S, 3] array, labels int32 [G]; `state` is donated;
      sums = `classification_sums` of the step's batch (before the update), summed over
      devices.
    eval_step(frozen, state, images, labels, mask) -> sums: images uint8 [G, S, S, 3],
      mask False on padding rows.
    """
    batch = P(DATA_AXIS)

    def local_train(frozen, state, crops, labels, lrs):
        images = crops[0][0]

        def loss_fn(params):
            logits, batch_stats = classifier.forward(frozen, params, state.batch_stats, images, True)
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
            return loss, (logits, batch_stats)

        (_, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # Every device holds an equal share: the global mean is the mean of the local ones.
        grads = lax.pmean(grads, DATA_AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = _apply_lr(lrs, state.params, updates)
        sums = lax.psum(classification_sums(logits, labels, jnp.ones(labels.shape, bool)), DATA_AXIS)
        state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return state, sums

    def local_eval(frozen, state, images, labels, mask):
        logits, _ = classifier.forward(frozen, state.params, state.batch_stats, images, False)
        return lax.psum(classification_sums(logits, labels, mask), DATA_AXIS)

    train = jax.shard_map(
        local_train,
        mesh=mesh,
        in_specs=(P(), P(), (P(None, DATA_AXIS),), batch, P()),
        out_specs=(P(), P()),
        check_vma=False,
    )
    evaluate = jax.shard_map(
        local_eval, mesh=mesh, in_specs=(P(), P(), batch, batch, batch), out_specs=P(), check_vma=False
    )
    return jax.jit(train, donate_argnums=1), jax.jit(evaluate)


def initial_state(classifier: Classifier, mesh: Mesh, tx: optax.GradientTransformation) -> ClassifierState:
    """The state before the first step, replicated over `mesh`."""
    params, batch_stats = classifier.init()
    params, batch_stats = _replicated((params, batch_stats), mesh)
    opt_state = jax.jit(tx.init, out_shardings=NamedSharding(mesh, P()))(params)
    scalars = {"top1": np.float32(-1.0), "top5": np.float32(0.0)}
    return ClassifierState(
        step=_replicated(np.int32(0), mesh),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        best=_replicated({**scalars, "epoch": np.int32(0)}, mesh),
        last=_replicated(scalars, mesh),
    )


def validate(
    eval_step,
    frozen: Any,
    state: ClassifierState,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    mesh: Mesh,
    num_classes: int,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 (%) of `state`'s classifier over `batches`
    (`data.eval_batches`: process-local, padded, with 'mask'); labels < 0 are skipped."""
    size, total = None, None
    for batch in batches:
        labels = np.asarray(batch["label"])
        mask = np.asarray(batch["mask"], bool) & (labels >= 0)
        if np.any(labels[mask] >= num_classes):
            raise ValueError(
                f"the evaluation split has label {int(labels[mask].max())}, but the training split has "
                f"{num_classes} classes"
            )
        if size is None:
            size = padded_batch_size(len(labels), mesh, DATA_AXIS)
        placed = shard_batch({**batch, "mask": mask}, mesh=mesh, data_axis=DATA_AXIS, size=size)
        sums = eval_step(frozen, state, placed["image"], placed["label"], placed["mask"])
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ValueError("the evaluation split yielded no batch")
    return percentages(_fetch(total))


class _Checkpoints:
    """`directory/checkpoints/<step>/{state, data, settings}`, the last two kept."""

    def __init__(self, directory: str, settings: Mapping[str, Any]):
        # Compared as stored: JSON turns tuples into lists.
        self.settings = json.loads(json.dumps(dict(settings)))
        self.directory = os.path.abspath(os.path.join(directory, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        )

    def restore(self, state: ClassifierState, data: pipeline.TrainIterator) -> ClassifierState:
        """The latest checkpoint's state (shaped and placed like `state`), or `state`."""
        step = self._manager.latest_step()
        if step is None:
            return state
        saved = self._manager.restore(step, args=ocp.args.Composite(settings=ocp.args.JsonRestore()))["settings"]
        for key in sorted(set(saved) | set(self.settings)):
            if saved.get(key) != self.settings.get(key):
                raise ValueError(
                    f"{self.directory} holds a run with {key}={saved.get(key)!r}, this one has "
                    f"{key}={self.settings.get(key)!r}: use another --workdir, or delete that folder to start over"
                )
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        )
        data.set_state(restored["data"])
        log.info("Resumed from %s at step %d", self.directory, step)
        return restored["state"]

    def save(self, step: int, state: ClassifierState, data: pipeline.TrainIterator) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data.get_state()),
                settings=ocp.args.JsonSave(self.settings),
            ),
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _lr_metrics(lrs: Any) -> dict[str, float]:
    leaves = jax.tree_util.tree_leaves_with_path(lrs)
    return {f"lr{''.join(f'/{k.key}' for k in path)}": float(v) for path, v in leaves}


def train_classifier(
    classifier: Classifier,
    data: pipeline.TrainIterator,
    eval_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    *,
    mesh: Mesh,
    num_classes: int,
    directory: str,
    log_every_steps: int = 50,
    max_epochs: int | None = None,
) -> tuple[ClassifierState, dict[str, float]]:
    """Trains `classifier` for its epochs (resuming from `directory`), validating after each.

    Args:
      classifier: what to train (see `Classifier`).
      data: `augmented_batches(...)` of the training images, batch = classifier.batch_size;
        closed on return.
      eval_batches: () -> one pass of `data.eval_batches` over the validation images.
      mesh: `eval_mesh()`.
      num_classes: C of the logits; validation labels must lie below it.
      directory: checkpoints and per-epoch metrics (created).
      log_every_steps: a progress line every this many steps (and at every epoch's end).
      max_epochs: stop after this epoch (checkpointed; the schedule still spans
        classifier.epochs), for tests and for splitting a long run.

    Returns:
      (state, result): the trained `ClassifierState` (replicated over `mesh`), and
      {'top1_final', 'top5_final'} after the last epoch done, {'top1_best', 'top5_best',
      'best_epoch'} of the best epoch so far (epochs from 1), 'epochs_done'. Percentages.
    """
    is_writer = jax.process_index() == 0
    steps_per_epoch = data.steps_per_epoch
    last_epoch = classifier.epochs if max_epochs is None else min(max_epochs, classifier.epochs)
    tx = probe_optimizer(classifier.momentum, classifier.weight_decay)
    train_step, eval_step = make_steps(classifier, mesh, tx)
    frozen = _replicated(classifier.frozen, mesh)
    checkpoints = _Checkpoints(directory, classifier.settings)
    writer = MetricsWriter(directory, enabled=is_writer)
    try:
        state = checkpoints.restore(initial_state(classifier, mesh, tx), data)
        step = start = int(_fetch(state.step))
        # Progress counts an evaluation listed at step s as still to come in reports from
        # step s on; ours runs before the report of its epoch's last step, hence s - 1.
        last_step = last_epoch * steps_per_epoch
        epoch_ends = range((start // steps_per_epoch + 1) * steps_per_epoch, last_step + 1, steps_per_epoch)
        progress = Progress(last_step, classifier.batch_size, start, eval_steps=tuple(s - 1 for s in epoch_ends))
        sums = None
        while step < last_step:
            epoch = step // steps_per_epoch
            if sums is None:
                lrs = classifier.learning_rates(epoch)
                placed_lrs = _replicated(lrs, mesh)
            batch = next(data)
            state, step_sums = train_step(frozen, state, batch["crops"], batch["label"], placed_lrs)
            sums = step_sums if sums is None else jax.tree.map(jnp.add, sums, step_sums)
            step += 1
            if step == start + 1:  # the first step includes compilation
                jax.block_until_ready(state.step)
                progress.restart_clock(step)
            epoch_done = step % steps_per_epoch == 0
            if not (epoch_done or step % log_every_steps == 0):
                continue
            train = percentages(_fetch(sums))
            shown = {"epoch": step / steps_per_epoch, "train_loss": train["loss"], "train_top1": train["top1"]}
            if epoch_done:
                with progress.evaluation():
                    val = validate(eval_step, frozen, state, eval_batches(), mesh=mesh, num_classes=num_classes)
                state = _record_validation(state, val, epoch + 1, mesh)
                best = _fetch(state.best)
                shown.update(val_top1=val["top1"], val_top5=val["top5"], best_top1=float(best["top1"]))
                writer.write(epoch + 1, {
                    **{f"{classifier.name}/{k}": v for k, v in _lr_metrics(lrs).items()},
                    **{f"{classifier.name}/train_{k}": v for k, v in train.items()},
                    **{f"{classifier.name}/val_{k}": v for k, v in val.items()},
                })
                checkpoints.save(step, state, data)
                sums = None
            if is_writer:
                steps_per_sec, images_per_sec = progress.rate(step)
                progress.report(step, steps_per_sec, images_per_sec, shown)
    finally:
        checkpoints.close()
        writer.close()
        data.close()
    best, last = _fetch(state.best), _fetch(state.last)
    return state, {
        "top1_final": float(last["top1"]),
        "top5_final": float(last["top5"]),
        "top1_best": float(best["top1"]),
        "top5_best": float(best["top5"]),
        "best_epoch": int(best["epoch"]),
        "epochs_done": int(_fetch(state.step)) // steps_per_epoch,
    }


def _record_validation(state: ClassifierState, val: Mapping[str, float], epoch: int, mesh: Mesh) -> ClassifierState:
    """`state` with `val` as the latest validation, and as the best if its top-1 is higher."""
    last = {"top1": np.float32(val["top1"]), "top5": np.float32(val["top5"])}
    best = _fetch(state.best)
    # Compared as stored (float32): a tie in float64 must stay a tie.
    if last["top1"] > best["top1"]:
        best = {**last, "epoch": np.int32(epoch)}
    return state.replace(best=_replicated(best, mesh), last=_replicated(last, mesh))


def result_metrics(name: str, result: Mapping[str, float]) -> dict[str, float]:
    """`train_classifier`'s result as metrics.jsonl keys: eval/<name>_top1_final, ..."""
    keys = ("top1_final", "top5_final", "top1_best", "top5_best")
    return {f"eval/{name}_{k}": float(result[k]) for k in keys}

