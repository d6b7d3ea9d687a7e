"""TPU slice topologies as libtpu's compile-only devices: compile for a slice on any machine.

A topology is written GENERATION:SHAPE, the chip grid of the slice as Cloud TPU prints it
(`--topology` of `gcloud compute tpus`): v4:4x4x4 (v4-128), v5p:4x4x4 (v5p-128),
v5e:8x8 (v5litepod-64), v6e:8x8 (v6e-64). The devices are what jax sees on that slice:
one per chip (v4 and v5p run their two TensorCores as one "megacore" device), with
`coords` (the chip's x, y, z in the slice), `core_on_chip` and `device_kind`. Nothing can
be placed on or run on them; `jax.jit(f).lower(*abstract_args).compile()` works.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

import jax

from swav_jax.plan.chips import ALIASES

# generation -> (libtpu's name, grid rank, libtpu chip config). v4's default there is one
# device per TensorCore; the TPU runtime (and so training) uses one per chip.
_GENERATIONS = {
    "v4": ("v4", 3, "megacore"),
    "v5p": ("v5p", 3, None),
    "v5e": ("v5e", 2, None),
    "v6e": ("v6e", 2, None),
}
TOPOLOGY_FORMAT = "GENERATION:SHAPE with GENERATION one of v4, v5p, v5e, v6e (e.g. v5p:4x4x4, v5e:8x8)"


class TpuCompilerMissing(RuntimeError):
    """libtpu (the `tpu` extra) is not installed."""


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # v4, v5p, v5e or v6e
    shape: tuple[int, ...]  # chips along x, y(, z)

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)


def parse_topology(name: str) -> Topology:
    """'v5p:4x4x4' -> Topology('v5p', (4, 4, 4)); v5litepod is accepted for v5e."""
    m = re.fullmatch(r"\s*([a-z0-9]+):(\d+(?:x\d+)*)\s*", name.lower())
    generation = m and ALIASES.get(m.group(1), m.group(1))
    if not m or generation not in _GENERATIONS:
        raise ValueError(f"topology {name!r}: expected {TOPOLOGY_FORMAT}")
    shape = tuple(int(s) for s in m.group(2).split("x"))
    rank = _GENERATIONS[generation][1]
    if len(shape) != rank or min(shape) < 1:
        raise ValueError(f"topology {name!r}: {generation} slices are {rank}-D chip grids, e.g. "
                         f"{generation}:{'x'.join(['4'] * rank)}")
    return Topology(generation, shape)


def topology_devices(name: str, *, num_slices: int = 1) -> list[jax.Device]:
    """Compile-only devices of `num_slices` slices of topology `name`, in jax's order.

    Raises TpuCompilerMissing (with the install command) without libtpu, ValueError for a
    malformed name or a shape libtpu does not build (e.g. not whole hosts of chips).
    """
    topology = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise TpuCompilerMissing(
            f'compiling for {topology.name} needs libtpu: pip install "swav-jax[tpu]" (docs/TPU.md)'
        )
    from jax.experimental import topologies

    libtpu_name, _, chip_config = _GENERATIONS[topology.generation]
    kwargs = {"chip_config_name": chip_config} if chip_config else {}
    try:
        description = topologies.get_topology_desc(
            topology_name=f"{libtpu_name}:{'x'.join(map(str, topology.shape))}",
            platform="tpu",
            num_slices=num_slices,
            **kwargs,
        )
    except jax.errors.JaxRuntimeError as e:
        hint = ""
        if "lockfile" in str(e):  # another process has libtpu loaded (a training run, another plan)
            hint = " (another process holds libtpu; ALLOW_MULTIPLE_LIBTPU_LOAD=1 compiles beside it)"
        raise ValueError(f"topology {topology.name}: libtpu cannot build it: {e}{hint}") from None
    return list(description.devices)
