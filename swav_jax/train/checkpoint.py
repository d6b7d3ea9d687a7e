"""Orbax checkpoints of the train state together with the data iterator's state."""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    """`workdir/checkpoints/<step>/{state,data,method}`: the last `keep` steps, saved
    asynchronously.

    `data` is the input iterator's position (`get_state()`, JSON; the same on every
    process), so a resumed run sees exactly the batches an uninterrupted one would
    have seen. `method` (JSON) names the method and the state fields holding the network
    to evaluate or export, so that a checkpoint can be read without its config
    (`swav_jax.convert.load_variables`).
    """

    def __init__(self, workdir: str, *, keep: int, method, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._method = {"name": method.name, "eval_fields": list(method.eval_fields)}
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def saved_structure(self, step: int) -> Any:
        """The tree of array metadata (`.shape`, `.dtype`) of step's state, read without
        restoring it."""
        return ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state").tree

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts saving (returns before the write finishes when async)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_iterator.get_state()),
                method=ocp.args.JsonSave(self._method),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores `state` (shaped and sharded like `abstract_state`) and the iterator."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        data_iterator.set_state(restored["data"])
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
