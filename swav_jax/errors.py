"""Errors the trainer reports to users as a message rather than a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""
