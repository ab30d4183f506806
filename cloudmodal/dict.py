"""``cloudmodal.Dict``: a distributed key-value store, Modal's ``modal.Dict`` API on the control plane's
database.

```python
d = cloudmodal.Dict.from_name("results", create_if_missing=True)
d["x"] = 1
d.put("y", [2, 3], skip_if_exists=True)
assert d.get("x") == 1 and "y" in d

with cloudmodal.Dict.ephemeral() as tmp:  # deleted on exit
    tmp.update({"a": 1}, b=2)
```

Keys and values are pickled with cloudpickle on the client (the control plane stores bytes and never
unpickles them). A key is the same key when it pickles to the same bytes: use keys that pickle
deterministically (``str``, ``bytes``, ``int``, ``float``, ``bool``, ``None`` and tuples of them), as Modal's
documentation advises; a set or an object with unordered state may pickle differently each time.

Limits: a key pickles to at most 64 KiB, a value to at most 8 MiB, one request (``update``) carries at
most 32 MiB (over any of them: :class:`~cloudmodal.exception.RequestSizeError`, nothing stored); ``len()``
counts up to 100,000; an entry neither written nor read for 7 days is deleted (Modal's rule).

A request whose answer is lost with its connection (the control plane restarted after committing it) is sent
again by the client's transport. Puts and updates are idempotent; ``pop`` and ``put(skip_if_exists=True)``
carry a request id, so their retry answers what the first attempt did (the popped value, whether it wrote)
instead of running again (the control plane keeps those answers 10 minutes).

This module also holds what dicts and queues share: the handle (``from_name``, ``from_id``, ``ephemeral``,
``objects``, ``info``) and the ``.aio`` twins of blocking methods.
"""

from __future__ import annotations

import datetime
import functools
import os
import pickle
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from cloudmodal._environment import check_environment
from cloudmodal.exception import InvalidError, NotFoundError

MAX_DICT_KEY = 64 * 1024  # bytes of a pickled key
MAX_DICT_VALUE = 8 * 1024 * 1024  # bytes of a pickled value
MAX_DICT_REQUEST = 32 * 1024 * 1024  # bytes of keys and values in one request (put, update)
DICT_LEN_CAP = 100_000  # len() counts this far (Modal's cap)
HEARTBEAT_S = 60.0  # how often an ephemeral object's context tells the control plane its client lives
SCAN_PAGE = 1000  # entries per request of keys(), values(), items()

T = TypeVar("T")
H = TypeVar("H", bound="_StoredObject")
_MISSING: Any = object()


# -- .aio twins -----------------------------------------------------------------------------------------------
class _Dual:
    """A bound blocking method with an ``.aio`` twin (``d.get(k)`` / ``await d.get.aio(k)``)."""

    def __init__(self, sync: Callable[..., Any], aio: Callable[..., Any]) -> None:
        self._sync = sync
        self.aio = aio
        self.__doc__ = sync.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync(*args, **kwargs)


class blocking(Generic[T]):  # noqa: N801 - used as a decorator
    """Decorates a blocking method: calling it blocks; ``.aio`` runs it on a thread and is awaited (an
    iterator-returning method's ``.aio`` is an async iterator)."""

    def __init__(self, fn: Callable[..., T], *, iterates: bool = False) -> None:
        self.fn = fn
        self.iterates = iterates
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self
        bound = self.fn.__get__(obj, cls)
        return _Dual(bound, _aiter(bound) if self.iterates else _athread(bound))


def iterating(fn: Callable[..., Iterator[T]]) -> blocking[Iterator[T]]:
    return blocking(fn, iterates=True)


def _athread(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def aio(*args: Any, **kwargs: Any) -> Any:
        import asyncio  # only async callers pay for it

        return await asyncio.to_thread(fn, *args, **kwargs)

    return aio


def _aiter(fn: Callable[..., Iterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def aio(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        import asyncio

        it = await asyncio.to_thread(fn, *args, **kwargs)
        done = object()
        while True:
            item = await asyncio.to_thread(next, it, done)
            if item is done:
                return
            yield item

    return aio


# -- the shared handle ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectInfo:
    """What ``info()`` answers (Modal's ``DictInfo`` / ``QueueInfo``)."""

    name: str | None
    created_at: datetime.datetime
    created_by: str | None


class _Objects(Generic[H]):
    """``Dict.objects`` / ``Queue.objects``: named objects of the team."""

    def __init__(self, cls: type[H]) -> None:
        self.cls = cls

    def create(self, name: str, *, allow_existing: bool = False, environment_name: str | None = None) -> None:
        """Create a named object (AlreadyExistsError if the name is taken, unless ``allow_existing``)."""
        from cloudmodal.secret import check_object_name

        check_object_name(name, self.cls._label)
        check_environment(environment_name, f"{self.cls._label}.objects.create")
        self.cls._post(self.cls._route, {"name": name, "allow_existing": allow_existing})

    def list(
        self,
        *,
        max_objects: int | None = None,
        created_before: datetime.datetime | str | None = None,
        environment_name: str = "",
    ) -> list[H]:
        """The named objects, newest first (at most ``max_objects``)."""
        check_environment(environment_name, f"{self.cls._label}.objects.list")
        if max_objects is not None and max_objects < 0:
            raise InvalidError(f"max_objects must be 0 or more, not {max_objects!r}.")
        before = created_before
        if isinstance(before, str):
            before = datetime.datetime.fromisoformat(before)
        params: dict[str, Any] = {"limit": 100_000 if max_objects is None else max_objects}
        if before is not None:
            params["created_before"] = before.timestamp()
        rows = self.cls._session().transport.get(self.cls._route, **params)
        return [self.cls._from_row(r) for r in rows]

    def delete(self, name: str, *, allow_missing: bool = False, environment_name: str | None = None) -> None:
        """Delete the named object and its contents (NotFoundError if missing, unless ``allow_missing``)."""
        check_environment(environment_name, f"{self.cls._label}.objects.delete")
        try:
            row = self.cls._post(f"{self.cls._route}/lookup", {"name": name})
        except NotFoundError:
            if allow_missing:
                return
            raise
        self.cls._post(f"{self.cls._route}/{row['id']}/delete", {})


class _ObjectsDescriptor:
    def __get__(self, obj: Any, cls: type[Any]) -> _Objects[Any]:
        return _Objects(cls)


class _Ephemeral(Generic[H]):
    """``with Dict.ephemeral() as d:`` (or ``async with``): a new object for the block, kept alive by a
    heartbeat thread, deleted on exit. An object whose client died is deleted by the control plane ten
    minutes after its last heartbeat."""

    def __init__(self, cls: type[H]) -> None:
        self.cls = cls
        self.obj: H | None = None
        self._stop = threading.Event()

    def __enter__(self) -> H:
        row = self.cls._post(self.cls._route, {})
        self.obj = self.cls._from_row(row)
        path = f"{self.cls._route}/{row['id']}/heartbeat"
        transport = self.cls._session().transport

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    transport.post(path, reconnect_timeout=30.0)
                except Exception:  # a missed beat is retried at the next; the object lives 10 minutes
                    pass

        threading.Thread(target=beat, name=f"{self.cls._label}-heartbeat", daemon=True).start()
        return self.obj

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self.obj is not None:
            try:
                self.cls._post(f"{self.cls._route}/{self.obj.object_id}/delete", {})
            except NotFoundError:
                pass

    async def __aenter__(self) -> H:
        import asyncio

        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, *exc_info: object) -> None:
        import asyncio

        await asyncio.to_thread(self.__exit__, *exc_info)


class _StoredObject:
    """A handle to a Dict or a Queue: lazy (``from_name`` looks the object up on first use), picklable (a
    function's arguments and globals may hold one), cheap to copy."""

    _label: ClassVar[str] = ""
    _route: ClassVar[str] = ""
    _prefix: ClassVar[str] = ""
    objects: ClassVar[Any] = _ObjectsDescriptor()

    def __init__(self, *, name: str | None, object_id: str | None, create_if_missing: bool = False) -> None:
        self._name = name
        self._id = object_id
        self._create_if_missing = create_if_missing
        self._lock = threading.Lock()

    # construction
    @classmethod
    def from_name(
        cls: type[H],
        name: str,
        *,
        environment_name: str | None = None,
        create_if_missing: bool = False,
        client: Any = None,
    ) -> H:
        """A handle to the object ``name``, looked up on first use: NotFoundError then if it does not exist,
        unless ``create_if_missing=True``."""
        from cloudmodal.secret import check_object_name

        check_object_name(name, cls._label)
        check_environment(environment_name, f"{cls._label}.from_name")
        if not isinstance(create_if_missing, bool):
            raise InvalidError(f"create_if_missing must be True or False, not {create_if_missing!r}.")
        return cls(name=name, object_id=None, create_if_missing=create_if_missing)

    @classmethod
    def from_id(cls: type[H], object_id: str, *, client: Any = None) -> H:
        """A handle to the object with this id (``obj.object_id``)."""
        if not isinstance(object_id, str) or not object_id.startswith(cls._prefix + "-"):
            raise InvalidError(
                f"{object_id!r} is not a {cls._label} id: those start with {cls._prefix + '-'!r}."
            )
        return cls(name=None, object_id=object_id)

    @classmethod
    def ephemeral(cls: type[H], *, client: Any = None, environment_name: str | None = None) -> _Ephemeral[H]:
        """A context manager making a new unnamed object, deleted when the block exits."""
        check_environment(environment_name, f"{cls._label}.ephemeral")
        return _Ephemeral(cls)

    @classmethod
    def _from_row(cls: type[H], row: Mapping[str, Any]) -> H:
        obj = cls(name=row.get("name"), object_id=row["id"])
        obj._row = dict(row)
        return obj

    # transport
    @staticmethod
    def _session() -> Any:
        from cloudmodal.client.session import current_session

        return current_session()

    @classmethod
    def _post(cls, path: str, body: Any) -> Any:
        return cls._session().transport.post(path, body)

    def _call(self, op: str, body: dict[str, Any]) -> Any:
        """A data operation on this object, over this thread's WebSocket to its route."""
        return self._session().transport.thread_channel(f"{self._route}/{self.object_id}/{op}").call(body)

    # identity
    @property
    def object_id(self) -> str:
        """The object's id, looking it up (or creating it) on first use."""
        if self._id is None:
            with self._lock:
                if self._id is None:
                    row = self._post(
                        f"{self._route}/lookup",
                        {"name": self._name, "create_if_missing": self._create_if_missing},
                    )
                    self._row = dict(row)
                    self._id = row["id"]
        assert self._id is not None
        return self._id

    @property
    def name(self) -> str | None:
        return self._name

    def hydrate(self: H) -> H:
        """Look the object up now (instead of on first use)."""
        _ = self.object_id
        return self

    @blocking
    def info(self) -> ObjectInfo:
        """The object's name, creation time and creator."""
        row = self._session().transport.get(f"{self._route}/{self.object_id}")
        return ObjectInfo(
            name=row.get("name"),
            created_at=datetime.datetime.fromtimestamp(row["created_at"], tz=datetime.UTC),
            created_by=row.get("created_by") or None,
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self._name, "id": self._id, "create_if_missing": self._create_if_missing}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            name=state["name"], object_id=state["id"], create_if_missing=state["create_if_missing"]
        )

    def __repr__(self) -> str:
        if self._name is not None:
            return f"{self._label}.from_name({self._name!r})"
        return f"{self._label}.from_id({self._id!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _StoredObject)
        if self._id is not None and other._id is not None:
            return self._id == other._id
        return self._name is not None and self._name == other._name

    def __hash__(self) -> int:
        return hash((self._label, self._name or self._id))


# -- Dict -------------------------------------------------------------------------------------------------------
def request_id() -> str:
    """A new id for one non-idempotent request (a queue put or get, a pop, a ``skip_if_exists`` put): sent
    with it, and with its retries (the transport sends the same body again), so that the control plane runs
    it once and answers a retry with the first attempt's answer."""
    return os.urandom(16).hex()


# Exact types that the standard library's pickler writes byte for byte as cloudpickle's does (cloudpickle only
# changes how functions, classes and modules are pickled): keys must pickle to the same bytes whichever path
# pickled them (tests/unit/test_kv_pickling.py checks a table of cases against cloudpickle).
_ATOMS = frozenset({str, bytes, int, float, bool, type(None)})
_CONTAINERS = frozenset({tuple, list, dict})
PLAIN_CHECK_NODES = 1000  # past this many nodes a value takes cloudpickle's path (the check stays cheap)
PROTOCOL = 4  # serialization.PROTOCOL, not imported from there: that module imports cloudpickle (slow)


def _plain(obj: Any) -> bool:
    """Whether ``obj`` is plain data: atoms in tuples, lists and dicts (exact types, no subclasses), at most
    PLAIN_CHECK_NODES of them."""
    stack = [obj]
    seen = 0
    while stack:
        o = stack.pop()
        t = type(o)
        if t in _ATOMS:
            continue
        if t not in _CONTAINERS:
            return False
        seen += len(o)
        if seen > PLAIN_CHECK_NODES:
            return False
        if t is dict:
            stack.extend(o.keys())
            stack.extend(o.values())
        else:
            stack.extend(o)
    return True


def _dumps(obj: Any) -> bytes:
    """Pickle a key or value: plain data with the standard library's pickler (5 to 7 times faster than
    cloudpickle's, which builds a pickler per call; the same bytes), anything else with cloudpickle."""
    if type(obj) in _ATOMS or _plain(obj):
        return pickle.dumps(obj, protocol=PROTOCOL)
    from cloudmodal.serialization import serialize

    return serialize(obj)


def _loads(data: bytes) -> Any:
    from cloudmodal.serialization import deserialize

    return deserialize(data, "dict entry")


def _check_sizes(entries: list[tuple[bytes, bytes]]) -> None:
    """The limits, checked before sending (the control plane checks them again)."""
    from cloudmodal.exception import RequestSizeError

    total = 0
    for k, v in entries:
        if len(k) > MAX_DICT_KEY:
            raise RequestSizeError(
                f"A dict key pickles to {len(k):,} bytes, over the limit of {MAX_DICT_KEY:,}. Use a shorter "
                "key (a string, or a hash of the object). Nothing was stored."
            )
        if len(v) > MAX_DICT_VALUE:
            raise RequestSizeError(
                f"A dict value pickles to {len(v):,} bytes, over the limit of {MAX_DICT_VALUE:,} (8 MiB). "
                "Store large data in a Volume and put its path in the dict. Nothing was stored."
            )
        total += len(k) + len(v)
    if total > MAX_DICT_REQUEST:
        raise RequestSizeError(
            f"An update of {total:,} bytes is over the limit of {MAX_DICT_REQUEST:,} bytes (32 MiB) per "
            "request. Split it into several smaller updates. Nothing was stored."
        )


class Dict(_StoredObject):
    """A distributed dictionary (see the module's docstring for keys, values and limits)."""

    _label = "Dict"
    _route = "/v1/dicts"
    _prefix = "di"

    @blocking
    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when absent."""
        k = _dumps(key)
        _check_sizes([(k, b"")])
        (v,) = self._call("get", {"keys": [k]})["values"]
        return default if v is None else _loads(v)

    @blocking
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Set ``key`` to ``value``; with ``skip_if_exists``, only when ``key`` is absent. Returns whether it
        was written (of racing ``skip_if_exists`` puts of one key, exactly one returns True)."""
        entry = (_dumps(key), _dumps(value))
        _check_sizes([entry])
        body: dict[str, Any] = {"entries": [entry], "skip_if_exists": bool(skip_if_exists)}
        if skip_if_exists:  # its answer says whether this call wrote: a retry must answer the same
            body["request_id"] = request_id()
        r = self._call("put", body)
        return bool(r["written"])

    @blocking
    def update(self, mapping: Mapping[Any, Any] | Any = None, /, **kwargs: Any) -> None:
        """Set many keys in one request (atomic: all or none), as ``dict.update``."""
        items: list[tuple[Any, Any]] = []
        if mapping is not None:
            items.extend(mapping.items() if hasattr(mapping, "items") else mapping)
        items.extend(kwargs.items())
        entries = [(_dumps(k), _dumps(v)) for k, v in items]
        _check_sizes(entries)
        if entries:
            self._call("put", {"entries": entries, "skip_if_exists": False})

    @blocking
    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value; KeyError when absent and no ``default`` is given."""
        v = self._call("pop", {"key": _dumps(key), "request_id": request_id()})["value"]
        if v is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return _loads(v)

    @blocking
    def contains(self, key: Any) -> bool:
        return bool(self._call("contains", {"key": _dumps(key)})["found"])

    @blocking
    def len(self) -> int:
        """The number of entries, counted up to 100,000 (a scan, as in Modal: use sparingly)."""
        return int(self._call("len", {})["len"])

    @blocking
    def clear(self) -> None:
        """Remove every entry."""
        self._call("clear", {})

    def _scan(self, keys: bool, values: bool) -> Iterator[list[bytes]]:
        after = ""
        while True:
            r = self._call("scan", {"after": after, "limit": SCAN_PAGE, "keys": keys, "values": values})
            yield from r["entries"]
            if r["next"] is None:
                return
            after = r["next"]

    @iterating
    def keys(self) -> Iterator[Any]:
        """Every key (in no particular order), fetched in pages as it is iterated."""
        return (_loads(e[0]) for e in self._scan(True, False))

    @iterating
    def values(self) -> Iterator[Any]:
        return (_loads(e[0]) for e in self._scan(False, True))

    @iterating
    def items(self) -> Iterator[tuple[Any, Any]]:
        return ((_loads(e[0]), _loads(e[1])) for e in self._scan(True, True))

    # dict syntax (blocking)
    def __getitem__(self, key: Any) -> Any:
        v = self.get(key, _MISSING)
        if v is _MISSING:
            raise KeyError(key)
        return v

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value)

    def __delitem__(self, key: Any) -> None:
        self.pop(key)

    def __contains__(self, key: Any) -> bool:
        return bool(self.contains(key))


__all__ = ["DICT_LEN_CAP", "Dict", "ObjectInfo"]
