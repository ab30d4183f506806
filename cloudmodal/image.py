"""``cloudmodal.Image``: an immutable, hashable recipe for a function's environment.

Each builder method returns a new Image with one more layer. The recipe is data: it hashes the same in every
process (``image.hash``), travels as ``image.to_wire()``, and renders as a bash setup script (SkyPilot's
``setup``) or a Dockerfile (the renderers are in :mod:`cloudmodal.image_render`). Nothing here builds
anything; reading a requirements file is the only I/O, so that the hash changes when the file does.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from cloudmodal import image_render
from cloudmodal._frozen import Frozen
from cloudmodal.exception import InvalidError
from cloudmodal.secret import Secret

SUPPORTED_PYTHON_VERSIONS: tuple[str, ...] = ("3.10", "3.11", "3.12", "3.13")
WIRE_VERSION = 1

_PY_VERSION_RE = re.compile(r"^3\.(\d+)(\.\d+)?$")
_PIP_NAME_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?((===|==|~=|!=|>=|<=|>|<)[^\s;]+)?$")
_APT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]+(:[a-z0-9\-]+)?(=[A-Za-z0-9.+~:\-]+)?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def default_python_version() -> str:
    """The local interpreter's ``major.minor`` (so pickles match), clamped to the supported range."""
    local = (sys.version_info.major, sys.version_info.minor)
    versions = [tuple(int(x) for x in v.split(".")) for v in SUPPORTED_PYTHON_VERSIONS]
    chosen = min(max(local, versions[0]), versions[-1])
    return f"{chosen[0]}.{chosen[1]}"


def _check_python_version(v: object) -> str:
    supported = ", ".join(SUPPORTED_PYTHON_VERSIONS)
    if not isinstance(v, str):
        raise InvalidError(
            f"python_version must be a string such as '3.11', not {type(v).__name__} ({v!r}). Supported: {supported}."
        )
    m = _PY_VERSION_RE.match(v.strip())
    if not m:
        raise InvalidError(
            f"Invalid python_version {v!r}. Write it as MAJOR.MINOR, e.g. '3.11'. Supported: {supported}."
        )
    if f"3.{m.group(1)}" not in SUPPORTED_PYTHON_VERSIONS:
        raise InvalidError(f"Unsupported python_version {v!r}. Supported: {supported}.")
    return v.strip()


def _flatten(method: str, what: str, args: Iterable[Any]) -> list[str]:
    """``f("a", ["b", "c"])`` → ``["a", "b", "c"]``; anything but strings is an error."""
    out: list[str] = []
    for a in args:
        items = list(a) if isinstance(a, list | tuple) else [a]
        for x in items:
            if not isinstance(x, str):
                raise InvalidError(
                    f"Image.{method}: {what} must be strings, got {type(x).__name__} ({x!r}). "
                    f"E.g. Image.{method}('numpy', 'pandas')."
                )
            out.append(x)
    return out


def _check_pip_spec(method: str, spec: str) -> str:
    s = spec.strip()
    if not s:
        raise InvalidError(
            f"Image.{method}: empty package name {spec!r}. Remove it, or give a name like 'numpy'."
        )
    if "\n" in s or "\r" in s:
        raise InvalidError(
            f"Image.{method}: package {spec!r} contains a line break. Pass one requirement per argument, "
            "or use pip_install_from_requirements('requirements.txt')."
        )
    if s.startswith("-"):
        raise InvalidError(
            f"Image.{method}: {s!r} looks like a pip option, not a package. Pass options by keyword: "
            "index_url=, extra_index_url=, find_links=, pre=True, or extra_options='...'."
        )
    tokens = s.split()
    if len(tokens) > 1 and all(_PIP_NAME_TOKEN.match(t) for t in tokens):
        args = ", ".join(repr(t) for t in tokens)
        raise InvalidError(
            f"Image.{method}: {s!r} looks like {len(tokens)} packages in one string. "
            f"Pass them as separate arguments: Image.{method}({args})."
        )
    return s


def _check_env_dict(where: str, env: object) -> dict[str, str]:
    if not isinstance(env, Mapping):
        raise InvalidError(
            f"{where} expects a dict of str to str, e.g. {{'HF_HOME': '/cache'}}; got {type(env).__name__}."
        )
    out: dict[str, str] = {}
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_NAME_RE.match(k):
            raise InvalidError(
                f"{where}: invalid environment variable name {k!r}. Use letters, digits and '_', "
                "not starting with a digit, e.g. 'HF_HOME'."
            )
        if not isinstance(v, str):
            raise InvalidError(
                f"{where}: the value of {k!r} must be a string, not {type(v).__name__} ({v!r}). "
                f"Convert it, e.g. {{{k!r}: str({v!r})}}."
            )
        out[k] = v
    return out


def _in_worker() -> bool:
    """Whether this process is a worker. A worker imports the user's module too, which rebuilds its images,
    but never builds or checks them (the control plane holds the recipe the client registered), and the
    local files an image reads are not there: a missing one is no error in a worker."""
    from cloudmodal.settings import settings

    return settings().is_remote


def _read_requirements(method: str, path: str | Path) -> dict[str, str]:
    p = Path(path).expanduser()
    try:
        content = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if _in_worker():
            return {"path": p.name, "content": ""}
        raise InvalidError(
            f"Image.{method}: requirements file {str(path)!r} not found (resolved to {p.resolve()}). "
            "Relative paths are relative to the working directory; pass an absolute path, e.g. "
            "Path(__file__).parent / 'requirements.txt'."
        ) from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise InvalidError(f"Image.{method}: cannot read requirements file {str(path)!r}: {e}.") from None
    for lineno, line in enumerate(content.splitlines(), 1):
        stripped = line.strip()
        if re.match(r"^(-r|--requirement|-c|--constraint)(\s|=|$)", stripped):
            raise InvalidError(
                f"Image.{method}: {p.name} line {lineno} includes another file ({stripped!r}), which is not "
                "carried into the image. List those packages directly, or add that file with its own "
                "pip_install_from_requirements(...) call."
            )
    return {"path": p.name, "content": content}


def _requirement_lines(content: str) -> list[str]:
    reqs = []
    for line in content.splitlines():
        s = re.split(r"(^|\s)#", line, maxsplit=1)[0].strip()
        if s and not s.startswith("-"):
            reqs.append(s)
    return reqs


def _module_of(f: Callable[..., Any]) -> str:
    module = getattr(f, "__module__", None) or "__main__"
    if module == "__main__":
        try:
            return Path(inspect.getfile(f)).stem
        except (TypeError, OSError):
            return module
    return module


def _project_requirements(
    where: str, data: Mapping[str, Any], groups: Sequence[str], extras: Sequence[str]
) -> list[str]:
    """The requirement strings a uv project declares: ``[project].dependencies``, the chosen
    ``[project.optional-dependencies]`` extras and ``[dependency-groups]`` (``{include-group = ...}``
    followed). Unknown extras or groups are errors, as they are to ``uv sync``."""
    project = data.get("project", {})
    out = [str(r) for r in project.get("dependencies", [])]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise InvalidError(
                f"{where}: extra {extra!r} is not in [project.optional-dependencies]; the extras are "
                f"{sorted(optional) or 'none'}."
            )
        out += [str(r) for r in optional[extra]]
    declared = data.get("dependency-groups", {})

    def group(name: str, seen: tuple[str, ...]) -> list[str]:
        if name not in declared:
            raise InvalidError(
                f"{where}: group {name!r} is not in [dependency-groups]; the groups are "
                f"{sorted(declared) or 'none'}."
            )
        if name in seen:
            raise InvalidError(f"{where}: [dependency-groups] includes {name!r} in a cycle.")
        reqs: list[str] = []
        for item in declared[name]:
            if isinstance(item, Mapping) and "include-group" in item:
                reqs += group(str(item["include-group"]), (*seen, name))
            else:
                reqs.append(str(item))
        return reqs

    for g in groups:
        out += group(g, ())
    return list(dict.fromkeys(out))


class Image(Frozen):
    """A container image recipe.

    ```python
    image = (
        cloudmodal.Image.debian_slim(python_version="3.11")
        .apt_install("git")
        .pip_install("torch==2.4.0", "transformers")
        .env({"HF_HOME": "/cache"})
    )

    @app.function(image=image, gpu="H100")
    def f():
        ...
    ```
    """

    __slots__ = ("_base", "_layers", "_secrets", "_hash")
    _immutable_message = "Image is immutable: builder methods return a new Image"

    _base: str  # canonical JSON of {"kind": ..., "python_version": ...}
    _layers: tuple[str, ...]  # canonical JSON of each layer
    _secrets: tuple[Secret, ...]  # Secret objects used by build steps (inline values stay out of the wire)
    _hash: str

    def __init__(self) -> None:
        raise InvalidError("Build an Image with a constructor such as cloudmodal.Image.debian_slim().")

    @classmethod
    def _make(
        cls, base: Mapping[str, Any], layers: Sequence[Mapping[str, Any]], secrets: Iterable[Secret] = ()
    ) -> Image:
        self = object.__new__(cls)
        base_s = _canonical(dict(base))
        layers_s = tuple(_canonical(dict(layer)) for layer in layers)
        hashed = [json.loads(s) for s in layers_s]
        for layer in hashed:
            layer.pop("force_build", None)  # forces a rebuild; not part of what the image *is*
        hashed_base = json.loads(base_s)
        hashed_base.pop("force_build", None)
        digest = hashlib.sha256(_canonical({"base": hashed_base, "layers": hashed}).encode()).hexdigest()
        object.__setattr__(self, "_base", base_s)
        object.__setattr__(self, "_layers", layers_s)
        object.__setattr__(self, "_secrets", tuple(secrets))
        object.__setattr__(self, "_hash", digest)
        return self

    # ---------------------------------------------------------------- constructors

    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> Image:
        """Debian (bookworm) with Python; ``python_version`` defaults to the local interpreter's."""
        pv = default_python_version() if python_version is None else _check_python_version(python_version)
        base: dict[str, Any] = {"kind": "debian_slim", "python_version": pv}
        if force_build:
            base["force_build"] = True
        return Image._make(base, [])

    @staticmethod
    def from_wire(d: Mapping[str, Any]) -> Image:
        """Rebuild an Image from :meth:`to_wire` (the runtime's way to render a function's image)."""
        if d.get("version") != WIRE_VERSION:
            raise ValueError(f"unsupported image wire version {d.get('version')!r}")
        img = Image._make(d["base"], d.get("layers", []))
        if d.get("hash") not in (None, img.hash):
            raise ValueError("image wire form does not match its hash")
        return img

    # ---------------------------------------------------------------- builder methods

    def _add(
        self,
        layer: dict[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: str | None = None,
        force_build: bool = False,
    ) -> Image:
        method = layer["op"]
        if env:
            layer["env"] = _check_env_dict(f"Image.{method}(env=...)", env)
        new_secrets = list(self._secrets)
        if secrets:
            if isinstance(secrets, Secret) or not isinstance(secrets, Sequence):
                raise InvalidError(
                    f"Image.{method}(secrets=...) expects a list of cloudmodal.Secret, e.g. secrets=[s]."
                )
            for s in secrets:
                if not isinstance(s, Secret):
                    raise InvalidError(f"Image.{method}(secrets=...): {s!r} is not a cloudmodal.Secret.")
                new_secrets.append(s)
            layer["secrets"] = [s.name for s in secrets]
        if gpu is not None:
            from cloudmodal.gpu import parse_gpu_spec

            layer["gpu"] = str(parse_gpu_spec(gpu))
        if force_build:
            layer["force_build"] = True
        layers = [json.loads(s) for s in self._layers] + [layer]
        return Image._make(json.loads(self._base), layers, new_secrets)

    @staticmethod
    def _index_options(
        find_links: str | None,
        index_url: str | None,
        extra_index_url: str | None,
        pre: bool,
        extra_options: str,
        method: str,
    ) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        for key, value in (
            ("find_links", find_links),
            ("index_url", index_url),
            ("extra_index_url", extra_index_url),
        ):
            if value is not None:
                if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
                    raise InvalidError(
                        f"Image.{method}: {key} must be one URL or path without spaces, got {value!r}."
                    )
                opts[key] = value.strip()
        if pre:
            opts["pre"] = True
        if extra_options:
            if not isinstance(extra_options, str):
                raise InvalidError(f"Image.{method}: extra_options must be a string such as '--no-deps'.")
            try:
                opts["extra_options"] = shlex.split(extra_options)
            except ValueError as e:
                raise InvalidError(
                    f"Image.{method}: cannot parse extra_options {extra_options!r}: {e}."
                ) from None
        return opts

    def pip_install(
        self,
        *packages: str | list[str],
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: str | None = None,
    ) -> Image:
        """Install packages with pip (``pip_install("torch==2.4.0", "numpy<2")``)."""
        pkgs = [_check_pip_spec("pip_install", p) for p in _flatten("pip_install", "packages", packages)]
        if not pkgs:
            return self
        layer = {"op": "pip_install", "packages": sorted(pkgs)}
        layer.update(
            self._index_options(find_links, index_url, extra_index_url, pre, extra_options, "pip_install")
        )
        return self._add(layer, env=env, secrets=secrets, gpu=gpu, force_build=force_build)

    def uv_pip_install(
        self,
        *packages: str | list[str],
        requirements: list[str] | str | None = None,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        uv_version: str | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: str | None = None,
    ) -> Image:
        """Install packages (and requirements files, read now) with ``uv pip install``."""
        pkgs = [
            _check_pip_spec("uv_pip_install", p) for p in _flatten("uv_pip_install", "packages", packages)
        ]
        req_paths = [requirements] if isinstance(requirements, str | Path) else list(requirements or [])
        reqs = [_read_requirements("uv_pip_install", p) for p in req_paths]
        if not pkgs and not reqs:
            return self
        layer: dict[str, Any] = {"op": "uv_pip_install", "packages": sorted(pkgs)}
        if reqs:
            layer["requirements"] = reqs
        if uv_version is not None:
            if not isinstance(uv_version, str) or not re.match(r"^[0-9][0-9a-zA-Z.+-]*$", uv_version):
                raise InvalidError(
                    f"Image.uv_pip_install: uv_version must look like '0.5.11', got {uv_version!r}."
                )
            layer["uv_version"] = uv_version
        layer.update(
            self._index_options(find_links, index_url, extra_index_url, pre, extra_options, "uv_pip_install")
        )
        return self._add(layer, env=env, secrets=secrets, gpu=gpu, force_build=force_build)

    def uv_sync(
        self,
        uv_project_dir: str | Path = "./",
        *,
        force_build: bool = False,
        groups: Sequence[str] | None = None,
        extras: Sequence[str] | None = None,
        frozen: bool = True,
        extra_options: str = "",
        uv_version: str | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: str | None = None,
    ) -> Image:
        """Install the dependencies of a uv project (its ``pyproject.toml`` and ``uv.lock``) with ``uv sync``.

        ```python
        image = cloudmodal.Image.debian_slim().uv_sync()  # ./pyproject.toml and ./uv.lock
        ```

        As in Modal, the project itself is not installed (``--no-install-project``): add its code with
        :meth:`add_local_python_source`. Both files are read now and become part of the recipe, so editing
        either changes the image. ``frozen=True`` (the default) installs exactly what ``uv.lock`` pins
        (``uv sync --frozen``) and needs the lock file; ``frozen=False`` lets uv resolve again. uv workspaces
        are not supported (as in Modal).

        The packages go into the function's environment beside cloudmodal's own (``--inexact``). On this
        machine's local provider, which runs the host's interpreter, the project's declared requirements
        (``[project].dependencies`` plus the chosen extras and groups) are what is checked and installed;
        the lock file's pins are applied on cloud nodes.
        """
        where = "Image.uv_sync"
        project = Path(uv_project_dir).expanduser()
        pyproject = project / "pyproject.toml"
        try:
            pyproject_text = pyproject.read_text(encoding="utf-8")
        except FileNotFoundError:
            if _in_worker():
                return self  # see _in_worker
            raise InvalidError(
                f"{where}: no pyproject.toml in {str(uv_project_dir)!r} (resolved to {project.resolve()}). "
                "Pass the uv project's directory, e.g. Image.debian_slim().uv_sync('path/to/project'); "
                "relative paths are relative to the working directory."
            ) from None
        except (IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as e:
            raise InvalidError(f"{where}: cannot read {pyproject}: {e}.") from None
        try:
            data = tomllib.loads(pyproject_text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidError(f"{where}: {pyproject} is not valid TOML: {e}.") from None
        if "workspace" in data.get("tool", {}).get("uv", {}):
            raise InvalidError(
                f"{where}: {pyproject} declares a uv workspace ([tool.uv.workspace]), which uv_sync does not "
                "support (nor does Modal's). Export its requirements instead: `uv export --frozen "
                "--no-hashes -o requirements.txt`, then Image.uv_pip_install(requirements=['requirements.txt'])."
            )
        group_names = self._names(where, "groups", groups)
        extra_names = self._names(where, "extras", extras)
        requirements = _project_requirements(where, data, group_names, extra_names)
        lock = project / "uv.lock"
        layer: dict[str, Any] = {
            "op": "uv_sync",
            "pyproject": pyproject_text,
            "packages": requirements,  # what the local provider checks (pip_packages); uv reads the files
        }
        if lock.is_file():
            layer["lock"] = lock.read_text(encoding="utf-8")
        elif frozen and not _in_worker():
            raise InvalidError(
                f"{where}: frozen=True installs what uv.lock pins, but {project.resolve()} has no uv.lock. "
                "Run `uv lock` there first, or pass frozen=False to let uv resolve the dependencies."
            )
        if group_names:
            layer["groups"] = group_names
        if extra_names:
            layer["extras"] = extra_names
        layer["frozen"] = bool(frozen)
        if uv_version is not None:
            if not isinstance(uv_version, str) or not re.match(r"^[0-9][0-9a-zA-Z.+-]*$", uv_version):
                raise InvalidError(f"{where}: uv_version must look like '0.5.11', got {uv_version!r}.")
            layer["uv_version"] = uv_version
        layer.update(self._index_options(None, None, None, False, extra_options, "uv_sync"))
        return self._add(layer, env=env, secrets=secrets, gpu=gpu, force_build=force_build)

    @staticmethod
    def _names(where: str, what: str, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return []
        if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
            raise InvalidError(
                f"{where}: {what} must be a list of names, e.g. {what}=['dev']; got {names!r}."
            )
        return [n.strip() for n in names]

    def pip_install_from_requirements(
        self,
        requirements_txt: str | Path,
        find_links: str | None = None,
        *,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: str | None = None,
    ) -> Image:
        """Install a requirements file with pip. Its content is read now and becomes part of the recipe."""
        layer: dict[str, Any] = {"op": "pip_install_requirements"}
        layer.update(_read_requirements("pip_install_from_requirements", requirements_txt))
        layer.update(
            self._index_options(
                find_links, index_url, extra_index_url, pre, extra_options, "pip_install_from_requirements"
            )
        )
        return self._add(layer, env=env, secrets=secrets, gpu=gpu, force_build=force_build)

    def apt_install(
        self,
        *packages: str | list[str],
        force_build: bool = False,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        gpu: str | None = None,
    ) -> Image:
        """Install Debian packages (``apt_install("git", "ffmpeg")``)."""
        pkgs = []
        for p in _flatten("apt_install", "packages", packages):
            s = p.strip()
            if not _APT_NAME_RE.match(s):
                hint = ""
                if len(s.split()) > 1:
                    hint = f" Pass several packages as separate arguments: apt_install({', '.join(repr(t) for t in s.split())})."
                raise InvalidError(
                    f"Image.apt_install: invalid Debian package name {p!r}. Names are lowercase letters, digits and "
                    f"'+-.' (at least 2 characters), optionally with =VERSION, e.g. 'git' or 'curl=7.88.1-10'.{hint}"
                )
            pkgs.append(s)
        if not pkgs:
            return self
        return self._add(
            {"op": "apt_install", "packages": sorted(pkgs)},
            env=env,
            secrets=secrets,
            gpu=gpu,
            force_build=force_build,
        )

    def run_commands(
        self,
        *commands: str | list[str],
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        volumes: Mapping[str, Any] | None = None,
        gpu: str | None = None,
        force_build: bool = False,
    ) -> Image:
        """Run shell commands, in order, as build steps."""
        cmds = _flatten("run_commands", "commands", commands)
        for c in cmds:
            if not c.strip():
                raise InvalidError(
                    "Image.run_commands: empty command. Remove it, or give a shell command like 'echo hi'."
                )
        if volumes:
            raise InvalidError(
                "Image.run_commands(volumes=...) is not supported: build steps run without volumes. "
                "Download into the image instead, or read the volume at run time from a function."
            )
        if not cmds:
            return self
        return self._add(
            {"op": "run_commands", "commands": cmds},
            env=env,
            secrets=secrets,
            gpu=gpu,
            force_build=force_build,
        )

    def env(self, vars: dict[str, str]) -> Image:  # noqa: A002 - Modal's parameter name
        """Set environment variables in the image (and in every function that uses it)."""
        values = _check_env_dict("Image.env", vars)
        if not values:
            return self
        return self._add({"op": "env", "vars": values})

    def workdir(self, path: str | PurePosixPath) -> Image:
        """Set the working directory for later build steps and for the function."""
        p = str(path) if isinstance(path, str | PurePosixPath) else None
        if not p or not p.startswith("/"):
            raise InvalidError(f"Image.workdir: the path must be absolute, e.g. '/app'; got {path!r}.")
        return self._add({"op": "workdir", "path": str(PurePosixPath(p))})

    def add_local_python_source(
        self, *modules: str, copy: bool = False, ignore: Sequence[str] | Callable[..., bool] | None = None
    ) -> Image:
        """Ship local Python packages/modules (by import name) with the image, on ``PYTHONPATH``.

        Only the names are recorded here; the client finds and uploads their files.
        """
        names = _flatten("add_local_python_source", "module names", modules)
        for m in names:
            if not _MODULE_RE.match(m):
                raise InvalidError(
                    f"Image.add_local_python_source: {m!r} is not an importable module name. Pass names as you "
                    "would import them, e.g. add_local_python_source('mypkg', 'mypkg.utils'), not file paths."
                )
        if not names:
            return self
        layer: dict[str, Any] = {"op": "add_local_python_source", "modules": names}
        if copy:
            layer["copy"] = True
        if ignore is not None:
            if callable(ignore):
                layer["ignore"] = [f"callable:{_module_of(ignore)}.{getattr(ignore, '__qualname__', '?')}"]
            else:
                layer["ignore"] = _flatten("add_local_python_source", "ignore patterns", [list(ignore)])
        return self._add(layer)

    @contextlib.contextmanager
    def imports(self) -> Iterator[None]:
        """Import, at module level, packages that only the image has:

        ```python
        image = cloudmodal.Image.debian_slim().pip_install("torch")

        with image.imports():
            import torch  # needed in the worker, not on this machine
        ```

        On this machine (:func:`cloudmodal.is_local`) an ``ImportError`` inside the block is swallowed, so the
        program runs without the package installed here; in a worker it is raised, since the image should have
        it. Only import failures are swallowed (Modal swallows any exception locally): another error in the
        block is a bug that should show.
        """
        try:
            yield
        except ImportError:
            if _in_worker():
                raise

    def run_function(
        self,
        raw_f: Callable[..., Any],
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Sequence[Secret] | None = None,
        volumes: Mapping[str, Any] | None = None,
        network_file_systems: Mapping[str, Any] | None = None,
        gpu: str | None = None,
        cpu: float | None = None,
        memory: int | None = None,
        timeout: int = 3600,
        cloud: str | None = None,
        region: str | Sequence[str] | None = None,
        force_build: bool = False,
        include_source: bool = True,
    ) -> Image:
        """Run a module-level function as a build step (e.g. to download model weights into the image).

        The function is recorded by module and qualified name, with a hash of its source so that editing
        it changes the image; ``args``/``kwargs`` must be JSON values so the recipe hashes stably.
        """
        f = raw_f.get_raw_f() if hasattr(raw_f, "get_raw_f") else raw_f
        if not inspect.isfunction(f):
            raise InvalidError(
                f"Image.run_function expects a function, got {type(raw_f).__name__} ({raw_f!r})."
            )
        qualname = f.__qualname__
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise InvalidError(
                f"Image.run_function: {qualname} is defined inside another function or is a lambda, so the "
                "build cannot import it. Define it at module level."
            )
        if volumes or network_file_systems:
            raise InvalidError(
                "Image.run_function(volumes=...) is not supported: build steps run without volumes."
            )
        kwargs = dict(kwargs or {})
        try:
            args_json = json.loads(_canonical(list(args)))
            kwargs_json = json.loads(_canonical(kwargs))
        except (TypeError, ValueError) as e:
            raise InvalidError(
                f"Image.run_function({qualname}): args and kwargs must be JSON values (str, int, float, bool, "
                f"None, lists and dicts) so the image hash is stable: {e}."
            ) from None
        try:
            source = inspect.getsource(f).encode()
        except (OSError, TypeError):
            source = f.__code__.co_code
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
            raise InvalidError(f"Image.run_function: timeout must be 1 to 86400 seconds, got {timeout!r}.")
        layer: dict[str, Any] = {
            "op": "run_function",
            "module": _module_of(f),
            "qualname": qualname,
            "source_sha256": hashlib.sha256(source).hexdigest(),
            "args": args_json,
            "kwargs": kwargs_json,
            "timeout": timeout,
        }
        if cpu is not None:
            layer["cpu"] = cpu
        if memory is not None:
            layer["memory"] = memory
        if cloud is not None:
            layer["cloud"] = cloud
        if region is not None:
            layer["region"] = [region] if isinstance(region, str) else list(region)
        if not include_source:
            layer["include_source"] = False
        return self._add(layer, env=env, secrets=secrets, gpu=gpu, force_build=force_build)

    # ---------------------------------------------------------------- reading the recipe

    @property
    def hash(self) -> str:
        """sha256 (hex) of the canonical recipe; the same in every process and on every machine."""
        return self._hash

    @property
    def python_version(self) -> str:
        return json.loads(self._base)["python_version"]

    @property
    def layers(self) -> list[dict[str, Any]]:
        """A copy of the layers, in order."""
        return [json.loads(s) for s in self._layers]

    @property
    def force_build(self) -> bool:
        layers = self.layers
        return bool(json.loads(self._base).get("force_build")) or any(
            layer.get("force_build") for layer in layers
        )

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Secrets used by build steps (the App collects inline values from here)."""
        return self._secrets

    @property
    def pip_packages(self) -> list[str]:
        """Every pip requirement string in the recipe, in order (requirements files expanded, options and
        comments dropped) — what the runtime checks the local environment against."""
        out: list[str] = []
        for layer in self.layers:
            if layer["op"] in ("pip_install", "uv_pip_install", "uv_sync"):
                out.extend(layer["packages"])
            for req in layer.get("requirements", []):
                out.extend(_requirement_lines(req["content"]))
            if layer["op"] == "pip_install_requirements":
                out.extend(_requirement_lines(layer["content"]))
        return list(dict.fromkeys(out))

    @property
    def apt_packages(self) -> list[str]:
        return [p for layer in self.layers if layer["op"] == "apt_install" for p in layer["packages"]]

    @property
    def env_vars(self) -> dict[str, str]:
        """Environment from ``.env(...)`` layers, merged in order: the runtime sets these for the function."""
        out: dict[str, str] = {}
        for layer in self.layers:
            if layer["op"] == "env":
                out.update(layer["vars"])
        return out

    @property
    def workdir_path(self) -> str | None:
        paths = [layer["path"] for layer in self.layers if layer["op"] == "workdir"]
        return paths[-1] if paths else None

    @property
    def local_python_modules(self) -> list[str]:
        """Module names from ``add_local_python_source``: the client ships their files."""
        return [
            m for layer in self.layers if layer["op"] == "add_local_python_source" for m in layer["modules"]
        ]

    @property
    def venv_dir(self) -> str:
        """Where :meth:`render_setup_script` puts the virtualenv on a node (a shell expression)."""
        return image_render.venv_dir(self._hash)

    def to_wire(self) -> dict[str, Any]:
        """The recipe as JSON-able data. ``base``/``layers`` define it (``hash`` covers only them); the other
        keys are derived conveniences for the runtime (``pip_packages``, ``python_version``, ``env``)."""
        return {
            "version": WIRE_VERSION,
            "base": json.loads(self._base),
            "layers": self.layers,
            "hash": self._hash,
            "python_version": self.python_version,
            "pip_packages": self.pip_packages,
            "env": self.env_vars,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and (self._base, self._layers) == (other._base, other._layers)

    def __hash__(self) -> int:
        return hash(self._hash)

    def __repr__(self) -> str:
        ops = [layer["op"] for layer in self.layers]
        return f"Image(debian_slim python={self.python_version}, layers={ops}, hash={self._hash[:12]})"

    # ---------------------------------------------------------------- rendering (cloudmodal.image_render)

    def render_setup_script(self, *, cloudmodal_requirement: str | None = None) -> str:
        """A bash script that prepares a fresh Debian/Ubuntu node: see :func:`cloudmodal.image_render.setup_script`."""
        return image_render.setup_script(
            self.python_version, self._hash, self.layers, cloudmodal_requirement=cloudmodal_requirement
        )

    def render_dockerfile(self) -> str:
        """A Dockerfile for the recipe, on ``python:X.Y-slim-bookworm``."""
        return image_render.dockerfile(self.python_version, self._hash, self.layers)
