"""The training program (SwAV, or ExCB with `config.method = "excb"`): set-up, resume,
the step loop, guards and checkpoints."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from swav_jax.data import pipeline
from swav_jax.eval.run import knn_eval, random_init_variables
from swav_jax.models import build_model
from swav_jax.models.excb import build_excb_model
from swav_jax.train import excb_centroids, excb_optim, excb_step, optim
from swav_jax.train.errors import NonFiniteLossError
from swav_jax.train.checkpoint import Checkpointer, abstract_like
from swav_jax.train.mesh import make_mesh
from swav_jax.train.metrics import MetricsWriter, Progress
from swav_jax.train.step import init_state, make_train_step
from swav_jax.train.validate import effective_queue_length, validate_config

log = logging.getLogger("swav_jax")


class _StopFlag:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        else:  # signals can only be handled on the main thread
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def agreed(self) -> bool:
        """True on every process once any process was signalled."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _collapse_message(method: str, num_clusters: int, steps: int) -> str:
    head = f"The loss has stayed within 1% of ln(K) = {math.log(num_clusters):.3f} for {steps} steps: "
    if method == "excb":
        return head + (
            "the student's predictions look uniform over the clusters. Try a lower learning "
            "rate or fewer clusters (excb.num_clusters)."
        )
    return head + (
        "the assignments look collapsed (SPEC §9). Usual remedies: a smaller swav.epsilon "
        "(0.02-0.03 on small data sets), start the queue later or make it shorter "
        "(swav.epoch_queue_starts, swav.queue_length), freeze the prototypes longer "
        "(swav.freeze_prototypes_niters), fewer prototypes (model.num_prototypes), a lower learning rate."
    )


def _num_clusters(config: ml_collections.ConfigDict) -> int:
    """K of the loss (the first prototype head for SwAV): ln(K) is the collapsed loss."""
    if config.method == "excb":
        return int(config.excb.num_clusters)
    return int(config.model.num_prototypes[0])


def build_method(config, schedule, mesh, *, steps_per_epoch, total_steps, data_axis, bn_group_axis):
    """(initial state, train step) of `config.method`: where the methods differ (besides
    ExCB's data-dependent centroid initialisation, which `train` runs on a fresh start only).

    `config` is resolved and may be edited here (SwAV's effective queue length).
    """
    if config.method == "excb":
        optimizer = excb_optim.make_excb_optimizer(
            config.optim,
            schedule,
            excb_optim.centroid_weight_decay(
                float(config.excb.centroid_weight_decay), float(config.excb.centroid_weight_decay_end), total_steps
            ),
        )
        model = build_excb_model(config, bn_axis_name="bn")
        state = excb_step.init_state(config, model.clone(bn_axis_name=None), optimizer, mesh)
        train_step = excb_step.make_train_step(
            config, model, optimizer, schedule, mesh,
            total_steps=total_steps, data_axis=data_axis, bn_group_axis=bn_group_axis,
        )
        return state, train_step
    optimizer = optim.make_optimizer(
        config.optim,
        schedule,
        freeze_mask=optim.prototype_mask,
        freeze_steps=int(config.swav.freeze_prototypes_niters),
    )
    with config.unlocked():
        config.swav.queue_length = effective_queue_length(config)
    model = build_model(config.model, bn_axis_name="bn")
    state = init_state(config, model.clone(bn_axis_name=None), optimizer, mesh, data_axis=data_axis)
    train_step = make_train_step(
        config, model, optimizer, schedule, mesh,
        steps_per_epoch=steps_per_epoch, data_axis=data_axis, bn_group_axis=bn_group_axis,
    )
    return state, train_step


def _variables(state) -> dict:
    """The network the evaluations see: the student for SwAV, the EMA teacher for ExCB."""
    if isinstance(state, excb_step.ExCBTrainState):
        return excb_step.teacher_variables(state)
    return {"params": state.params, "batch_stats": state.batch_stats}


def _log_eval(writer: MetricsWriter, step: int, results: dict, is_writer: bool) -> None:
    writer.write(step, results)
    if is_writer:
        print("eval: " + " ".join(f"{k}={v:.2f}" for k, v in results.items()), flush=True)


def train(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None) -> dict:
    """Trains SwAV (or ExCB) as `config` says, checkpointing to and resuming from `workdir`.

    Args:
      config: a config from `configs/` (see configs/base.py for every key).
      workdir: checkpoints, metrics.jsonl and TensorBoard files go here. Re-running
        with the same workdir resumes from its latest checkpoint.
      max_steps: stop after this global step (for tests and debugging); the schedule
        still spans `config.epochs`.

    Returns:
      The metrics of the last logged step (float dict), including 'step'.
    """
    validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    is_writer = jax.process_index() == 0
    mesh, data_axis, bn_group_axis = make_mesh(config)

    data = pipeline.make_train_iterator(config, mesh=mesh, data_axis=data_axis)
    steps_per_epoch = pipeline.steps_per_epoch(config, data.num_examples)
    total_steps = int(config.epochs) * steps_per_epoch
    last_step = total_steps if max_steps is None else min(max_steps, total_steps)

    schedule = optim.lr_schedule(
        config.optim, steps_per_epoch=steps_per_epoch, epochs=int(config.epochs), batch_size=int(config.batch_size)
    )
    config = config.copy_and_resolve_references()
    state, train_step = build_method(
        config,
        schedule,
        mesh,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        data_axis=data_axis,
        bn_group_axis=bn_group_axis,
    )

    checkpointer = Checkpointer(workdir, keep=int(config.keep_checkpoints))
    start = checkpointer.latest_step()
    if start is not None:
        state = checkpointer.restore(start, abstract_like(state), data)
        log.info("Resumed from %s at step %d", checkpointer.directory, start)
    elif config.method == "excb" and int(config.excb.init_samples) > 0:
        state = excb_centroids.init_centroids(config, build_excb_model(config), state)
    start = int(state.step)

    writer = MetricsWriter(workdir, enabled=is_writer)
    images_per_step = int(config.batch_size)
    progress = Progress(total_steps, images_per_step, start)
    stop = _StopFlag()
    num_clusters = _num_clusters(config)
    collapse_steps = 0
    collapse_warned = False
    last_metrics: dict = {}
    log_every = max(int(config.log_every_steps), 1)
    knn_every = int(config.eval.knn_every_epochs) * steps_per_epoch
    ckpt_every = max(int(config.checkpoint_every_steps), 1)
    if is_writer:
        print(
            f"swav-jax: {total_steps} steps ({config.epochs} epochs x {steps_per_epoch}), global batch "
            f"{config.batch_size} on {jax.device_count()} devices / {jax.process_count()} processes, "
            f"starting at step {start}",
            flush=True,
        )
    try:
        step = start
        while step < last_step:
            batch = next(data)
            state, metrics = train_step(state, batch)
            step += 1
            if step == start + 1:
                # The first step includes compilation: do not count it in throughput.
                jax.block_until_ready(metrics)
                progress.restart_clock(step)
            need_log = step % log_every == 0 or step == last_step
            need_ckpt = step % ckpt_every == 0 or step == last_step
            stop_now = stop.agreed()
            if need_log or need_ckpt or stop_now:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(host["train/loss"]) and math.isfinite(host["train/grad_norm"])):
                    raise NonFiniteLossError(
                        f"Non-finite loss ({host['train/loss']}) or gradient norm ({host['train/grad_norm']}) "
                        f"at step {step}; stopping without saving. "
                        f"The last good checkpoint is kept in {checkpointer.directory} "
                        f"(step {checkpointer.latest_step()}). Usual causes: learning rate too high, "
                        "a batch much smaller than the number of prototypes without a queue, fp16 "
                        "overflow (SPEC §9)."
                    )
                if need_log:
                    # The collapse watch samples the logged steps.
                    near_log_k = abs(host["train/loss"] - math.log(num_clusters)) < 0.01 * math.log(num_clusters)
                    collapse_steps = collapse_steps + log_every if near_log_k else 0
                    if collapse_steps >= int(config.collapse_warning_steps) and not collapse_warned:
                        message = _collapse_message(config.method, num_clusters, collapse_steps)
                        log.warning(message)
                        if is_writer:
                            print("WARNING: " + message, flush=True)
                        collapse_warned = True
                    steps_per_sec, images_per_sec = progress.rate(step)
                    host["train/images_per_sec"] = images_per_sec
                    host["train/epoch"] = step / steps_per_epoch
                    writer.write(step, host)
                    if is_writer:
                        progress.report(step, steps_per_sec, images_per_sec, host)
                last_metrics = {"step": step, **host}
            if knn_every and step % knn_every == 0 and step < last_step:
                _log_eval(writer, step, knn_eval(config, _variables(state)), is_writer)
            if need_ckpt or stop_now:
                checkpointer.save(step, state, data)
            if stop_now:
                log.warning("SIGTERM received: saved a checkpoint at step %d and stopping.", step)
                if is_writer:
                    print(f"Preempted: checkpoint saved at step {step}; re-run the same command to resume.",
                          flush=True)
                break
        else:
            if step == total_steps and config.eval.knn_at_end:
                results = knn_eval(config, _variables(state))
                if config.eval.knn_random_init:
                    results.update(knn_eval(config, random_init_variables(config), suffix="_random_init"))
                _log_eval(writer, step, results, is_writer)
                last_metrics.update(results)
    finally:
        checkpointer.close()
        writer.close()
        stop.restore()
        data.close()
    return last_metrics
