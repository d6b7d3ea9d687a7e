"""The config a run was started with: printed at start, kept in WORKDIR/config.json, and
compared with the config of a resumed run.

A resumed run must be the same run: any change outside `HARMLESS` (the method, a shape,
the batch, the schedule, the data, a seed) stops it with the keys that differ. Changes
to the keys in `HARMLESS` (cadences, evaluation settings, data loading resources,
logging) are allowed and reported.
"""

from __future__ import annotations

import json
import os
from typing import Any

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


def check_resume(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Compares the config a run started with (`saved`) with the one resuming it.

    Returns:
      One note per allowed difference: a harmless key changed, or a key the saved
      config does not have (added to the code since the run started).

    Raises:
      ConfigError: naming every other key that differs (old -> new).
    """
    old, new = flatten(saved), flatten(current)
    notes, changed = [], []
    for key in sorted(old.keys() | new.keys()):
        if key not in old:
            notes.append(f"{key}={new[key]!r} (not in the saved config)")
        elif old[key] != new.get(key, "<absent>"):
            text = f"{key}: {old[key]!r} -> {new.get(key, '<absent>')!r}"
            (notes if _harmless(key) else changed).append(text)
    if changed:
        raise ConfigError(
            f"this workdir holds a run of another config; differing keys: {'; '.join(changed)}. "
            f"Resume with the config in {FILENAME} (only {', '.join(HARMLESS)} may change) "
            "or start a new --workdir"
        )
    return notes
