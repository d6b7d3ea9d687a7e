"""The training program of any method (`config.method`): set-up, resume, the step loop,
guards and checkpoints. It knows methods only through `swav_jax.methods.Method`."""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import jax
import ml_collections

from swav_jax.data import pipeline
from swav_jax.errors import NonFiniteLossError
from swav_jax.eval.run import knn_eval, knn_reference_levels
from swav_jax.mesh import data_axes, make_mesh
from swav_jax.methods import get_method
from swav_jax.train import run_config
from swav_jax.train.agreement import HostAgreement
from swav_jax.train.checkpoint import Checkpointer, all_finite
from swav_jax.train.collapse import CollapseWatch
from swav_jax.train.metrics import MetricsWriter, Progress, phase, read_rows
from swav_jax.train.validate import validate_config

log = logging.getLogger("swav_jax")


def _log_eval(writer: MetricsWriter, step: int, results: dict, is_writer: bool) -> None:
    writer.write(step, results)
    if is_writer:
        print("eval: " + " ".join(f"{k}={v:.2f}" for k, v in results.items()), flush=True)


def _end_of_run_eval(config: ml_collections.ConfigDict, method, state, is_writer: bool) -> dict:
    with phase("kNN evaluation of the final network", is_writer):
        results = knn_eval(config, method.eval_variables(state))
    if config.eval.knn_random_init or config.eval.knn_raw_pixels:
        with phase("kNN of the reference levels (random init, raw pixels)", is_writer):
            results.update(knn_reference_levels(config))
    return results


def _last_good(checkpointer: Checkpointer, every: int) -> str:
    step = checkpointer.latest_step()
    if step is None:
        return f"No checkpoint was saved before it (checkpoint_every_steps={every})."
    return f"The last good checkpoint is step {step} in {checkpointer.directory}."


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
        Re-running with the same workdir resumes from its newest checkpoint that
        restores (damaged ones are skipped with a warning and moved to
        WORKDIR/rejected_checkpoints); a config that changes the method or the state's
        shapes is refused (`run_config`); re-running a finished run does nothing.
      max_steps: stop after this global step (for tests and debugging); the schedule
        still spans `config.epochs`.
      stop_requested: polled once a step, as the device finishes the step before (e.g.
        a SIGTERM flag set by the CLI); once it is True on any process, every process
        saves a checkpoint within about a step (one more with several processes) and
        returns.

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
    program = method.build(
        config, mesh, steps_per_epoch=steps_per_epoch, total_steps=total_steps, num_examples=data.num_examples
    )
    checkpointer = Checkpointer(workdir, keep=int(config.keep_checkpoints), method=method)
    saved = run_config.read(workdir)

    def check_resume(step: int) -> None:
        if saved is None:
            return
        notes, warnings = run_config.check_resume(
            saved, resolved, saved_shapes=run_config.shapes(checkpointer.saved_structure(step)),
            current_shapes=run_config.shapes(program.abstract_state),
        )
        for note in notes:
            log.info("Resuming with a changed config key: %s", note)
        for warning in warnings:
            log.warning("Resuming with a changed config key (the run goes on with the new value): %s", warning)

    writer = None
    try:
        start, skipped_before, state, watch_state = 0, 0, None, None
        if checkpointer.latest_step() is not None:
            with phase("restoring the newest checkpoint that restores", is_writer):
                start, state, data_state = checkpointer.restore_latest(program.abstract_state, check_resume)
            data.set_state(data_state)
            skipped_before = int(data_state.get("skipped_records", 0))
            watch_state = data_state.get("collapse_watch")
            log.info("Resumed from %s at step %d", checkpointer.directory, start)
        if is_writer:
            run_config.write(workdir, resolved)
        writer = MetricsWriter(workdir, enabled=is_writer, wandb_project=config.logging.wandb_project,
                               resume_step=start)
        writer.write_config(resolved)
        if start >= last_step:
            return _finished(config, method, state, workdir, writer, start, last_step, total_steps)
        batch = next(data)  # data where nothing decodes fails here, before anything compiles
        if state is None:
            with phase("initialising the state", is_writer):
                state = jax.block_until_ready(method.on_fresh_start(config, program.init_state(), mesh))
        return _loop(config, method, program, data, checkpointer, writer, state, batch, mesh,
                     start=start, last_step=last_step, steps_per_epoch=steps_per_epoch,
                     skipped_before=skipped_before, watch_state=watch_state, stop_requested=stop_requested)
    finally:
        checkpointer.close()
        if writer is not None:
            writer.close()
        data.close()


def _finished(config, method, state, workdir, writer, step, last_step, total_steps) -> dict:
    """A re-run of a run that is done: only a final evaluation cut short is done again."""
    is_writer = jax.process_index() == 0
    evaluated = any(k.startswith("eval/") for row in read_rows(workdir) if row["step"] == step for k in row)
    if step == total_steps and config.eval.knn_at_end and not evaluated:
        if is_writer:
            print(f"swav-jax: the run in {workdir} finished at step {step} without its final evaluation; "
                  "evaluating.", flush=True)
        results = _end_of_run_eval(config, method, state, is_writer)
        _log_eval(writer, step, results, is_writer)
        return {"step": step, **results}
    if is_writer:
        done = "already finished" if step == total_steps else f"is past --max-steps {last_step}"
        print(f"swav-jax: the run in {workdir} {done} at step {step}; nothing to do.", flush=True)
    return {"step": step}


def _loop(config, method, program, data, checkpointer, writer, state, batch, mesh, *,
          start, last_step, steps_per_epoch, skipped_before, watch_state, stop_requested) -> dict:
    """Steps `start` + 1 .. `last_step` from `state`, `batch` being the first batch."""
    is_writer = jax.process_index() == 0
    total_steps = int(config.epochs) * steps_per_epoch
    log_every = int(config.log_every_steps)
    knn_every = int(config.eval.knn_every_epochs) * steps_per_epoch
    ckpt_every = int(config.checkpoint_every_steps)
    # The evaluations still to run, for the ETA: the online kNN, then those at the end.
    eval_steps = list(range(knn_every * (start // knn_every + 1), last_step, knn_every)) if knn_every else []
    if last_step == total_steps and config.eval.knn_at_end:
        eval_steps += [total_steps] * (1 + bool(config.eval.knn_random_init))
    progress = Progress(total_steps, int(config.batch_size), start, eval_steps=tuple(eval_steps))
    agreement = HostAgreement(mesh)
    collapse_watch = CollapseWatch(config, method, log_every)
    collapse_watch.set_state(watch_state)
    last_metrics: dict = {"step": start}

    def complete(step: int, metrics: dict, skipped: int) -> None:
        """Reads back a step the device has run: the non-finite guard, the confirmation
        of the checkpoint before it, the collapse watch and the log."""
        nonlocal last_metrics
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        # A step's loss and gradient are those of the state before it: a non-finite one
        # condemns that state, and its checkpoint if it was just saved.
        if not (math.isfinite(host["train/loss"]) and math.isfinite(host["train/grad_norm"])):
            moved = checkpointer.reject(step - 1, f"step {step} from it has a non-finite loss")
            raise NonFiniteLossError(
                f"Non-finite loss ({host['train/loss']}) or gradient norm ({host['train/grad_norm']}) "
                f"at step {step}; stopping. "
                + (f"Checkpoint {step - 1}, the state it started from, was moved to {moved}. " if moved else "")
                + _last_good(checkpointer, ckpt_every)
                + " Usual causes: learning rate too high, a batch much smaller than the number of "
                "prototypes without a queue, fp16 overflow."
            )
        checkpointer.confirm(step - 1)
        if step % log_every == 0 or step == last_step:
            message = collapse_watch.update(host)  # samples the logged steps
            if message:
                log.warning(message)
            steps_per_sec, images_per_sec = progress.rate(step)
            host["train/images_per_sec"] = images_per_sec
            host["train/epoch"] = step / steps_per_epoch
            host["data/skipped_records"] = skipped
            writer.write(step, host)
            if is_writer:
                progress.report(step, steps_per_sec, images_per_sec, host)
        last_metrics = {"step": step, **host}

    if is_writer:
        print(
            f"swav-jax: {config.method}, {total_steps} steps ({config.epochs} epochs x {steps_per_epoch}), "
            f"global batch {config.batch_size} on {jax.device_count()} devices / {jax.process_count()} processes, "
            f"starting at step {start}",
            flush=True,
        )
    step, in_flight, skipped = start, None, skipped_before
    while step < last_step:
        if step % steps_per_epoch == 0:
            state = method.on_epoch_start(config, state, step // steps_per_epoch)
        if step == start:
            # The first step includes compilation: do not count it in throughput.
            with phase("compiling the train step", is_writer):
                state, metrics = jax.block_until_ready(program.train_step(state, batch))
            progress.restart_clock(step + 1)
        else:
            state, metrics = program.train_step(state, batch)
        step += 1
        # Read the step before back while this one runs: the host stays one step ahead
        # of the device, so a stop request is answered within about a step.
        if in_flight is not None:
            complete(*in_flight)
        checkpointer.check()  # a save that failed in the background stops the run here
        need_knn = knn_every and step % knn_every == 0 and step < last_step
        need_ckpt = step % ckpt_every == 0 or step == last_step
        scheduled = need_ckpt or need_knn or step % log_every == 0
        stop, found = agreement.exchange(stop_requested(), data.num_skipped, wait=scheduled)
        if stop and not scheduled:  # the exact count for the checkpoint (several processes)
            _, found = agreement.exchange(True, data.num_skipped, wait=True)
        skipped = skipped_before + found
        in_flight = (step, metrics, skipped)
        if scheduled or stop:
            complete(*in_flight)
            in_flight = None
        if need_knn:
            with progress.evaluation(), phase("kNN evaluation", is_writer):
                results = knn_eval(config, method.eval_variables(state))
            _log_eval(writer, step, results, is_writer)
        if need_ckpt or stop:
            if not all_finite(state):
                raise NonFiniteLossError(
                    f"Non-finite values in the state after step {step}; not saving it. "
                    + _last_good(checkpointer, ckpt_every)
                )
            checkpointer.save(step, state, {**data.get_state(), "skipped_records": skipped,
                                            "collapse_watch": collapse_watch.get_state()})
        if stop:
            log.warning("Stop requested: saved a checkpoint at step %d and stopping.", step)
            if is_writer:
                print(f"Preempted: checkpoint saved at step {step}; re-run the same command to resume.",
                      flush=True)
            break
        if step < last_step:
            batch = next(data)
    else:
        if step == total_steps and config.eval.knn_at_end:
            results = _end_of_run_eval(config, method, state, is_writer)
            _log_eval(writer, step, results, is_writer)
            last_metrics.update(results)
    if is_writer and skipped:
        print(f"data: {skipped} unreadable records were skipped (named in the warnings above).", flush=True)
    return last_metrics
