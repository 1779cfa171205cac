"""User-facing errors: bad config values, missing data. Reported in one line, no traceback."""


class ConfigError(ValueError):
    """A setting or input the user can fix; the message names the config key or file."""


class SkippedSample(ValueError):
    """A sample (or a build row) that cannot be used; `reason` (e.g. `too_many_pixels`) is
    what it is counted under, `detail` names the file or shard and key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # crosses process boundaries from loader and build workers
        return type(self), (self.reason, self.detail)
