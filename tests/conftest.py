"""Test set-up: eight host CPU devices, so multi-device code is tested without accelerators,
and XLA's fast-compiling CPU code generation (tests/child_env.py)."""

import os

from child_env import xla_flags

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(devices=8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock when loaded; the TPU tests only compile for
# compile-only topologies, so pytest-xdist workers (and a `swav-jax plan` running beside
# the tests) may each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_collection_modifyitems(config, items):
    """Runs the modules that hold slow tests first, their slow tests first.

    With two workers sharing the tests (`-n 2 --dist worksteal`), the longest tests then
    start early and the short ones fill in around them, instead of one worker running a
    minutes-long test alone at the end. A module's tests stay together, so its
    module-scoped fixtures are built once per worker.
    """
    del config
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    module_rank = {}
    for item in items:
        module_rank.setdefault(item.module.__name__, len(module_rank))
    items.sort(key=lambda item: (item.module.__name__ not in slow_modules, module_rank[item.module.__name__],
                                 item.get_closest_marker("slow") is None))
