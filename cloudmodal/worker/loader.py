"""Load the user's function or class in a worker: shipped source or a ``serialized=True`` pickle."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from cloudmodal.config import open_private, private_dir
from cloudmodal.exception import ExecutionError
from cloudmodal.serialization import deserialize


def source_path(cache: Path, source_blob: object, source_name: object) -> Path:
    """Where the shipped source ``source_name`` of blob ``source_blob`` goes: ``<cache>/src/<blob>/<name>``.

    Both come from the function's row, which the worker does not trust to be well formed: each must be a
    plain name (no directory part, no ``..``), and the path must stay inside ``<cache>/src``, or a crafted
    definition could have the worker write the file anywhere its user can."""
    for what, value, example in (
        ("source_blob", source_blob, "a blob id like 'bl-0123abcd'"),
        ("source_name", source_name, "the app's file name, like 'app.py'"),
    ):
        if (
            not isinstance(value, str)
            or value in ("", ".", "..")
            or "/" in value
            or "\\" in value
            or "\0" in value
            or os.path.basename(value) != value
        ):
            raise ExecutionError(
                f"The function's {what} {value!r} is not a plain file name ({example}), so the worker will "
                "not write it. Redeploy the app with `cloudmodal deploy` or `cloudmodal run`."
            )
    root = (cache / "src").resolve()
    target = (root / source_blob / source_name).resolve()  # type: ignore[operator]
    if not target.is_relative_to(root) or target.parent.parent != root:
        raise ExecutionError(
            f"The function's source {source_name!r} resolves to {target}, outside the worker's source cache "
            f"{root}. Redeploy the app with `cloudmodal deploy` or `cloudmodal run`."
        )
    return target


def load_module(transport: Any, defn: dict[str, Any]) -> Any:
    module_name = defn.get("module") or ""
    source_blob = defn.get("source_blob")
    source_name = defn.get("source_name")
    source_dir = defn.get("source_dir")
    if source_blob and source_name:
        from cloudmodal.config import cache_dir

        target = source_path(cache_dir(), source_blob, source_name)
        if not target.exists():
            private_dir(target.parent.parent)
            private_dir(target.parent)
            # the bytecode Python writes beside the source on import: as private as the source (its files take
            # the source's 0600 mode; the directory would take the umask's)
            private_dir(target.parent / "__pycache__")
            data = transport.request("GET", f"/v1/blobs/{source_blob}", raw_response=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with open_private(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        sys.path.insert(0, str(target.parent))
        if source_dir and os.path.isdir(source_dir):
            sys.path.insert(
                1, source_dir
            )  # sibling modules of the app's file, when the source is on this host
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, target)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as e:
            del sys.modules[module_name]
            raise ExecutionError(
                f"Importing the app's module {module_name!r} ({source_name}) in the worker failed: {type(e).__name__}: {e}"
            ) from e
        return module
    if module_name:
        if source_dir and os.path.isdir(source_dir):
            sys.path.insert(0, source_dir)
        return importlib.import_module(module_name)
    return None


def _apps_in(module: Any) -> list[Any]:
    from cloudmodal.app import App

    return [v for v in vars(module).values() if isinstance(v, App)] if module is not None else []


def load_target(transport: Any, defn: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """Returns (kind, function-or-class, class parameters)."""
    from cloudmodal.spec import FunctionSpec

    spec = FunctionSpec.from_wire(defn["spec"])
    pickled = defn.get("pickled_blob")
    if spec.kind == "function" and spec.serialized and pickled:
        raw = transport.request("GET", f"/v1/blobs/{pickled}", raw_response=True)
        # Import the shipped module first so by-reference pickles of its objects resolve; a pickle by value
        # does not need it, so an import failure here is not fatal.
        with contextlib.suppress(Exception):
            load_module(transport, defn)
        return "function", deserialize(raw, "serialized function"), {}
    module = load_module(transport, defn)
    apps = _apps_in(module)
    if spec.kind == "cls":
        # a with_options variant ("Cls[hash]") runs its class's code: the options changed only its spec
        name = (defn.get("parent_name") or spec.name).split("[", 1)[0]
        for app in apps:
            handle = app.registered_classes.get(name)
            if handle is not None:
                params: dict[str, Any] = {}
                if defn.get("parent_id") and pickled:
                    params = deserialize(
                        transport.request("GET", f"/v1/blobs/{pickled}", raw_response=True),
                        "class parameters",
                    )
                return "cls", handle.user_cls, params
        raise ExecutionError(
            f"Class {name!r} was not found on any cloudmodal.App in module {defn.get('module')!r}."
        )
    base = spec.name.split("[", 1)[0]  # with_options variants are named "f[hash]"
    for app in apps:
        handle = app.registered_functions.get(base)
        if handle is not None:
            return "function", handle.raw_f, {}
    # A function registered under another name, or defined without an App in scope.
    obj = getattr(module, spec.qualname.split(".")[-1], None) if module is not None else None
    raw = getattr(obj, "raw_f", obj)
    if callable(raw):
        return "function", raw, {}
    raise ExecutionError(f"Function {spec.name!r} was not found in module {defn.get('module')!r}.")
