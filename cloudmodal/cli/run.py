"""`cloudmodal run`, `cloudmodal deploy`, `cloudmodal shell`."""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import typer

from cloudmodal.cli.errors import user_errors


def run_command(
    ctx: typer.Context,
    func_ref: str = typer.Argument(
        ..., help="FILE.py or FILE.py::NAME (an entrypoint, function, or Cls.method)."
    ),
    detach: bool = typer.Option(
        False, "--detach", "-d", help="Leave the app's spawned work running after exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Don't stream logs or show progress."),
    gpu_fallback: str = typer.Option(
        None,
        "--gpu-fallback",
        help="'cpu': run GPU functions on CPU when no provider has the GPU (development).",
    ),
    name: str = typer.Option(
        None, "--name", "-n", help="Name of the ephemeral app (default: the App's name)."
    ),
) -> None:
    """Run a function or local entrypoint of FILE on an ephemeral app; extra --options are its arguments."""
    from cloudmodal.cli.entrypoint_args import parse_args
    from cloudmodal.cli.imports import find_app, import_file, parse_ref, resolve_target
    from cloudmodal.client.session import enable_output, run_app

    with user_errors():
        path, target_name = parse_ref(func_ref)
        module = import_file(path)
        app = find_app(module, path)
        _refuse_web_only(app, func_ref, target_name)
        kind, target = resolve_target(app, target_name, path)
        prog = f"cloudmodal run {func_ref}"
        if kind == "entrypoint":
            fn = target.raw_f if hasattr(target, "raw_f") else target
            kwargs = parse_args(fn, list(ctx.args), prog)
        elif kind == "function":
            kwargs = parse_args(target.raw_f, list(ctx.args), prog) if target.raw_f else {}
        else:
            cls, method = target
            kwargs = parse_args(getattr(cls.user_cls, method), list(ctx.args), prog) if ctx.args else {}
        output = enable_output() if not quiet else _null()
        with output, run_app(app, detach=detach, gpu_fallback=gpu_fallback, name=name, show_logs=not quiet):
            if kind == "entrypoint":
                fn = target.raw_f if hasattr(target, "raw_f") else target
                result = fn(**kwargs)
                if inspect.iscoroutine(result):
                    import asyncio

                    result = asyncio.run(result)
            elif kind == "function":
                if target.spec.is_generator:
                    for item in target.remote_gen(**kwargs):
                        print(item)
                    result = None
                else:
                    result = target.remote(**kwargs)
            else:
                cls, method = target
                result = getattr(cls(), method).remote(**kwargs)
            if result is not None and kind != "entrypoint":
                print(result)
        sys.stdout.flush()


def _refuse_web_only(app: Any, func_ref: str, target_name: str | None) -> None:
    """``cloudmodal run`` of web endpoints serves nothing: point at ``cloudmodal serve`` instead."""
    from cloudmodal.exception import InvalidError

    handles = list(app.registered_functions.values()) + list(app.registered_classes.values())
    if getattr(app, "registered_entrypoints", None) and not target_name:
        return
    if target_name:
        handles = [h for h in handles if h.spec is not None and h.spec.name == target_name.split(".")[0]]
    specs = [h.spec for h in handles if h.spec is not None]
    if specs and all(
        s.web is not None or (s.web_methods and len(s.web_methods) == len(s.methods)) for s in specs
    ):
        path = func_ref.split("::", 1)[0]
        raise InvalidError(
            f"{func_ref} defines only web endpoints, which `cloudmodal run` does not serve. Serve them while you "
            f"develop with `cloudmodal serve {path}` (reloads on every save), or `cloudmodal deploy {path}`."
        )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def deploy_command(
    app_ref: str = typer.Argument(..., help="FILE.py defining a cloudmodal.App with a name."),
    name: str = typer.Option(None, "--name", help="Deploy under this name instead of the App's."),
    gpu_fallback: str = typer.Option(
        None, "--gpu-fallback", help="'cpu': run GPU functions on CPU when no provider has the GPU."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Show where each function would run now and what it costs; contact nothing, launch nothing.",
    ),
    fallbacks: int = typer.Option(
        5, "--fallbacks", min=0, help="With --dry-run: how many fallback offers to show after the chosen one."
    ),
    all_clouds: bool = typer.Option(
        False,
        "--all-clouds",
        help="With --dry-run: plan over every catalog cloud, not only the enabled ones.",
    ),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON."),
    wide: bool = typer.Option(False, "--wide", help="With --dry-run: show every column in full."),
    volume_gb: list[str] = typer.Option(
        [],
        "--volume-gb",
        metavar="NAME=GB",
        help="With --dry-run: GB a worker reads from volume NAME when it starts (repeatable); offers are then "
        "ranked with the egress that costs.",
    ),
) -> None:
    """Deploy an app to the control plane: its functions stay up and callable with Function.from_name."""
    from rich.console import Console

    from cloudmodal.cli.imports import find_app, import_file, parse_ref
    from cloudmodal.cli.server_cmd import ensure_server
    from cloudmodal.client.session import deploy

    if dry_run:
        from cloudmodal.cli.plan import deploy_plan

        with user_errors():
            deploy_plan(
                app_ref,
                name=name,
                fallbacks=fallbacks,
                all_clouds=all_clouds,
                as_json=as_json,
                wide=wide,
                volume_gb=volume_gb,
            )
        return
    if as_json or all_clouds or wide or volume_gb:
        typer.secho(
            "Error: --json, --all-clouds, --wide and --volume-gb go with --dry-run.", fg="red", err=True
        )
        raise typer.Exit(2)
    with user_errors():
        path, _ = parse_ref(app_ref)
        ensure_server()
        module = import_file(path)
        app = find_app(module, path)
        info = deploy(app, name=name, allow_cpu_fallback=gpu_fallback == "cpu")
        c = Console()
        c.print(
            f"[green]✓[/] Deployed app [bold]{info['name']}[/] ({info['app_id']}), version {info['version']}"
        )
        urls = dict(info.get("web_endpoints") or [])
        for f in info["functions"]:
            c.print(f"  • {f}" + (f" => {urls[f]}" if f in urls else ""))
        for where, url in info.get("web_endpoints") or []:
            if where not in info["functions"]:
                c.print(f"  • {where} => {url}")


def shell_command(
    func_ref: str = typer.Argument(
        None,
        help="FILE.py::NAME: a shell on this machine in that function's environment. APP_NAME.FUNCTION or a "
        "container id (ta-...): a shell inside that running container (`cloudmodal container list`).",
    ),
    cmd: str = typer.Option(None, "--cmd", "-c", help="Run this command instead of an interactive shell."),
    pty: bool = typer.Option(
        None, "--pty/--no-pty", help="In a container: use a pseudo-terminal (default: when stdin is one)."
    ),
) -> None:
    """A shell in a function's environment: inside a running container of a deployed function (APP.FUNCTION
    or ta-...), or on this machine (FILE.py::NAME, or nothing)."""
    if func_ref and "::" not in func_ref and not func_ref.endswith(".py"):
        from cloudmodal.cli.container_cmd import resolve_container, run_in_container

        with user_errors():
            worker_id = resolve_container(func_ref)
            argv = ["/bin/sh", "-c", cmd] if cmd else []
            code = run_in_container(worker_id, argv, pty=pty)
        raise typer.Exit(code)
    from cloudmodal.cli.imports import find_app, import_file, parse_ref, resolve_target

    with user_errors():
        env = dict(os.environ)
        python = sys.executable
        cwd = os.getcwd()
        if func_ref:
            from cloudmodal.providers.envs import resolve_python

            path, target_name = parse_ref(func_ref)
            module = import_file(path)
            app = find_app(module, path)
            _, target = resolve_target(app, target_name, path)
            handle = target[0] if isinstance(target, tuple) else target
            spec = handle.spec
            image = spec.image or {}
            python = resolve_python(tuple(image.get("pip_packages") or ()), spec.image_hash)
            env.update(dict(spec.env))
            cwd = str(path.resolve().parent)
        env["CLOUDMODAL_IS_REMOTE"] = "1"
        env["PATH"] = os.path.dirname(python) + os.pathsep + env.get("PATH", "")
        shell = os.environ.get("SHELL", "/bin/bash")
        argv = [shell, "-c", cmd] if cmd else [shell]
        os.chdir(cwd)
        os.execvpe(argv[0], argv, env)
