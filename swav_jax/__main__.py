"""`python -m swav_jax ...` is `swav-jax ...`."""

from swav_jax.cli import main

main()
