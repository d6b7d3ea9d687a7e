"""Orbax checkpoints of the train state with the data iterator's position: saved in the
background, trusted only once they have been seen to train on, and read back past any
that are damaged."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from swav_jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Checkpoints that cannot be used are moved here (workdir/REJECTED/<step>), not deleted.
REJECTED = "rejected_checkpoints"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax writes its commit time here last
_TREE_METADATA = "_METADATA"  # the state's tree structure


def all_finite(tree: Any) -> bool:
    """Whether every float leaf of `tree` is finite: one fused reduction on the devices,
    one scalar back to the host."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


@jax.jit
def _all_finite(leaves):
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def describe(error: BaseException) -> str:
    """One line for a failed read or write: the innermost cause (orbax wraps TensorStore's
    status in long messages), its middle cut to keep it under 300 characters (the
    operating system's reason comes last)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    short = line if len(line) <= 300 else line[:140] + " ... " + line[-150:]
    # TensorStore gives the operating system's reason as a number (os_error_code='27')
    # after its text, which the cut may have dropped: name it at the end.
    code = re.search(r"os_error_code='?(\d+)", line)
    reason = os.strerror(int(code[1])) if code else ""
    return short if reason in short else f"{short} ({reason})"


def checkpoint_problem(step_dir: str) -> str | None:
    """What makes `step_dir` (a checkpoints/<step> folder) unusable before reading it, or None.

    Orbax records the commit time in the step's metadata as the last act of a save, on
    every file system: a folder without it is a partial write or an interrupted copy.
    Without the state's tree metadata the arrays cannot be put back into the state."""
    try:
        with open(os.path.join(step_dir, _STEP_METADATA)) as f:
            committed = json.load(f).get("commit_timestamp_nsecs") is not None
    except (OSError, ValueError):
        committed = False
    if not committed:
        return f"not committed: {_STEP_METADATA} with orbax's commit time is missing"
    if not os.path.isfile(os.path.join(step_dir, "state", _TREE_METADATA)):
        return f"state/{_TREE_METADATA} is missing"
    return None


class Checkpointer:
    """`workdir/checkpoints/<step>/{state,data,method}`, saved asynchronously.

    `data` (JSON) is the input position (`TrainIterator.get_state()`, the same on every
    process) and whatever else the trainer carries across a restart, so a resumed run
    sees exactly the batches an uninterrupted one would have seen. `method` (JSON) names
    the method and the state fields holding the network to evaluate or export, so that
    a checkpoint can be read without its config (`swav_jax.convert.load_variables`).

    A new checkpoint is unconfirmed until the step after it shows a finite loss (the loss
    of a step is computed from the state before it): `confirm` or `reject`. `keep` + 1
    are kept, so that rejecting the newest still leaves `keep`. A save that fails in the
    background is reported by the next `check` (call it every step), its torn folder
    removed.
    """

    def __init__(self, workdir: str, *, keep: int, method, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self._method = {"name": method.name, "eval_fields": list(method.eval_fields)}
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep + 1, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True,
            ),
        )
        self._saving: int | None = None  # the step of the last save started
        self._unconfirmed: int | None = None
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def saved_structure(self, step: int) -> Any:
        """The tree of array metadata (`.shape`, `.dtype`) of step's state, read without
        restoring it."""
        return ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state").tree

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts saving (returns before the write finishes when async)."""
        self.wait()  # orbax would wait for the previous save too; a failure is reported as its own
        self._saving = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    method=ocp.args.JsonSave(self._method),
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 -- any write error ends the run with its path
            self._fail(e)
        self._unconfirmed = step

    def check(self) -> None:
        """Raises CheckpointError if a background save has failed (never blocks)."""
        if not self._manager.is_saving_in_progress():
            self.wait()  # returns at once, raising what the finished save raised

    def confirm(self, step: int) -> None:
        """The state saved at `step` trained on (the next step's loss is finite)."""
        if self._unconfirmed == step:
            self._unconfirmed = None

    def reject(self, step: int, why: str) -> str | None:
        """Moves the unconfirmed checkpoint at `step` aside, if there is one; returns where."""
        if self._unconfirmed != step:
            return None
        self._unconfirmed = None
        self.wait()
        [moved] = self._move_aside([step], {step: why})
        return moved

    def restore_latest(
        self, abstract_state: Any, check: Callable[[int], None] = lambda step: None
    ) -> tuple[int, Any, dict] | None:
        """(step, state, data) of the newest checkpoint that restores, or None if there is none.

        The state is read back shaped and sharded like `abstract_state`. `check(step)` runs
        before each restore; a ConfigError it raises (the run's config no longer fits the
        checkpoints) ends the search instead of skipping the checkpoint. Checkpoints
        skipped on the way (`newest_that_restores`) are moved to workdir/rejected_checkpoints.
        A restored checkpoint is unconfirmed, like a new one (`reject`).
        """
        steps = self._manager.all_steps()
        if not steps:
            return None

        def restore(step):
            check(step)
            return self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )

        step, restored, skipped = newest_that_restores(self.directory, steps, restore, lambda r: r["state"])
        if skipped:
            self._move_aside(sorted(skipped), skipped)
        self._unconfirmed = step
        return step, restored["state"], restored["data"]

    def wait(self) -> None:
        """Blocks until the background save is written; raises CheckpointError if it fails."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def close(self) -> None:
        try:
            if not self._failed:
                self.wait()
        finally:
            self._manager.close()

    def _fail(self, error: BaseException) -> None:
        self._failed = True
        if jax.process_index() == 0:
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:  # the torn write
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        path = os.path.join(self.directory, str(self._saving))
        raise CheckpointError(f"could not save checkpoint {self._saving} to {path}: {describe(error)}") from error

    def _move_aside(self, steps: list[int], why: dict[int, str]) -> list[str]:
        """Moves checkpoints/<step> to rejected_checkpoints/<step> (one process moves)."""
        rejected = os.path.join(self.workdir, REJECTED)
        moved = []
        for step in steps:
            target, n = os.path.join(rejected, str(step)), 0
            while os.path.exists(target):
                n += 1
                target = os.path.join(rejected, f"{step}.{n}")
            moved.append(target)
            if jax.process_index() == 0:
                os.makedirs(rejected, exist_ok=True)
                os.replace(os.path.join(self.directory, str(step)), target)
                log.warning("moved checkpoint %d to %s (%s)", step, target, why[step])
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("swav_jax checkpoints moved aside")
        self._manager.reload()
        return moved


def newest_that_restores(
    directory: str, steps, restore: Callable[[int], Any], values: Callable[[Any], Any] = lambda r: r
) -> tuple[int, Any, dict[int, str]]:
    """(step, restore(step), {skipped step: why}) for the newest of `steps` (folders of
    `directory`) that is complete (`checkpoint_problem`), restores, and whose
    `values(restored)` are finite, on every process. Warns naming each checkpoint
    skipped and why; raises CheckpointError when none restores."""
    skipped: dict[int, str] = {}
    for step in sorted(steps, reverse=True):
        restored, why = None, checkpoint_problem(os.path.join(directory, str(step)))
        if why is None:
            try:
                restored = restore(step)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 -- whatever is broken, try an older one
                why = describe(e)
            else:
                if not all_finite(values(restored)):
                    why = "non-finite values"
        if _everywhere(why is None):
            return step, restored, skipped
        skipped[step] = why or "does not restore on another process"
        log.warning("checkpoint %d in %s cannot be used (%s); trying an older one", step, directory, skipped[step])
    listed = ", ".join(f"{step} ({why})" for step, why in skipped.items())
    raise CheckpointError(f"none of the checkpoints in {directory} restores: {listed}. Move them away to start afresh.")


def _everywhere(flag: bool) -> bool:
    """True if `flag` is True on every process (a host round trip; for start-up only)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.min(multihost_utils.process_allgather(np.int32(flag))))
