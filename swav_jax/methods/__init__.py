"""The self-supervised methods the trainer runs, one module each, behind one interface
(`scaffold.Method`): `config.method` names one of them.

  swav.py           SwAV: Sinkhorn codes, swapped prediction, queue, LARS
  excb.py           ExCB: cluster-size tracker, EMA teacher, predictor, SGD
  deepclusterv2.py  DeepCluster-v2: memory bank, per-epoch k-means pseudo-labels,
                    cross-entropy, LARS
  scaffold.py       the interface and what every method shares (the jitted shard_map
                    step, initial and abstract states, averaging across replicas)

To add a method, see `scaffold.Method`.
"""

from __future__ import annotations

from swav_jax.methods.deepclusterv2 import DeepClusterV2
from swav_jax.methods.excb import ExCB
from swav_jax.methods.scaffold import Method, TrainProgram
from swav_jax.methods.swav import SwAV

_METHODS: dict[str, Method] = {m.name: m for m in (SwAV(), ExCB(), DeepClusterV2())}


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as `name` (`config.method`)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; one of {method_names()}") from None


__all__ = ["Method", "TrainProgram", "get_method", "method_names"]
