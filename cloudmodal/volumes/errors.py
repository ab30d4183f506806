"""Errors of the volume storage engine. Path errors use Python's own (``FileNotFoundError``,
``IsADirectoryError``, ``NotADirectoryError``, ``FileExistsError``), as Modal's client does."""

from __future__ import annotations

from cloudmodal.exception import Error


class VolumeError(Error):
    """Base of the volume engine's own errors."""


class StoreError(VolumeError):
    """The object store failed (unreachable, refused, misconfigured); the message names the store and key."""


class KeyNotFoundError(StoreError, KeyError):
    """A key is not in the store."""

    def __init__(self, store: str, key: str) -> None:
        super().__init__(f"{store}: no object {key!r}")
        self.store = store
        self.key = key

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0])


class CorruptDataError(VolumeError):
    """A stored part does not match its checksum (or a manifest is unreadable): the data was damaged in the
    store or in transit. Nothing was returned for it; committed versions that do not use it are unaffected."""


class CommitConflictError(VolumeError):
    """A commit could not be published after many retries because other commits kept winning the race."""


class VolumeBusyError(VolumeError):
    """``reload()`` refused: files under the mount are open (Modal's rule); close them and retry."""
