"""The error every bad input becomes: the CLI prints its message as one line and exits 2."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending key."""
