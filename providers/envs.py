"""Image environments for workers on this machine: the current interpreter when it already satisfies the
image's packages, otherwise a virtualenv built once per image and cached.

A built env sees the current environment's packages *after* its own (a ``.pth`` file that adds the parent's
site directories at the end of ``sys.path``), so the worker can import cloudmodal and its dependencies while the
image's pinned versions win. Only the requirements the current environment does not satisfy are installed.

Layout: ``<cache>/envs/<image_hash>-<parent>/`` where ``<cache>`` is :func:`cloudmodal.config.cache_dir`
(``CLOUDMODAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/cloudmodal`` or ``~/.cache/cloudmodal``) and ``<parent>``
identifies the interpreter/environment the env layers on (the ``.pth`` points into it, so two cloudmodal
installs never share one). The build runs under a file lock; a ``.cloudmodal-ready`` marker written last
means "complete", so a half-built env (crash, Ctrl-C) is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Sequence
from pathlib import Path

from cloudmodal.config import cache_dir
from cloudmodal.providers.base import ImageBuildError

READY_MARKER = ".cloudmodal-ready"
PARENT_PTH = "zz-cloudmodal-parent.pth"  # "zz": processed after the env's own .pth files

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# --- is the current environment enough? (pure, reads installed metadata) ------------------------------


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirement_satisfied(requirement: str, _seen: frozenset[str] = frozenset()) -> bool:
    """Whether the current environment satisfies one pip requirement string.

    Anything pip accepts that is not a plain requirement (a path, a URL, ``-e``/options) counts as not
    satisfied: it cannot be checked, so it is installed into a built env.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return False
    if req.marker is not None and not req.marker.evaluate():
        return True  # does not apply to this interpreter/platform
    if req.url:
        return False
    version = _installed_version(req.name)
    if version is None or not req.specifier.contains(version, prereleases=True):
        return False
    key = req.name.lower()
    if req.extras and key not in _seen:
        seen = _seen | {key}
        for dep in importlib.metadata.requires(req.name) or ():
            dep_req = Requirement(dep)
            if dep_req.marker is None:
                continue  # a base dependency; pip installed it with the package
            if any(dep_req.marker.evaluate({"extra": extra}) for extra in req.extras):
                bare = str(dep_req).split(";")[0].strip()
                if not requirement_satisfied(bare, seen):
                    return False
    return True


def missing_requirements(pip_packages: Sequence[str]) -> list[str]:
    """The requirements (in the given order) the current environment does not satisfy."""
    return [p for p in pip_packages if p.strip() and not requirement_satisfied(p.strip())]


# --- building -----------------------------------------------------------------------------------------


def _parent_site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path and path not in dirs:
            dirs.append(path)
    if site.ENABLE_USER_SITE:
        user = site.getusersitepackages()
        if user in sys.path and user not in dirs:
            dirs.append(user)
    return [d for d in dirs if os.path.isdir(d)]


def _parent_key() -> str:
    ident = f"{sys.prefix}|{sys.version_info[0]}.{sys.version_info[1]}|{sys.implementation.name}"
    return f"py{sys.version_info[0]}{sys.version_info[1]}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def env_dir(pip_packages: Sequence[str], image_hash: str | None, *, root: Path | None = None) -> Path:
    """Where the env for this image lives (whether or not it is built yet)."""
    if image_hash and _SAFE.match(image_hash):
        key = image_hash
    else:
        text = image_hash or json.dumps(sorted(p.strip() for p in pip_packages))
        key = "pkgs-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return (root or cache_dir()) / "envs" / f"{key}-{_parent_key()}"


def _env_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _env_site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return Path(out.stdout.strip())


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _build(path: Path, missing: Sequence[str], pip_args: Sequence[str], timeout_s: float) -> None:
    if path.exists():
        shutil.rmtree(path)  # a leftover without the marker is a half-built env
    # Reuse this environment's pip (``pip --python``: no copy of pip per env, ~1 s builds); an environment
    # without pip (uv-made venvs) gets one in the image env from ensurepip's bundled wheel, offline.
    own_pip = importlib.util.find_spec("pip") is not None
    venv.EnvBuilder(with_pip=not own_pip, symlinks=os.name != "nt", clear=True).create(path)
    python = _env_python(path)
    site_packages = _env_site_packages(python)
    # addsitedir (not a bare path line) so the parent's own .pth files run too: editable installs of
    # cloudmodal are import hooks installed by a .pth.
    lines = [f"import site; site.addsitedir({d!r})" for d in _parent_site_dirs()]
    (site_packages / PARENT_PTH).write_text("\n".join(lines) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)] if own_pip else [str(python), "-m", "pip"]
    cmd = [*pip, "install", "--disable-pip-version-check", "--no-input", *pip_args, *missing]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise ImageBuildError(
            f"Installing {', '.join(missing)} into {path} took longer than {timeout_s:.0f} s.\n{_tail(output)}",
            reason="pip-timeout",
        ) from None
    if out.returncode != 0:
        raise ImageBuildError(
            f"Could not install {', '.join(missing)} into the image env at {path} "
            f"(pip exited with {out.returncode}). Check the package names and versions in the image's "
            f"pip_install(...); pip said:\n{_tail(out.stdout + out.stderr)}",
            reason="pip-failed",
        )
    (path / READY_MARKER).write_text(json.dumps({"packages": list(missing), "parent": sys.prefix}))


def resolve_python(
    pip_packages: Sequence[str],
    image_hash: str | None,
    *,
    root: Path | None = None,
    pip_args: Sequence[str] = (),
    timeout_s: float = 1800.0,
) -> str:
    """The Python interpreter a worker for this image runs with.

    ``sys.executable`` when the current environment satisfies every requirement; otherwise the interpreter of
    the cached env for ``image_hash`` (built now, once, if needed). ``root`` overrides the cache directory;
    ``pip_args`` are passed to ``pip install`` (e.g. ``("--no-index", "--find-links", "wheels/")``).
    Raises :class:`ImageBuildError` with pip's output when the build fails.
    """
    missing = missing_requirements(pip_packages)
    if not missing:
        return sys.executable
    from filelock import FileLock

    path = env_dir(pip_packages, image_hash, root=root)
    python = _env_python(path)
    if (path / READY_MARKER).exists():
        return str(python)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / READY_MARKER).exists():  # another process may have built it while we waited
            try:
                _build(path, missing, pip_args, timeout_s)
            except ImageBuildError:
                raise
            except (OSError, subprocess.SubprocessError) as exc:
                raise ImageBuildError(
                    f"Could not create the image env at {path}: {exc}. Check free disk space and that "
                    "CLOUDMODAL_CACHE_DIR (or ~/.cache/cloudmodal) is writable.",
                    reason="env-create-failed",
                ) from exc
    return str(python)
