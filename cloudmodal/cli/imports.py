"""Find the app, functions and entrypoints in a user's file (``file.py[::name]``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from cloudmodal.exception import InvalidError


def parse_ref(ref: str) -> tuple[Path, str | None]:
    path, _, name = ref.partition("::")
    p = Path(path)
    if not p.exists():
        raise InvalidError(
            f"File {path!r} does not exist. Give a Python file, e.g. `cloudmodal run examples/hello.py`."
        )
    if p.suffix != ".py":
        raise InvalidError(f"{path!r} is not a Python file (.py).")
    return p, (name or None)


def import_file(path: Path) -> Any:
    name = path.stem
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidError(f"Cannot import {path}.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def find_app(module: Any, path: Path) -> Any:
    from cloudmodal.app import App

    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if not apps:
        raise InvalidError(
            f'{path} defines no `cloudmodal.App`. Add `app = cloudmodal.App("name")` and decorate functions with `@app.function()`.'
        )
    uniq = list({id(a): a for a in apps}.values())
    if len(uniq) > 1:
        named = [k for k, v in vars(module).items() if isinstance(v, App)]
        if "app" in named:
            return vars(module)["app"]
        raise InvalidError(
            f"{path} defines several apps ({', '.join(named)}); name one: `{path}::APP.function`."
        )
    return uniq[0]


def resolve_target(app: Any, name: str | None, path: Path) -> tuple[str, Any]:
    """("entrypoint" | "function" | "method", object)."""
    entrypoints = dict(app.registered_entrypoints)
    functions = dict(app.registered_functions)
    classes = dict(app.registered_classes)
    if name:
        if "." in name and name.split(".", 1)[0] not in classes:
            name = name.split(".", 1)[1]  # "app.f" -> "f"
        if name in entrypoints:
            return "entrypoint", entrypoints[name]
        if name in functions:
            return "function", functions[name]
        if "." in name:
            cls_name, method = name.split(".", 1)
            if cls_name in classes:
                return "method", (classes[cls_name], method)
        choices = sorted(entrypoints) + sorted(functions) + [f"{c}.<method>" for c in classes]
        raise InvalidError(
            f"{path} has no entrypoint or function {name!r}. Choose one of: {', '.join(choices)}."
        )
    if len(entrypoints) == 1:
        return "entrypoint", next(iter(entrypoints.values()))
    if not entrypoints and len(functions) == 1:
        return "function", next(iter(functions.values()))
    choices = sorted(entrypoints) or sorted(functions)
    raise InvalidError(
        f"{path} has several {'entrypoints' if entrypoints else 'functions'}; name one: `cloudmodal run {path}::NAME` with NAME in {', '.join(choices)}."
    )
