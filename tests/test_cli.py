"""The command line's config loading."""

import os

from swav_jax.cli import load_config

TINY = os.path.join(os.path.dirname(__file__), "tiny_config.py")


def test_overrides_reach_the_config_when_main_is_called_in_process():
    # ml_collections reads the overrides from sys.argv unless told otherwise; main(argv)
    # in-process (tests, launchers calling it) has other arguments there.
    config = load_config([f"--config={TINY}", "--config.batch_size=32", "--config.model.num_prototypes=(7,)"])
    assert config.batch_size == 32 and tuple(config.model.num_prototypes) == (7,)
    assert load_config([f"--config={TINY}"]).batch_size == 16


def test_a_repeated_override_takes_its_last_value():
    # absl parses a tuple override onto the one before it: without the fix the second
    # num_prototypes became a second prototype head, (7, 9), and the crops 4 entries.
    config = load_config([
        f"--config={TINY}",
        "--config.model.num_prototypes=(7,)",
        "--config.batch_size=32",
        "--config.model.num_prototypes=(9,)",
        "--config.batch_size=8",
    ])
    assert tuple(config.model.num_prototypes) == (9,)
    assert config.batch_size == 8
