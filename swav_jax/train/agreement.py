"""Host-side facts every process must agree on - whether any process was asked to stop,
and a count summed over processes - agreed through one small all-reduce on the devices
instead of a host round trip every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class HostAgreement:
    """`exchange(stop, count)` -> (stop on any process, count summed over processes).

    With several processes (`deferred`) the all-reduce is dispatched after the step
    already queued on the devices, so waiting for it at once would stall them: each call
    returns the agreed values of the previous call, one step late, unless `wait=True`
    (use it where the caller waits for the devices anyway). With one process there is
    nothing to agree on and the values come back as given. Every process must make the
    same calls with the same `wait`.
    """

    def __init__(self, mesh: Mesh, *, deferred: bool | None = None):
        self._deferred = jax.process_count() > 1 if deferred is None else deferred
        self._sharding = NamedSharding(mesh, P(mesh.axis_names))
        self._local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self._num_devices = mesh.devices.size
        # int32 [devices, 2] rows (stop, count) -> int32 [2] (any stop, summed count), replicated.
        self._reduce = jax.jit(
            lambda rows: jnp.stack([rows[:, 0].max(), rows[:, 1].sum()]),
            out_shardings=NamedSharding(mesh, P()),
        )
        self._previous: jax.Array | None = None

    def exchange(self, stop: bool, count: int, *, wait: bool = False) -> tuple[bool, int]:
        if not self._deferred:
            return bool(stop), int(count)
        rows = np.zeros((self._local_devices, 2), np.int32)
        rows[:, 0] = bool(stop)
        rows[0, 1] = count  # once per process
        posted = self._reduce(
            jax.make_array_from_process_local_data(self._sharding, rows, (self._num_devices, 2))
        )
        previous, self._previous = self._previous, posted
        result = posted if wait else previous
        if result is None:
            return False, 0
        agreed_stop, agreed_count = np.asarray(jax.device_get(result))
        return bool(agreed_stop), int(agreed_count)
