"""Planning a run on hardware you do not have: TPU topologies compiled for on any CPU
machine (libtpu's compile-only client), the accelerator chips' published figures, and
per-chip memory, FLOPs, collectives and time estimates read from a compiled program.

Needs the `tpu` extra (`pip install "swav-jax[tpu]"`) for TPU topologies; docs/TPU.md.
"""
