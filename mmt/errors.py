"""The errors mmt raises for a user to read (each message says what was wrong and names the file,
key or line), importable without torch so that the command line can catch them cheaply."""


class ConfigError(ValueError):
    """A config key is unknown, missing or has the wrong type."""


class CheckpointError(RuntimeError):
    """A checkpoint directory or file cannot be used; the message names the file."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps coming out NaN); the message says what to do."""
