"""The SwAV train state: everything the next step needs, and what orbax saves."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """Explicit training state.

    Attributes:
      step: [] int32, iterations done.
      params: model parameters, float32, replicated.
      batch_stats: BatchNorm running statistics, float32, replicated.
      opt_state: optimiser state (momentum, step counters), replicated.
      queue: [A, L, D] float32 embedding queues, one FIFO per assigning crop; L is
        the total length over devices and each device holds its own [A, L / devices, D]
        (sharded over the data axis on dimension 1); None without a queue. All zeros
        until the queue epoch starts; used once full (SPEC §4).
      rng: [2] uint32 raw PRNG key data (`jax.random.key_data`) for augmentation,
        replicated; per-step and per-device keys are folded in from it.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    queue: jax.Array | None
    rng: jax.Array
