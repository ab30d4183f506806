"""``cloudmodal.Volume``: a named, persistent file system mounted into functions (``volumes={path: vol}``).

For now a handle holding the name; I/O (commit, reload, read_file…) arrives with the storage work.
"""

from __future__ import annotations

from cloudmodal._frozen import Frozen
from cloudmodal.exception import InvalidError
from cloudmodal.secret import check_object_name


class Volume(Frozen):
    """A named volume.

    ```python
    vol = cloudmodal.Volume.from_name("weights", create_if_missing=True)

    @app.function(volumes={"/weights": vol})
    def f():
        ...
    ```
    """

    __slots__ = ("name", "environment_name", "create_if_missing", "version")
    _immutable_message = "Volume handles are immutable"

    name: str
    environment_name: str | None
    create_if_missing: bool
    version: int | None

    def __init__(
        self,
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "environment_name", environment_name)
        object.__setattr__(self, "create_if_missing", create_if_missing)
        object.__setattr__(self, "version", version)

    @staticmethod
    def from_name(
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        version: int | None = None,
    ) -> Volume:
        """A lazy handle to the volume ``name``; with ``create_if_missing=True`` it is created on first use."""
        check_object_name(name, "Volume")
        if not isinstance(create_if_missing, bool):
            raise InvalidError(f"create_if_missing must be True or False, not {create_if_missing!r}.")
        if version not in (None, 1, 2):
            raise InvalidError(f"Volume version must be 1, 2 or None (the default), not {version!r}.")
        return Volume(
            name, environment_name=environment_name, create_if_missing=create_if_missing, version=version
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Volume) and (self.name, self.environment_name) == (
            other.name,
            other.environment_name,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.environment_name))

    def __repr__(self) -> str:
        return f"Volume.from_name({self.name!r})"
