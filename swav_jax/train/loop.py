"""The training program of any method (`config.method`): set-up, resume, the step loop,
guards and checkpoints. It knows methods only through `swav_jax.methods.Method`."""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from swav_jax.data import pipeline
from swav_jax.errors import NonFiniteLossError
from swav_jax.eval.run import knn_eval, knn_eval_raw_pixels, random_init_variables
from swav_jax.mesh import data_axes, make_mesh
from swav_jax.methods import get_method
from swav_jax.train import run_config
from swav_jax.train.checkpoint import Checkpointer
from swav_jax.train.collapse import CollapseWatch
from swav_jax.train.metrics import MetricsWriter, Progress, phase
from swav_jax.train.validate import validate_config

log = logging.getLogger("swav_jax")


def _agreed(flag: bool) -> bool:
    """True on every process once `flag` is True on any."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _log_eval(writer: MetricsWriter, step: int, results: dict, is_writer: bool) -> None:
    writer.write(step, results)
    if is_writer:
        print("eval: " + " ".join(f"{k}={v:.2f}" for k, v in results.items()), flush=True)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    max_steps: int | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> dict:
    """Trains `config.method` as `config` says, checkpointing to and resuming from `workdir`.

    Args:
      config: a config from `swav_jax.configs` (base.py defines every key).
      workdir: checkpoints, config.json, metrics.jsonl and TensorBoard files go here.
        Re-running with the same workdir resumes from its latest checkpoint; a config
        that changes the method or the state's shapes is refused (`run_config`).
      max_steps: stop after this global step (for tests and debugging); the schedule
        still spans `config.epochs`.
      stop_requested: polled after every step (e.g. a SIGTERM flag set by the CLI); once
        it is True on any process, every process saves a checkpoint and returns.

    Returns:
      The metrics of the last logged step (float dict), including 'step'.
    """
    validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    config = config.copy_and_resolve_references()
    method = get_method(config.method)
    os.makedirs(workdir, exist_ok=True)
    is_writer = jax.process_index() == 0
    resolved = run_config.to_dict(config)
    if is_writer:
        print(run_config.format_compact(resolved), flush=True)
    mesh = make_mesh(config)

    with phase("opening the data", is_writer):
        data = pipeline.make_train_iterator(config, mesh=mesh, data_axis=data_axes(mesh))
    steps_per_epoch = pipeline.steps_per_epoch(config, data.num_examples)
    total_steps = int(config.epochs) * steps_per_epoch
    last_step = total_steps if max_steps is None else min(max_steps, total_steps)
    program = method.build(config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    checkpointer = Checkpointer(workdir, keep=int(config.keep_checkpoints), method=method)
    start = checkpointer.latest_step()
    saved = run_config.read(workdir)
    if start is not None and saved is not None:
        notes, warnings = run_config.check_resume(
            saved, resolved, saved_shapes=run_config.shapes(checkpointer.saved_structure(start)),
            current_shapes=run_config.shapes(program.abstract_state),
        )
        for note in notes:
            log.info("Resuming with a changed config key: %s", note)
        for warning in warnings:
            log.warning("Resuming with a changed config key (the run goes on with the new value): %s", warning)
    if is_writer:
        run_config.write(workdir, resolved)
    writer = MetricsWriter(workdir, enabled=is_writer, wandb_project=config.logging.wandb_project)
    writer.write_config(resolved)
    if start is not None:
        with phase(f"restoring step {start}", is_writer):
            state = checkpointer.restore(start, program.abstract_state, data)
        log.info("Resumed from %s at step %d", checkpointer.directory, start)
    else:
        with phase("initialising the state", is_writer):
            state = jax.block_until_ready(method.on_fresh_start(config, program.init_state(), mesh))
    start = int(state.step)

    log_every = int(config.log_every_steps)
    knn_every = int(config.eval.knn_every_epochs) * steps_per_epoch
    ckpt_every = int(config.checkpoint_every_steps)
    # The evaluations still to run, for the ETA: the online kNN, then those at the end.
    eval_steps = list(range(knn_every * (start // knn_every + 1), last_step, knn_every)) if knn_every else []
    if last_step == total_steps and config.eval.knn_at_end:
        eval_steps += [total_steps] * (1 + bool(config.eval.knn_random_init))
    progress = Progress(total_steps, int(config.batch_size), start, eval_steps=tuple(eval_steps))
    collapse_watch = CollapseWatch(config, method, log_every)
    last_metrics: dict = {}
    if is_writer:
        print(
            f"swav-jax: {config.method}, {total_steps} steps ({config.epochs} epochs x {steps_per_epoch}), "
            f"global batch {config.batch_size} on {jax.device_count()} devices / {jax.process_count()} processes, "
            f"starting at step {start}",
            flush=True,
        )
    try:
        step = start
        while step < last_step:
            if step % steps_per_epoch == 0:
                state = method.on_epoch_start(config, state, step // steps_per_epoch)
            if step == start:
                # The first step includes compilation: do not count it in throughput.
                with phase("compiling the train step", is_writer):
                    state, metrics = jax.block_until_ready(program.train_step(state, next(data)))
                progress.restart_clock(step + 1)
            else:
                state, metrics = program.train_step(state, next(data))
            step += 1
            need_log = step % log_every == 0 or step == last_step
            need_ckpt = step % ckpt_every == 0 or step == last_step
            stop_now = _agreed(stop_requested())
            if need_log or need_ckpt or stop_now:
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(host["train/loss"]) and math.isfinite(host["train/grad_norm"])):
                    raise NonFiniteLossError(
                        f"Non-finite loss ({host['train/loss']}) or gradient norm ({host['train/grad_norm']}) "
                        f"at step {step}; stopping without saving. "
                        f"The last good checkpoint is kept in {checkpointer.directory} "
                        f"(step {checkpointer.latest_step()}). Usual causes: learning rate too high, "
                        "a batch much smaller than the number of prototypes without a queue, fp16 overflow."
                    )
                if need_log:
                    message = collapse_watch.update(host)  # samples the logged steps
                    if message:
                        log.warning(message)
                        if is_writer:
                            print("WARNING: " + message, flush=True)
                    steps_per_sec, images_per_sec = progress.rate(step)
                    host["train/images_per_sec"] = images_per_sec
                    host["train/epoch"] = step / steps_per_epoch
                    writer.write(step, host)
                    if is_writer:
                        progress.report(step, steps_per_sec, images_per_sec, host)
                last_metrics = {"step": step, **host}
            if knn_every and step % knn_every == 0 and step < last_step:
                with progress.evaluation(), phase("kNN evaluation", is_writer):
                    results = knn_eval(config, method.eval_variables(state))
                _log_eval(writer, step, results, is_writer)
            if need_ckpt or stop_now:
                checkpointer.save(step, state, data)
            if stop_now:
                log.warning("Stop requested: saved a checkpoint at step %d and stopping.", step)
                if is_writer:
                    print(f"Preempted: checkpoint saved at step {step}; re-run the same command to resume.",
                          flush=True)
                break
        else:
            if step == total_steps and config.eval.knn_at_end:
                with phase("kNN evaluation of the final network", is_writer):
                    results = knn_eval(config, method.eval_variables(state))
                if config.eval.knn_random_init:
                    with phase("kNN evaluation at random initialisation", is_writer):
                        results.update(knn_eval(config, random_init_variables(config), suffix="_random_init"))
                if config.eval.knn_raw_pixels:
                    with phase("kNN of the raw pixels", is_writer):
                        results.update(knn_eval_raw_pixels(config))
                _log_eval(writer, step, results, is_writer)
                last_metrics.update(results)
    finally:
        checkpointer.close()
        writer.close()
        data.close()
    return last_metrics
