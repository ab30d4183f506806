"""A stand-in for the ``pulumi`` executable, the one boundary ``cloudmodal infra`` does not own.

The Pulumi CLI cannot be installed on these machines (see TESTING.md), so the Automation API's subprocess calls
land here instead: :func:`install` writes an executable ``pulumi`` into a directory the test puts first on PATH.
Every call appends ``{"argv", "cwd", "env", ...}`` to ``$PULUMI_STANDIN_DIR/calls.jsonl`` so tests can assert
what was asked, and stacks live in ``$PULUMI_STANDIN_DIR/state.json`` keyed by backend, project and stack.

What it does NOT do: run the program. ``preview``/``up``/``destroy`` get ``--client=ADDR`` (the Automation API's
language server running the inline program); the stand-in only checks that the address accepts a TCP
connection, then answers with canned changes and the outputs in ``$PULUMI_STANDIN_DIR/outputs.json``.

Knobs (files in ``$PULUMI_STANDIN_DIR``): ``outputs.json`` (the outputs ``up`` produces; ``"secret"``: names
shown masked), ``fail`` (a command name, e.g. ``up``: that command fails with the file's second line on
stderr), ``version`` (what ``pulumi version`` prints).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn

RESOURCES = 7  # how many resources the canned program has
DEFAULT_VERSION = "v3.200.0"  # < 3.205: the Automation API reads engine events from a file (--event-log)
ENV_KEYS = (
    "PULUMI_BACKEND_URL",
    "PULUMI_CONFIG_PASSPHRASE_FILE",
    "PULUMI_AUTOMATION_API",
    "PULUMI_SKIP_UPDATE_CHECK",
)


def install(bin_dir: Path, state_dir: Path) -> Path:
    """Write ``bin_dir/pulumi`` (running this file with this interpreter); return its path. The caller sets
    ``PULUMI_STANDIN_DIR=state_dir`` and puts ``bin_dir`` first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "pulumi"
    exe.write_text(
        f"#!{sys.executable}\nimport runpy, sys\nrunpy.run_path({str(Path(__file__))!r}, run_name='__main__')\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def calls(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def commands(state_dir: Path) -> list[list[str]]:
    """Each call's argv without the global flag ``--non-interactive``."""
    return [[a for a in c["argv"] if a != "--non-interactive"] for c in calls(state_dir)]


# -- the executable --------------------------------------------------------------------------------------------
def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(st: dict[str, Any], kind: str, changes: dict[str, int]) -> None:
    """Add a succeeded ``kind`` (update, destroy) with ``changes`` to the stack's history."""
    start = _now()
    st["history"].append(
        {
            "kind": kind,
            "startTime": start,
            "endTime": _now(),
            "message": "",
            "environment": {},
            "config": {},
            "result": "succeeded",
            "resourceChanges": changes,
        }
    )


def _opt(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _project(cwd: Path) -> tuple[str, str | None]:
    import yaml

    doc = yaml.safe_load((cwd / "Pulumi.yaml").read_text())
    return doc["name"], (doc.get("backend") or {}).get("url")


def _fail(msg: str, code: int = 255) -> NoReturn:
    print(msg, file=sys.stderr)
    sys.exit(code)


def _passphrase() -> str | None:
    if os.environ.get("PULUMI_CONFIG_PASSPHRASE"):
        return os.environ["PULUMI_CONFIG_PASSPHRASE"]
    path = os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE")
    if path:
        return Path(path).read_text().strip() or None
    return None


def _client_reachable(args: list[str]) -> bool | None:
    addr = next((a.split("=", 1)[1] for a in args if a.startswith("--client=")), None)
    if addr is None:
        return None
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


def _events(args: list[str], changes: dict[str, int]) -> None:
    path = _opt(args, "--event-log")
    if not path:
        return
    events = [
        {"sequence": 0, "timestamp": 0, "preludeEvent": {"config": {}}},
        {"sequence": 1, "timestamp": 0, "summaryEvent": {"resourceChanges": changes, "durationSeconds": 1}},
        {"sequence": 2, "timestamp": 0, "cancelEvent": {}},
    ]
    with open(path, "a", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


def main(argv: list[str]) -> None:
    state_dir = Path(os.environ["PULUMI_STANDIN_DIR"])
    args = [a for a in argv if a != "--non-interactive"]
    cwd = Path.cwd()
    record: dict[str, Any] = {
        "argv": argv,
        "cwd": str(cwd),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "passphrase_in_env": "PULUMI_CONFIG_PASSPHRASE" in os.environ,
    }
    if args[:1] in (["preview"], ["up"], ["destroy"]):
        record["client_reachable"] = _client_reachable(args)
    with open(state_dir / "calls.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

    if args == ["version"]:
        version_file = state_dir / "version"
        print(version_file.read_text().strip() if version_file.exists() else DEFAULT_VERSION)
        return
    if args[:1] == ["whoami"]:
        print("standin")
        return

    fail = state_dir / "fail"
    if fail.exists():
        which, _, message = fail.read_text().partition("\n")
        if args[:1] == [which.strip()]:
            print("Updating (stand-in):")
            _fail(message.strip() or f"error: {which} failed")

    project, backend = _project(cwd)
    if backend and os.environ.get("PULUMI_BACKEND_URL") not in (None, backend):
        _fail(f"error: Pulumi.yaml's backend {backend} differs from PULUMI_BACKEND_URL")
    backend = backend or os.environ.get("PULUMI_BACKEND_URL") or "default"
    state_path = state_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"stacks": {}}
    stacks: dict[str, Any] = state["stacks"]
    name = _opt(args, "--stack")

    def key(stack: str) -> str:
        return f"{backend}|{project}|{stack}"

    def save() -> None:
        state_path.write_text(json.dumps(state, indent=1))

    def need_stack() -> dict[str, Any]:
        if name is None or key(name) not in stacks:
            _fail(f"error: no stack named '{name}' found")
        assert name is not None
        found: dict[str, Any] = stacks[key(name)]
        return found

    if args[:2] == ["stack", "init"]:
        stack = args[2]
        if key(stack) in stacks:
            _fail(f"error: stack '{stack}' already exists")
        provider = _opt(args, "--secrets-provider") or "default"
        if provider == "passphrase" and _passphrase() is None:
            _fail(
                "error: passphrase must be set with PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE "
                "environment variables"
            )
        stacks[key(stack)] = {
            "config": {},
            "secrets_provider": provider,
            "deployed": False,
            "outputs": {},
            "secret": [],
            "history": [],
        }
        save()
        return
    if args[:2] == ["stack", "select"]:
        need_stack()
        return
    if args[:2] == ["config", "set-all"]:
        st = need_stack()
        for i, a in enumerate(args):
            if a in ("--plaintext", "--secret"):
                k, _, v = args[i + 1].partition("=")
                st["config"][k] = v
        save()
        return
    if args[:3] == ["stack", "output", "--json"]:
        st = need_stack()
        shown = "--show-secrets" in args
        print(
            json.dumps(
                {k: (v if shown or k not in st["secret"] else "[secret]") for k, v in st["outputs"].items()}
            )
        )
        return
    if args[:3] == ["stack", "history", "--json"]:
        st = need_stack()
        print(json.dumps(list(reversed(st["history"]))))
        return
    if args[:1] == ["preview"]:
        st = need_stack()
        changes = {"same": RESOURCES} if st["deployed"] else {"create": RESOURCES}
        print("Previewing update (stand-in):")
        _events(args, changes)
        print(f"Resources: {changes}")
        return
    if args[:1] == ["up"]:
        st = need_stack()
        if st["secrets_provider"] == "passphrase" and _passphrase() is None:
            _fail(
                "error: passphrase must be set with PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE"
            )
        canned = state_dir / "outputs.json"
        doc = json.loads(canned.read_text()) if canned.exists() else {"outputs": {}}
        changes = {"same": RESOURCES} if st["deployed"] else {"create": RESOURCES}
        print("Updating (stand-in):")
        print(f"    + {RESOURCES} resources")
        st.update(deployed=True, outputs=doc["outputs"], secret=doc.get("secret", []))
        _record(st, "update", changes)
        save()
        _events(args, changes)
        return
    if args[:1] == ["destroy"]:
        st = need_stack()
        changes = {"delete": RESOURCES} if st["deployed"] else {}
        print("Destroying (stand-in):")
        st.update(deployed=False, outputs={}, secret=[])
        _record(st, "destroy", changes)
        save()
        _events(args, changes)
        return
    _fail(f"stand-in pulumi: unknown command {args}", 2)


if __name__ == "__main__":
    main(sys.argv[1:])
