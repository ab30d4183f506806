"""``cloudmodal.Secret``: environment variables injected into a function's containers.

A Secret is a value object: a name (``from_name``: a secret stored on the control plane, encrypted, made with
``cloudmodal secret create`` or ``Secret.objects.create``) or inline values (``from_dict``,
``from_local_environ``, ``from_dotenv``). Inline secrets get a generated name; the App keeps their values
(``App.inline_secret_values()``) so they never travel inside a spec. A named secret's values never come back
to a client: the control plane checks it exists (and holds its ``required_keys``) when a function declaring it
is registered, and puts its values into the environment of that function's workers only.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets as _random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from cloudmodal._environment import check_environment
from cloudmodal._frozen import Frozen
from cloudmodal.exception import InvalidError

_NAME_RE = re.compile(r"^[a-zA-Z0-9\-_.]{1,64}$")
_APP_ID_RE = re.compile(r"^ap-[a-zA-Z0-9]{22}$")
# The generated names of inline secrets (see Secret._inline): reserved, so the control plane tells a spec's
# inline secrets (whose values travel with the function) from its named ones by the name alone.
_INLINE_NAME_RE = re.compile(r"^inline-[0-9a-f]{16}$")


def is_inline_name(name: str) -> bool:
    """Whether ``name`` is an inline secret's generated name (``inline-`` and 16 hex digits)."""
    return bool(_INLINE_NAME_RE.fullmatch(name))


def check_object_name(name: object, kind: str) -> str:
    """Validate a named object's name the way Modal does: ``[a-zA-Z0-9-_.]``, 1-64 characters."""
    if not isinstance(name, str):
        raise InvalidError(f"{kind} name must be a string, not {type(name).__name__} ({name!r}).")
    if not _NAME_RE.match(name) or _APP_ID_RE.match(name):
        raise InvalidError(
            f"Invalid {kind} name {name!r}. Names may contain only letters, digits, '-', '_' and '.', "
            "and be 1 to 64 characters long, e.g. 'my-secret'."
        )
    return name


def _check_env_key(key: object, where: str) -> str:
    if not isinstance(key, str) or not key or "=" in key or "\0" in key:
        raise InvalidError(
            f"{where}: invalid environment variable name {key!r}. Use a non-empty string without '=', "
            "e.g. 'API_KEY'."
        )
    return key


class Secret(Frozen):
    """A set of environment variables for a function.

    ```python
    @app.function(secrets=[cloudmodal.Secret.from_name("openai"), cloudmodal.Secret.from_dict({"MODE": "prod"})])
    def f():
        ...
    ```
    """

    __slots__ = ("name", "environment_name", "required_keys", "_values")
    _immutable_message = "Secret is immutable"

    name: str
    environment_name: str | None
    required_keys: tuple[str, ...]
    _values: dict[str, str] | None
    objects: ClassVar[SecretManager]  # Secret.objects.create/list/delete (set below the class)

    def __init__(
        self,
        name: str,
        *,
        values: Mapping[str, str] | None = None,
        environment_name: str | None = None,
        required_keys: Iterable[str] = (),
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "environment_name", environment_name)
        object.__setattr__(self, "required_keys", tuple(required_keys))
        object.__setattr__(self, "_values", dict(values) if values is not None else None)

    @staticmethod
    def from_name(
        name: str, *, environment_name: str | None = None, required_keys: Iterable[str] = ()
    ) -> Secret:
        """A secret stored on the control plane (``cloudmodal secret create NAME K=V``)."""
        _check_named(name)
        check_environment(environment_name, "Secret.from_name")
        if isinstance(required_keys, str):
            raise InvalidError(
                f"required_keys must be a list of names, not the string {required_keys!r}; "
                f"write required_keys=[{required_keys!r}]."
            )
        keys = [_check_env_key(k, f"Secret.from_name({name!r})") for k in required_keys]
        return Secret(name, environment_name=environment_name, required_keys=keys)

    @staticmethod
    def from_dict(env_dict: Mapping[str, str | None] | None = None) -> Secret:
        """An inline secret from a dict; ``None`` values are dropped (as in Modal)."""
        return Secret._inline(_check_values(env_dict, "Secret.from_dict"))

    @staticmethod
    def from_local_environ(env_keys: Iterable[str]) -> Secret:
        """An inline secret copying the named variables from this process's environment."""
        if isinstance(env_keys, str):
            raise InvalidError(
                f"Secret.from_local_environ expects a list of names, not the string {env_keys!r}; "
                f"write Secret.from_local_environ([{env_keys!r}])."
            )
        keys = [_check_env_key(k, "Secret.from_local_environ") for k in env_keys]
        if not _is_local():
            # In a container the module is imported again; the values came with the function's definition.
            return Secret._inline({})
        missing = [k for k in keys if k not in os.environ]
        if missing:
            raise InvalidError(
                f"Secret.from_local_environ: {', '.join(missing)} not set in the local environment. "
                f"Set {'it' if len(missing) == 1 else 'them'} in your shell (export {missing[0]}=...) "
                "or remove from the list."
            )
        return Secret._inline({k: os.environ[k] for k in keys})

    @staticmethod
    def from_dotenv(path: str | os.PathLike[str] | None = None, *, filename: str = ".env") -> Secret:
        """An inline secret read from a ``.env`` file, found in ``path`` (a directory, or a file such as
        ``__file__``, whose directory is used; default the working directory) or the nearest parent."""
        if not _is_local():
            # In a container the module is imported again, where the .env file is not; the values came with
            # the function's definition.
            return Secret._inline({})
        start = Path(path) if path is not None else Path.cwd()
        if start.is_file():
            start = start.parent
        start = start.resolve()
        for d in (start, *start.parents):
            candidate = d / filename
            if candidate.is_file():
                return Secret._inline(parse_dotenv(candidate.read_text(encoding="utf-8"), str(candidate)))
        raise InvalidError(
            f"Secret.from_dotenv: no {filename} file in {start} or any parent directory. Create one with "
            f"KEY=VALUE lines, pass path= (a directory or __file__), or use Secret.from_dict(...)."
        )

    @staticmethod
    def _inline(values: dict[str, str]) -> Secret:
        # A random name, not a hash of the values, so the spec never leaks anything about them.
        secret = Secret(f"inline-{_random.token_hex(8)}", values=values)
        _INLINE_REGISTRY[secret.name] = dict(values)
        return secret

    @property
    def is_inline(self) -> bool:
        return self._values is not None

    @property
    def values(self) -> dict[str, str] | None:
        """A copy of an inline secret's values (None for a named one)."""
        return dict(self._values) if self._values is not None else None

    # -- named secrets on the control plane ----------------------------------------------------------------
    def _named(self, what: str) -> str:
        if self.is_inline:
            raise InvalidError(
                f"Secret.{what}() is for named secrets (Secret.from_name); an inline secret lives only in "
                "this program."
            )
        return self.name

    def hydrate(self, client: Any = None) -> Secret:
        """Check now that this named secret exists on the control plane and holds its ``required_keys``
        (NotFoundError naming what is missing); runs and deployments check the same on their own."""
        if not self.is_inline:
            name = self._named("hydrate")
            _transport().post(f"/v1/secrets/{name}/check", {"required_keys": list(self.required_keys)})
        return self

    def info(self, client: Any = None) -> SecretInfo:
        """This named secret's name and dates (never its values)."""
        name = self._named("info")
        return SecretInfo.from_wire(_transport().get(f"/v1/secrets/{name}"))

    def update(self, env_dict: Mapping[str, str | None], client: Any = None) -> None:
        """Add keys to this named secret or replace their values (its other keys keep theirs; ``None``
        values are dropped, as in ``from_dict``). Workers started from now on see the new values."""
        name = self._named("update")
        values = _check_values(env_dict, f"Secret.from_name({name!r}).update", named=True)
        if not values:
            raise InvalidError(f"Secret.from_name({name!r}).update: nothing to update (no keys with values).")
        _transport().post(f"/v1/secrets/{name}/update", {"env": values})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self.name, self.environment_name, self._values) == (
            other.name,
            other.environment_name,
            other._values,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.environment_name))

    def __repr__(self) -> str:
        if self.is_inline:
            return f"Secret(inline, keys={sorted(self._values or {})})"
        return f"Secret.from_name({self.name!r})"


_NAMED_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")


def _check_values(
    env_dict: Mapping[str, str | None] | None, where: str, *, named: bool = False
) -> dict[str, str]:
    """A dict of secret values, ``None`` values dropped. Errors name the key, never the value. ``named``: the
    keys of a named secret, which must be environment variable names (Modal's rule for stored secrets)."""
    if env_dict is None:
        env_dict = {}
    if not isinstance(env_dict, Mapping):
        raise InvalidError(
            f"{where} expects a dict of str to str, not {type(env_dict).__name__}. E.g. {{'API_KEY': 'xyz'}}."
        )
    values: dict[str, str] = {}
    for k, v in env_dict.items():
        _check_env_key(k, where)
        if named and not _NAMED_KEY_RE.fullmatch(k):
            raise InvalidError(
                f"{where}: invalid key {k!r}. Keys of a named secret hold letters, digits and '_', do not start "
                "with a digit, and are at most 256 characters (e.g. API_KEY)."
            )
        if v is None:
            continue
        if not isinstance(v, str):
            raise InvalidError(
                f"{where}: the value of {k!r} must be a string, not {type(v).__name__}. Convert it with str()."
            )
        values[k] = v
    return values


def _check_named(name: object) -> str:
    check_object_name(name, "Secret")
    assert isinstance(name, str)
    if is_inline_name(name):
        raise InvalidError(
            f"Secret names like {name!r} are reserved for inline secrets; choose another name."
        )
    return name


def _transport() -> Any:
    """The transport of the current session (the running app's, a worker's, or the configured server's)."""
    from cloudmodal.client.session import current_session

    return current_session().transport


def _ts(t: float | None) -> _dt.datetime | None:
    return _dt.datetime.fromtimestamp(t, tz=_dt.UTC) if t else None


@dataclass(frozen=True)
class SecretInfo:
    """A named secret's metadata (``Secret.info()``, ``Secret.objects.list()``): never its values."""

    name: str
    created_at: _dt.datetime | None
    created_by: str | None
    updated_at: _dt.datetime | None
    last_used_at: _dt.datetime | None
    secret_id: str | None = None

    @staticmethod
    def from_wire(row: Mapping[str, Any]) -> SecretInfo:
        return SecretInfo(
            name=str(row["name"]),
            created_at=_ts(row.get("created_at")),
            created_by=row.get("created_by") or None,
            updated_at=_ts(row.get("updated_at")),
            last_used_at=_ts(row.get("last_used_at")),
            secret_id=row.get("id"),
        )


IfExists = Literal["fail", "skip", "overwrite"]


def create_named(name: str, env_dict: Mapping[str, str | None], *, if_exists: IfExists = "fail") -> bool:
    """Store secret ``name`` on the control plane; if one exists, ``if_exists``: ``fail``
    (AlreadyExistsError), ``skip`` (keep it) or ``overwrite`` (replace its values). True when it was created."""
    _check_named(name)
    values = _check_values(env_dict, f"Secret {name!r}", named=True)
    got = _transport().post("/v1/secrets", {"name": name, "env": values, "if_exists": if_exists})
    return bool(got.get("created"))


class SecretManager:
    """``Secret.objects``: manage named secrets (Modal's ``SecretManager``)."""

    @staticmethod
    def create(
        name: str,
        env_dict: Mapping[str, str | None],
        *,
        allow_existing: bool = False,
        environment_name: str | None = None,
        client: Any = None,
    ) -> None:
        """Create named secret ``name``. If it exists: AlreadyExistsError, or with ``allow_existing`` do
        nothing (its values are kept; ``cloudmodal secret create --force`` replaces them)."""
        check_environment(environment_name, "Secret.objects.create")
        create_named(name, env_dict, if_exists="skip" if allow_existing else "fail")

    @staticmethod
    def list(
        *,
        max_objects: int | None = None,
        created_before: _dt.datetime | str | None = None,
        environment_name: str = "",
        client: Any = None,
    ) -> list[Secret]:
        """The named secrets, newest first (``max_objects``: at most that many; ``created_before``: only
        older ones)."""
        check_environment(environment_name, "Secret.objects.list")
        rows = _transport().get("/v1/secrets")
        if created_before is not None:
            cut = (
                _dt.datetime.fromisoformat(created_before)
                if isinstance(created_before, str)
                else created_before
            )
            if cut.tzinfo is None:
                cut = cut.replace(tzinfo=_dt.UTC)
            rows = [r for r in rows if (r.get("created_at") or 0) < cut.timestamp()]
        if max_objects is not None:
            rows = rows[: max(0, max_objects)]
        return [Secret.from_name(r["name"]) for r in rows]

    @staticmethod
    def delete(
        name: str, *, allow_missing: bool = False, environment_name: str | None = None, client: Any = None
    ) -> None:
        """Delete named secret ``name`` (NotFoundError if there is none, unless ``allow_missing``). Functions
        that declare it cannot start new workers until it exists again."""
        check_environment(environment_name, "Secret.objects.delete")
        delete_named(name, allow_missing=allow_missing)


def delete_named(name: str, *, allow_missing: bool = False) -> bool:
    """Delete named secret ``name``; False where there was none (with ``allow_missing``)."""
    _check_named(name)
    return bool(
        _transport().post(f"/v1/secrets/{name}/delete", {"allow_missing": allow_missing}).get("deleted")
    )


Secret.objects = SecretManager()


# Values of every inline secret created in this process, by generated name: how a spec's secret names are
# resolved when the Secret object itself is out of reach (e.g. secrets passed to Function.with_options).
_INLINE_REGISTRY: dict[str, dict[str, str]] = {}


def inline_secret_registry() -> dict[str, dict[str, str]]:
    """Name → values of the inline secrets created in this process (a copy)."""
    return {k: dict(v) for k, v in _INLINE_REGISTRY.items()}


_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.\-]*)\s*=\s*(.*?)\s*$")


def parse_dotenv(text: str, source: str = ".env") -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``export`` prefix, ``#`` comments, single and double quotes)."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _DOTENV_LINE.match(line)
        if not m:
            raise InvalidError(f"{source}:{lineno}: expected KEY=VALUE, got {line.strip()!r}.")
        key, raw = m.group(1), m.group(2)
        if raw[:1] in ("'", '"'):
            q = raw[0]
            end = raw.find(q, 1)
            while q == '"' and end > 0 and raw[end - 1] == "\\":
                end = raw.find(q, end + 1)
            if end < 0:
                raise InvalidError(f"{source}:{lineno}: unterminated {q} quote in the value of {key}.")
            value = raw[1:end]
            if q == '"':
                value = (
                    value.replace("\\n", "\n").replace("\\t", "\t").replace('\\"', '"').replace("\\\\", "\\")
                )
        else:
            value = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
        out[key] = value
    return out


def _is_local() -> bool:
    """False inside a worker (see :func:`cloudmodal.is_local`)."""
    from cloudmodal.settings import settings

    return not settings().is_remote
