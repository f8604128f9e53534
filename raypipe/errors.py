"""One exception type for every error a user can fix.

The CLI prints ``error: <message>`` on one line and exits with status 2 for these; anything else is a
bug and keeps its traceback. Messages name what is wrong (key, file, value) and how to fix it.
"""

import contextlib
from collections.abc import Iterator


class RaypipeError(Exception):
    """A problem with the user's input (config, data, checkpoint, cluster request, output folder)."""


class ConfigError(RaypipeError):
    """A bad config key, type or value."""


class DataError(RaypipeError):
    """Missing, corrupt or malformed data."""


class CheckpointError(RaypipeError):
    """A checkpoint that cannot be loaded into the configured model."""


class StorageError(RaypipeError):
    """The output folder cannot be written: missing parent, not a folder, no space, read-only, locked."""


class DamagedFileError(RaypipeError):
    """A file a finished stage wrote cannot be read back (truncated, overwritten, not what it should be)."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"file '{uri}' is damaged ({reason})")
        self.uri, self.reason = uri, reason

    def __reduce__(self):  # crosses process boundaries (Ray tasks) with its fields
        return (type(self), (self.uri, self.reason))


class TrainingDiverged(RaypipeError):
    """The training loss of a route became NaN or infinite."""


def user_error(error: BaseException) -> RaypipeError | None:
    """The RaypipeError that caused `error`, when one did: `error` itself, or one carried inside the
    wrappers that remote execution adds (a Ray task's ``cause``, a Ray Train worker group's
    ``worker_failures``, a controller's ``controller_failure``, ``raise ... from``)."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, RaypipeError) and not isinstance(cause, BaseException):
            return e
        found = [cause, getattr(e, "controller_failure", None), e.__cause__]
        found += list((getattr(e, "worker_failures", None) or {}).values())
        todo += [f for f in found if isinstance(f, BaseException)]
    return None


@contextlib.contextmanager
def user_errors_unwrapped() -> Iterator[None]:
    """Re-raise a RaypipeError that arrives wrapped (a Ray task's, a Ray Train worker's) as itself."""
    try:
        yield
    except Exception as e:
        found = user_error(e)
        if found is None or found is e:
            raise
        raise found from None
