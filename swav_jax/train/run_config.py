"""The config a run was started with: printed at start, kept in WORKDIR/config.json, and
compared with the config of a resumed run.

A resumed run may not change the method or the shapes of the state (the checkpoint
could not hold it): such a resume stops, naming the keys that differ. Other changes
are allowed and reported: those in `HARMLESS` (cadences, evaluation, logging, data
loading resources) as notes; the rest (the schedule, a seed, a temperature: the run
goes on, but not as the run it was) as warnings.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from swav_jax.errors import ConfigError

FILENAME = "config.json"

# Keys (or sections, ending in '.') a resumed run may change: they do not touch the
# state, the batches or the schedule.
HARMLESS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "collapse_warning_steps",
    "eval.",
    "logging.",
    "data.num_workers",
    "data.read_threads",
    "data.prefetch",
    "data.data_dir",
)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON values (tuples become lists)."""
    return json.loads(config.to_json())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def format_compact(tree: dict[str, Any]) -> str:
    """One line of top-level keys, then one indented line per section."""
    def show(value):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    top = [f"{k}={show(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    lines = ["config: " + " ".join(top)]
    for section, values in tree.items():
        if isinstance(values, dict):
            lines.append(f"  {section}: " + " ".join(f"{k}={show(v)}" for k, v in flatten(values).items()))
    return "\n".join(lines)


def read(workdir: str) -> dict[str, Any] | None:
    """WORKDIR/config.json, or None when there is none."""
    path = os.path.join(workdir, FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write(workdir: str, tree: dict[str, Any]) -> None:
    """Writes WORKDIR/config.json whole (a temporary file renamed over it)."""
    path = os.path.join(workdir, FILENAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(tree, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/backbone/conv_init/kernel': shape, ...} of a state, abstract or saved
    (orbax metadata): the same paths for both."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def check_resume(
    saved: dict[str, Any], current: dict[str, Any], *, saved_shapes: dict, current_shapes: dict
) -> tuple[list[str], list[str]]:
    """Compares the config a run started with (`saved`) with the one resuming it.

    Args:
      saved, current: configs as `to_dict` gives them.
      saved_shapes, current_shapes: `shapes` of the checkpointed state and of the
        state `current` builds.

    Returns:
      (notes, warnings): the changed harmless keys and the keys the saved config does not
      have (added to the code since the run started); the other changed keys.

    Raises:
      ConfigError: the method or the state's shapes differ, naming every key that differs
        (old -> new), or, when no key differs, the first state entries that do.
    """
    old, new = flatten(saved), flatten(current)
    notes, changed = [], []
    for key in sorted(old.keys() | new.keys()):
        if key not in old:
            notes.append(f"{key}={new[key]!r} (not in the saved config)")
        elif old[key] != new.get(key, "<absent>"):
            text = f"{key}: {old[key]!r} -> {new.get(key, '<absent>')!r}"
            (notes if _harmless(key) else changed).append(text)
    if old.get("method") == new.get("method") and saved_shapes == current_shapes:
        return notes, changed
    what = "the method" if old.get("method") != new.get("method") else "the shapes of the state"
    if changed:
        differ = f"differing keys: {'; '.join(changed)}"
    else:
        entries = sorted(k for k in saved_shapes.keys() | current_shapes.keys()
                         if saved_shapes.get(k) != current_shapes.get(k))
        differ = "no config key differs, but these state entries do (saved -> now): " + "; ".join(
            f"{k}: {saved_shapes.get(k)} -> {current_shapes.get(k)}" for k in entries[:5])
    raise ConfigError(
        f"this workdir's checkpoints hold a run of another config, which changes {what}; {differ}. "
        f"Resume with the config in {FILENAME} or start a new --workdir"
    )
