"""Test set-up: eight host CPU devices, so multi-device code is tested without accelerators."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock when loaded; the TPU tests only compile for
# compile-only topologies, so pytest-xdist workers (and a `swav-jax plan` running beside
# the tests) may each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
