"""User-facing errors: bad config values, missing data. Reported in one line, no traceback."""


class ConfigError(ValueError):
    """A setting or input the user can fix; the message names the config key or file."""
