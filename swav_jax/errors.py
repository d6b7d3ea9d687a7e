"""Errors the trainer reports to users as a message rather than a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class DataError(ValueError):
    """The input data cannot feed training (e.g. no record decodes); the message says where."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; only checkpoints that train on are kept."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none of the saved ones can be read back."""
