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
