"""Volume storage: versioned file trees in an object store (a local directory, S3, GCS or Azure Blob).

- :mod:`.store` — the object-store seam (:class:`ObjectStore`, :func:`open_store`);
- :mod:`.manifest` — a version as data and the pure operations between versions;
- :mod:`.engine` — commits (atomic manifest swap), reads through a local cache, working copies (mounts).

Typical use (what ``cloudmodal.Volume`` and the control plane build on)::

    from cloudmodal.volumes import FileHead, VolumeData, open_store

    data = VolumeData(open_store("s3://bucket/volumes/vo-123"), FileHead("/state/vo-123.head"), cache_dir=cache)
    with data.batch() as b:
        b.put_file("model.bin", "/weights/model.bin")
    wc = data.working_copy("/data")       # a mount: the latest version as plain files
    ...                                   # the function writes under /data
    wc.commit()                           # publish its changes; wc.reload() picks up others'

Importing this package loads no cloud SDK; obstore is imported when a cloud store is opened.
"""

from __future__ import annotations

from cloudmodal.volumes.engine import (
    PART_SIZE,
    Batch,
    FileEntry,
    FileEntryType,
    FileHead,
    Head,
    Snapshot,
    VolumeData,
)
from cloudmodal.volumes.errors import (
    CommitConflictError,
    CorruptDataError,
    KeyNotFoundError,
    StoreError,
    VolumeBusyError,
    VolumeError,
)
from cloudmodal.volumes.store import CloudStore, LocalStore, ObjectStore, open_store
from cloudmodal.volumes.working_copy import WorkingCopy

__all__ = [
    "PART_SIZE",
    "Batch",
    "CloudStore",
    "CommitConflictError",
    "CorruptDataError",
    "FileEntry",
    "FileEntryType",
    "FileHead",
    "Head",
    "KeyNotFoundError",
    "LocalStore",
    "ObjectStore",
    "Snapshot",
    "StoreError",
    "VolumeBusyError",
    "VolumeData",
    "VolumeError",
    "WorkingCopy",
    "open_store",
]
