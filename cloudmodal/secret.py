"""``cloudmodal.Secret``: environment variables injected into a function's containers.

For now a Secret is a value object: a name (``from_name``) or inline values (``from_dict``,
``from_local_environ``, ``from_dotenv``). Inline secrets get a generated name; the App keeps their values
(``App.inline_secret_values()``) so they never travel inside a spec.
"""

from __future__ import annotations

import os
import re
import secrets as _random
from collections.abc import Iterable, Mapping
from pathlib import Path

from cloudmodal._frozen import Frozen
from cloudmodal.exception import InvalidError

_NAME_RE = re.compile(r"^[a-zA-Z0-9\-_.]{1,64}$")
_APP_ID_RE = re.compile(r"^ap-[a-zA-Z0-9]{22}$")


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
        check_object_name(name, "Secret")
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
        if env_dict is None:
            env_dict = {}
        if not isinstance(env_dict, Mapping):
            raise InvalidError(
                f"Secret.from_dict expects a dict of str to str, not {type(env_dict).__name__}. "
                "E.g. Secret.from_dict({'API_KEY': 'xyz'})."
            )
        values: dict[str, str] = {}
        for k, v in env_dict.items():
            _check_env_key(k, "Secret.from_dict")
            if v is None:
                continue
            if not isinstance(v, str):
                raise InvalidError(
                    f"Secret.from_dict: the value of {k!r} must be a string, not {type(v).__name__} ({v!r}). "
                    f"Convert it, e.g. {{{k!r}: str({v!r})}}."
                )
            values[k] = v
        return Secret._inline(values)

    @staticmethod
    def from_local_environ(env_keys: Iterable[str]) -> Secret:
        """An inline secret copying the named variables from this process's environment."""
        if isinstance(env_keys, str):
            raise InvalidError(
                f"Secret.from_local_environ expects a list of names, not the string {env_keys!r}; "
                f"write Secret.from_local_environ([{env_keys!r}])."
            )
        keys = [_check_env_key(k, "Secret.from_local_environ") for k in env_keys]
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
