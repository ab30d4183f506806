"""Renderers of an :class:`~cloudmodal.image.Image` recipe: the bash setup script a fresh node runs
(SkyPilot's ``setup``) and a Dockerfile. They read the recipe's data (Python version, hash, layers) and
write text; nothing here runs anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any


def _canonical(obj: Any) -> str:
    # The same canonical JSON as the recipe's own (cloudmodal.image), so run_function steps embed the
    # arguments exactly as they were hashed.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def venv_dir(image_hash: str) -> str:
    """Where :func:`setup_script` puts the virtualenv of the image ``image_hash`` on a node (a shell
    expression)."""
    return f"$HOME/.cloudmodal/venv-{image_hash[:12]}"


def setup_script(
    python_version: str,
    image_hash: str,
    layers: Sequence[Mapping[str, Any]],
    *,
    cloudmodal_requirement: str | None = None,
    python: str | None = None,
    system_site_packages: bool = False,
    requirements: Sequence[str] = (),
) -> str:
    """A bash script that prepares a fresh Debian/Ubuntu node (SkyPilot's ``setup``).

    It creates a virtualenv with ``python_version`` at :func:`venv_dir` (with uv, which fetches the
    interpreter if the node lacks it), then replays the layers: apt packages (with sudo when not root),
    pip/uv installs, commands, ``export``s. ``cloudmodal_requirement`` (e.g. ``"cloudmodal==0.1.0"``) is
    installed first, so that ``run_function`` steps and the worker can import cloudmodal; ``requirements``
    (cloudmodal's own dependencies, when cloudmodal itself is shipped as source) too.

    ``python``: an interpreter already on the node to make the virtualenv with (``python -m venv``) instead
    of uv and ``python_version``; then uv is fetched only if a layer uses it. ``system_site_packages``: the
    virtualenv also sees that interpreter's packages — its base installation's (``--system-site-packages``)
    and, when it is itself a virtualenv, its own site-packages (a ``.pth`` file) — so a node whose Python
    already has every package needs no download (the test nodes).
    """
    pv = python_version
    venv = venv_dir(image_hash)
    needs_uv = python is None or any(
        layer["op"] in ("uv_pip_install", "uv_sync") and "uv_version" not in layer for layer in layers
    )
    needs_pip = bool(cloudmodal_requirement or requirements) or any(
        layer["op"] in ("pip_install", "pip_install_requirements")
        or (layer["op"] in ("uv_pip_install", "uv_sync") and "uv_version" in layer)
        for layer in layers
    )
    lines = [
        "#!/usr/bin/env bash",
        f"# cloudmodal image {image_hash[:12]} (python {pv}); generated from the recipe, do not edit.",
        "set -euo pipefail",
        'if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi',
        "export DEBIAN_FRONTEND=noninteractive",
        f'export CLOUDMODAL_VENV="{venv}"',
        'export PATH="$HOME/.local/bin:$PATH"',
    ]
    if needs_uv:
        lines += [
            "if ! command -v uv >/dev/null 2>&1; then",
            "  python3 -m pip install --quiet uv || python3 -m pip install --quiet --user uv \\",
            "    || python3 -m pip install --quiet --user --break-system-packages uv",
            "fi",
        ]
    if python is not None and needs_pip:
        # also when an earlier try left a venv without pip (its ensurepip was missing)
        lines.append(
            'if [ ! -x "$CLOUDMODAL_VENV/bin/python" ] '
            '|| ! "$CLOUDMODAL_VENV/bin/python" -m pip --version >/dev/null 2>&1; then'
        )
    else:
        lines.append('if [ ! -x "$CLOUDMODAL_VENV/bin/python" ]; then')
    if python is None:
        lines.append(f'  uv venv --seed --python {shlex.quote(pv)} "$CLOUDMODAL_VENV"')
    else:
        flags = ("--system-site-packages " if system_site_packages else "") + (
            "" if needs_pip else "--without-pip "
        )
        make = f'{shlex.quote(python)} -m venv {flags}"$CLOUDMODAL_VENV"'
        lines += [
            f"  if ! {make}; then",
            # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) apart, in python3-venv
            '    rm -rf "$CLOUDMODAL_VENV"',
            "    $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends python3-venv",
            f"    {make}",
            "  fi",
        ]
        if system_site_packages:
            # A venv made from a venv's interpreter sees only the *base* installation's packages: list the
            # interpreter's own site-packages in a .pth file too (plain paths: their .pth files do not run).
            lines.append(
                f"  {shlex.quote(python)} -c {shlex.quote(_BASE_SITE_PTH)} "
                '"$("$CLOUDMODAL_VENV/bin/python" -c \'import sysconfig; print(sysconfig.get_paths()["purelib"])\')"'
            )
    lines += [
        "fi",
        'export VIRTUAL_ENV="$CLOUDMODAL_VENV"',
        'export PATH="$CLOUDMODAL_VENV/bin:$PATH"',
    ]
    first = ([cloudmodal_requirement] if cloudmodal_requirement else []) + list(requirements)
    if first:
        if python is None:
            lines.append(f'uv pip install --python "$CLOUDMODAL_VENV/bin/python" {shlex.join(first)}')
        else:
            lines.append(f'"$CLOUDMODAL_VENV/bin/python" -m pip install --quiet {shlex.join(first)}')
    for layer in layers:
        lines.append(f"# {layer['op']}")
        body = shell_steps(layer, docker=False)
        if layer.get("env"):
            exports = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in layer["env"].items())
            lines.append(f"( {exports}; " + " && ".join(body) + " )")
        else:
            lines.extend(body)
    return "\n".join(lines) + "\n"


# Run by the node's interpreter with the new venv's site-packages as argv[1]: write a .pth file there that
# lists the interpreter's own site-packages directories.
_BASE_SITE_PTH = (
    "import os, site, sys; "
    'open(os.path.join(sys.argv[1], "_cloudmodal_base_site.pth"), "w")'
    '.write("".join(p + chr(10) for p in site.getsitepackages()))'
)


def dockerfile(python_version: str, image_hash: str, layers: Sequence[Mapping[str, Any]]) -> str:
    """A Dockerfile for the recipe, on ``python:X.Y-slim-bookworm``."""
    lines = [
        f"# cloudmodal image {image_hash[:12]}; generated from the recipe, do not edit.",
        f"FROM python:{python_version}-slim-bookworm",
    ]
    for layer in layers:
        op = layer["op"]
        if op == "env":
            lines.append("ENV " + " ".join(f"{k}={json.dumps(v)}" for k, v in layer["vars"].items()))
        elif op == "workdir":
            lines.append(f"WORKDIR {layer['path']}")
        elif op == "add_local_python_source":
            lines.append(
                f"# add_local_python_source({', '.join(layer['modules'])}): added by cloudmodal at start"
            )
        else:
            steps = shell_steps(layer, docker=True)
            prefix = "".join(f"export {k}={shlex.quote(v)} && " for k, v in layer.get("env", {}).items())
            for step in steps:
                lines.append(f"RUN {prefix}{step}")
    return "\n".join(lines) + "\n"


def shell_steps(layer: Mapping[str, Any], *, docker: bool) -> list[str]:
    """Shell command lines for one layer. ``docker``: root, system Python, one line per RUN."""
    op = layer["op"]
    py = "python" if docker else '"$CLOUDMODAL_VENV/bin/python"'
    uv_target = "--system" if docker else '--python "$CLOUDMODAL_VENV/bin/python"'
    sudo = "" if docker else "$SUDO "
    if op == "apt_install":
        pkgs = shlex.join(layer["packages"])
        cmd = (
            f"{sudo}apt-get update -q && {sudo}apt-get install -y -q --no-install-recommends {pkgs}"
            if not docker
            else f"apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"--no-install-recommends {pkgs} && rm -rf /var/lib/apt/lists/*"
        )
        return [cmd]
    if op in ("pip_install", "uv_pip_install", "pip_install_requirements"):
        opts: list[str] = []
        for key, flag in (
            ("index_url", "--index-url"),
            ("extra_index_url", "--extra-index-url"),
            ("find_links", "--find-links"),
        ):
            if key in layer:
                opts += [flag, layer[key]]
        if layer.get("pre"):
            opts.append("--pre")
        opts += layer.get("extra_options", [])
        steps: list[str] = []
        req_args: list[str] = []
        files = layer.get("requirements", [])
        if op == "pip_install_requirements":
            files = [{"path": layer["path"], "content": layer["content"]}]
        for req in files:
            digest = hashlib.sha256(req["content"].encode()).hexdigest()[:12]
            target = f"/tmp/cloudmodal-{digest}-{req['path']}"
            b64 = base64.b64encode(req["content"].encode()).decode()
            steps.append(f"echo {b64} | base64 -d > {shlex.quote(target)}")
            req_args += ["-r", target]
        args = shlex.join(opts + req_args + layer.get("packages", []))
        if op == "uv_pip_install":
            uv = f"uv=={layer['uv_version']}" if "uv_version" in layer else "uv"
            if docker:
                steps.append(
                    f"python -m pip install --no-cache-dir {shlex.quote(uv)} && uv pip install {uv_target} {args}"
                )
            else:
                if "uv_version" in layer:
                    steps.append(f"{py} -m pip install --quiet {shlex.quote(uv)}")
                    steps.append(f"{py} -m uv pip install {uv_target} {args}")
                else:
                    steps.append(f"uv pip install {uv_target} {args}")
        else:
            nocache = " --no-cache-dir" if docker else ""
            steps.append(f"{py} -m pip install{nocache} {args}")
        return [" && ".join(steps)] if docker else steps
    if op == "uv_sync":
        return _uv_sync_steps(layer, docker=docker, py=py)
    if op == "run_commands":
        cmds = layer["commands"]
        if docker:
            return [
                c if "\n" not in c else f"echo {base64.b64encode(c.encode()).decode()} | base64 -d | sh -e"
                for c in cmds
            ]
        return list(cmds)
    if op == "env":
        return [f"export {k}={shlex.quote(v)}" for k, v in layer["vars"].items()]
    if op == "workdir":
        p = shlex.quote(layer["path"])
        return [
            f'mkdir -p {p} 2>/dev/null || {{ {sudo}mkdir -p {p} && {sudo}chown "$(id -u):$(id -g)" {p}; }}',
            f"cd {p}",
        ]
    if op == "add_local_python_source":
        return [
            f": add_local_python_source {shlex.quote(' '.join(layer['modules']))} is shipped by the client"
        ]
    if op == "run_function":
        code = (
            "import functools, importlib, json, sys; sys.path.insert(0, ''); "
            f"f = functools.reduce(getattr, {layer['qualname']!r}.split('.'), "
            f"importlib.import_module({layer['module']!r})); "
            "f = f.get_raw_f() if hasattr(f, 'get_raw_f') else f; "
            f"f(*json.loads({_canonical(layer['args'])!r}), **json.loads({_canonical(layer['kwargs'])!r}))"
        )
        return [f"timeout {int(layer['timeout'])} {py} -c {shlex.quote(code)}"]
    raise ValueError(f"unknown image layer {op!r}")  # pragma: no cover


def _uv_sync_steps(layer: Mapping[str, Any], *, docker: bool, py: str) -> list[str]:
    """``uv sync`` of a project whose ``pyproject.toml`` (and ``uv.lock``) the layer carries, into the
    image's environment (the node's virtualenv, or the system Python in a Dockerfile). ``--inexact`` keeps
    what is installed already (cloudmodal itself); the project is not installed, as in Modal."""
    files = {"pyproject.toml": layer["pyproject"]}
    if "lock" in layer:
        files["uv.lock"] = layer["lock"]
    digest = hashlib.sha256(_canonical(files).encode()).hexdigest()[:12]
    project = f"/tmp/cloudmodal-uv-{digest}"
    steps = [f"mkdir -p {project}"]
    for name, content in files.items():
        b64 = base64.b64encode(content.encode()).decode()
        steps.append(f"echo {b64} | base64 -d > {project}/{name}")
    args = ["--no-install-project", "--no-install-workspace", "--inexact", "--compile-bytecode"]
    if layer.get("frozen", True):
        args.append("--frozen")
    for group in layer.get("groups", []):
        args += ["--group", group]
    for extra in layer.get("extras", []):
        args += ["--extra", extra]
    args += layer.get("extra_options", [])
    target = "/usr/local" if docker else '"$CLOUDMODAL_VENV"'
    python = "" if docker else f" --python {py}"
    uv = "uv"
    if "uv_version" in layer:
        pin = shlex.quote(f"uv=={layer['uv_version']}")
        steps.append(f"{py} -m pip install --quiet{' --no-cache-dir' if docker else ''} {pin}")
        uv = f"{py} -m uv"
    elif docker:
        steps.append(f"{py} -m pip install --quiet --no-cache-dir uv")
    steps.append(f"(cd {project} && UV_PROJECT_ENVIRONMENT={target} {uv} sync{python} {shlex.join(args)})")
    return [" && ".join(steps)] if docker else steps
