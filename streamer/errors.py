"""The one exception root. Errors carry the values that caused them."""

from pathlib import Path


class StreamerError(Exception):
    """Root of every error streamer raises on purpose."""


class ModelFileError(StreamerError):
    """A model file that cannot be used: missing, corrupt, wrong shape or unsupported."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"model file {path}: {reason}")
        self.path = path
        self.reason = reason


class CapacityError(StreamerError):
    """More distinct devices in one batch than the state table can hold, or a table too big to allocate."""


class PipelineError(StreamerError):
    """The run loop cannot go on safely (e.g. the broker refused the batch's predictions)."""


class StartupInterrupted(Exception):
    """``stop`` was set while the service waited for the brokers (at start-up, or for a new
    transactional producer): not an error, the run ends with 0. ``abandoned``: a client's
    bootstrap was left running in its thread (it does not look at signals)."""

    def __init__(self, *args: object, abandoned: bool = False) -> None:
        super().__init__(*args)
        self.abandoned = abandoned


def not_a_file(path: Path) -> str:
    """Why ``path``, which is no regular file, cannot be read as one."""
    if path.is_dir():
        return "a directory, not a file"
    return "not a regular file" if path.exists() else "no such file"
