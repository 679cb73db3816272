"""The error every bad input becomes: the CLI prints its message as one line and exits 2."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending key."""


class ConfigKeyError(ConfigError):
    """An error about one key. Raised inside a section's validator, the key is relative to that section and the
    config's error formatter prefixes where the section sits (``student`` + ``init_layers``); raised anywhere else,
    the message already starts with the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
