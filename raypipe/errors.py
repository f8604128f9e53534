"""One exception type for every error a user can fix.

The CLI prints ``error: <message>`` on one line and exits non-zero for these; anything else is a
bug and keeps its traceback. Messages name what is wrong (key, file, value) and how to fix it.
"""


class RaypipeError(Exception):
    """A problem with the user's input (config, data, checkpoint, cluster request)."""


class ConfigError(RaypipeError):
    """A bad config key, type or value."""


class DataError(RaypipeError):
    """Missing, corrupt or malformed data."""


class CheckpointError(RaypipeError):
    """A checkpoint that cannot be loaded into the configured model."""
