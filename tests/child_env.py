"""The environment of the suite's XLA programs, in this process and in the ones tests start.

The suite compiles hundreds of small programs on the CPU and runs most of them a few
times, so compile time, not run time, sets its length. XLA's CPU backend at LLVM
optimisation level 0 compiles them in about half the time (the tiny recipe's state
initialisation 11 s -> 3 s, its train step 16 s -> 11 s on 2 cores) and runs them about
as fast. The level changes only the machine code LLVM emits from XLA's optimised HLO:
the programs the tests check (fusions, collectives, shardings, the arithmetic) are the
ones users run; only their rounding can differ, as it does between CPUs.
"""

import os

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """The suite's XLA flags: its compile flags and `devices` host CPU devices (None:
    jax's default of one, or what a launcher such as launch/local_multiprocess.sh adds)."""
    if devices is None:
        return FAST_COMPILE_FLAGS
    return f"{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}"


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """`os.environ` for a process a test starts: the CPU platform and `xla_flags(devices)`."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **extra}
