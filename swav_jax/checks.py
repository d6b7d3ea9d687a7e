"""Config value checks: each raises ConfigError naming the key. Used by the trainer's
validation (`swav_jax.train.validate`) and by each method's own."""

from __future__ import annotations

import math
import numbers

from swav_jax.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value, key: str) -> int:
    require(is_int(value) and value > 0, key, f"must be a positive integer, got {value!r}")
    return value


def non_negative_int(value, key: str) -> int:
    require(is_int(value) and value >= 0, key, f"must be an integer >= 0, got {value!r}")
    return value


def real(value, key: str, *, low: float | None = None, high: float | None = None, strict: bool = False) -> float:
    """A finite number in [low, high] ((low, high] with `strict`)."""
    ok = is_real(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if ok and high is not None:
        ok = value <= high
    interval = f"{'(' if strict else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    require(ok, key, f"must be a finite number in {interval}, got {value!r}")
    return float(value)


def assigning_crops(value, key: str, num_crops) -> tuple[int, ...]:
    """Distinct indices of crops of the first resolution group (`num_crops` is
    `crops.num_crops`): the full-size views a method assigns or stores."""
    views = tuple(value)
    require(len(views) >= 1 and len(set(views)) == len(views), key, f"must name distinct crops, got {views}")
    require(all(is_int(a) and 0 <= a < sum(num_crops) for a in views), key,
            f"crop indices must be in [0, {sum(num_crops)}), got {views}")
    require(all(a < num_crops[0] for a in views), key,
            f"must be crops of the first resolution group (crops 0..{num_crops[0] - 1}), got {views}")
    return views
