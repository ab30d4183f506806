"""`cloudmodal infra preview|up|destroy|outputs --cloud C`: a cloud's standing infrastructure (the bucket for
volumes and blobs, the workers' identity, the network, optionally a control host) through Pulumi's Automation
API, with state in a backend of the user's choice (a file backend in the state directory by default).

``up`` writes the stack's outputs to ``<CLOUDMODAL_HOME>/infra/<cloud>.json`` (0600), which the control plane
reads below its environment. Options left out are taken from that file (what the last ``up`` used), so
``cloudmodal infra destroy --cloud gcp`` needs no ``--project`` again. Pulumi's own output streams to stderr;
results (tables, ``--json``) go to stdout."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from cloudmodal.cli.errors import user_errors
from cloudmodal.cli.tables import Column, print_table
from cloudmodal.exception import InvalidError

app = typer.Typer(
    help="Standing infrastructure on a cloud (bucket, worker identity, network, control host) with Pulumi.",
    no_args_is_help=True,
)

CHANGE_COLUMNS = (Column("Operation"), Column("Resources", "right"))
OUTPUT_COLUMNS = (Column("Output"), Column("Value"))
SETTING_ENV = {
    "volume_store": "CLOUDMODAL_VOLUME_STORE",
    "blob_store": "CLOUDMODAL_BLOB_STORE",
    "volume_store_region": "CLOUDMODAL_VOLUME_STORE_REGION",
    "node_server_url": "CLOUDMODAL_NODE_SERVER_URL",
}
NO_CHANGE_OPS = ("same",)

CLOUD_HELP = "The cloud: aws, gcp, azure or lambda."
BACKEND_HELP = (
    "Where Pulumi keeps the stack's state: file:///dir, s3://bucket, gs://bucket, azblob://container or "
    "https://api.pulumi.com (default: what the last `up` used, else the state directory's infra/state)."
)
SECRETS_HELP = (
    "Pulumi secrets provider (e.g. awskms://alias/key); default: a passphrase cloudmodal keeps in the state "
    "directory (file and bucket backends), Pulumi Cloud's own (Pulumi Cloud)."
)


# -- options -----------------------------------------------------------------------------------------------------
def _home() -> Path:
    from cloudmodal.infra.outputs import default_home

    return default_home()


def _check_cloud(cloud: str) -> str:
    from cloudmodal.infra.common import CLOUDS

    c = cloud.strip().lower()
    if c not in CLOUDS:
        raise InvalidError(f"unknown cloud {cloud!r}: use one of {', '.join(CLOUDS)} (--cloud aws)")
    if c == "lambda":  # nothing for Pulumi to make there: say what to do, before asking for the CLI
        from cloudmodal.infra.lambda_cloud import GUIDANCE

        raise InvalidError(GUIDANCE)
    return c


def _ssh_key(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InvalidError(f"--ssh-public-key {str(path)!r} cannot be read ({e}): name a .pub file") from None
    if "PRIVATE KEY" in text:
        raise InvalidError(
            f"--ssh-public-key {str(path)!r} is a private key: name its .pub file (e.g. ~/.ssh/id_ed25519.pub)"
        )
    return text


def _config(
    cloud: str,
    *,
    name: str | None = None,
    region: str | None = None,
    project: str | None = None,
    control_plane_cidrs: list[str] | None = None,
    control_plane_port: int | None = None,
    with_control_host: bool | None = None,
    ssh_public_key: Path | None = None,
    admin_cidrs: list[str] | None = None,
    blob_expiry_days: int | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """The InfraConfig the options ask for, each option left out taken from what the last ``up`` recorded, then
    InfraConfig's default; and the recorded outputs file (None: none)."""
    from cloudmodal.infra.common import InfraConfig
    from cloudmodal.infra.outputs import read_outputs

    cloud = _check_cloud(cloud)
    recorded = read_outputs(cloud, _home())
    rec: dict[str, Any] = dict((recorded or {}).get("config") or {})
    given: dict[str, Any] = {
        "name": name,
        "region": region,
        "project": project,
        "control_plane_cidrs": tuple(control_plane_cidrs) if control_plane_cidrs else None,
        "control_plane_port": control_plane_port,
        "with_control_host": with_control_host,
        "ssh_public_key": _ssh_key(ssh_public_key),
        "admin_cidrs": tuple(admin_cidrs) if admin_cidrs else None,
        "blob_expiry_days": blob_expiry_days,
    }
    if rec.get("name") not in (None, name) and name is not None:
        rec = {}  # another name is another project: the last `up`'s settings were for that one
    kwargs: dict[str, Any] = {}
    for key, value in given.items():
        if value is not None:
            kwargs[key] = value
        elif key in rec and rec[key] is not None:
            kwargs[key] = tuple(rec[key]) if isinstance(rec[key], list) else rec[key]
    if cloud == "gcp" and not kwargs.get("project") and os.environ.get("GOOGLE_CLOUD_PROJECT"):
        kwargs["project"] = os.environ["GOOGLE_CLOUD_PROJECT"]
    cfg = InfraConfig(cloud=cloud, **kwargs)
    try:
        cfg.validate()
    except ValueError as e:
        raise InvalidError(str(e)) from None
    return cfg, recorded


def _prepare(
    cfg: Any, recorded: dict[str, Any] | None, backend: str | None, secrets_provider: str | None
) -> tuple[Any, Any]:
    """Check the Pulumi CLI and SDK (before anything is written), then build the target."""
    from cloudmodal.infra import automation

    command = automation.pulumi_command()
    if backend is None and recorded and recorded.get("project") == cfg.name:
        backend = recorded.get("backend") or None
    t = automation.target(cfg, home=_home(), backend=backend, secrets_provider=secrets_provider)
    return t, command


# Options more than one command takes, each declared once.
CloudOpt = Annotated[str, typer.Option("--cloud", "-c", help=CLOUD_HELP)]
NameOpt = Annotated[
    str | None, typer.Option("--name", help="Prefix of resource names and the Pulumi project.")
]
BackendOpt = Annotated[str | None, typer.Option("--backend", help=BACKEND_HELP)]
SecretsProviderOpt = Annotated[str | None, typer.Option("--secrets-provider", help=SECRETS_HELP)]


@dataclass(frozen=True)
class StackOptions:
    """The options ``preview`` and ``up`` share (each a field, with its CLI option): what the stack is made of
    and where its state lives. :func:`_stack_command` makes them the command's first options."""

    cloud: CloudOpt
    name: NameOpt = None
    region: Annotated[
        str | None, typer.Option("--region", help="The cloud's region (default: the cloud's usual).")
    ] = None
    project: Annotated[
        str | None, typer.Option("--project", help="GCP project id (gcp; or GOOGLE_CLOUD_PROJECT).")
    ] = None
    control_plane_cidr: Annotated[
        list[str] | None,
        typer.Option(
            "--control-plane-cidr",
            help="Where SSH to workers may come from (the control plane's /32); repeat.",
        ),
    ] = None
    control_plane_port: Annotated[
        int | None, typer.Option("--control-plane-port", help="The control plane's port.")
    ] = None
    with_control_host: Annotated[
        bool | None,
        typer.Option(
            "--with-control-host/--no-control-host", help="Also make a host for a team control plane."
        ),
    ] = None
    ssh_public_key: Annotated[
        Path | None, typer.Option("--ssh-public-key", help="The control host's admin key (.pub).")
    ] = None
    admin_cidr: Annotated[
        list[str] | None,
        typer.Option("--admin-cidr", help="Where an admin may SSH to the control host from; repeat."),
    ] = None
    blob_expiry_days: Annotated[
        int | None, typer.Option("--blob-expiry-days", help="Purge deleted blobs after.")
    ] = None
    backend: BackendOpt = None
    secrets_provider: SecretsProviderOpt = None

    def prepare(self) -> tuple[Any, Any]:
        """:func:`_config` of these options, then :func:`_prepare`: the target and the Pulumi command."""
        cfg, recorded = _config(
            self.cloud,
            name=self.name,
            region=self.region,
            project=self.project,
            control_plane_cidrs=self.control_plane_cidr,
            control_plane_port=self.control_plane_port,
            with_control_host=self.with_control_host,
            ssh_public_key=self.ssh_public_key,
            admin_cidrs=self.admin_cidr,
            blob_expiry_days=self.blob_expiry_days,
        )
        return _prepare(cfg, recorded, self.backend, self.secrets_provider)


def _stack_command(command: Callable[..., None]) -> Callable[..., None]:
    """``command(opts: StackOptions, *its own options*)`` as a typer command: StackOptions' fields become its
    first options (in their order), then its own; typer's values for the fields arrive as one StackOptions."""
    hints = get_type_hints(StackOptions, include_extras=True)
    keyword = inspect.Parameter.KEYWORD_ONLY
    shared = [
        inspect.Parameter(
            f.name,
            keyword,
            annotation=hints[f.name],
            default=inspect.Parameter.empty if f.default is MISSING else f.default,
        )
        for f in fields(StackOptions)
    ]
    own = [p.replace(kind=keyword) for p in inspect.signature(command, eval_str=True).parameters.values()]

    @functools.wraps(command)
    def run(**values: Any) -> None:
        opts = StackOptions(**{p.name: values.pop(p.name) for p in shared})
        command(opts, **values)

    run.__signature__ = inspect.Signature([*shared, *own[1:]])  # type: ignore[attr-defined]
    return run


# -- output ------------------------------------------------------------------------------------------------------
def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


@contextmanager
def _pulumi_output(label: str) -> Iterator[Callable[[str], None]]:
    """A callback printing Pulumi's output lines on stderr, under a spinner when stderr is a terminal."""
    console = _stderr_console()

    def show(line: str) -> None:
        if line.strip():
            console.print(line, markup=False, highlight=False, style="dim")

    if console.is_terminal:
        with console.status(label):
            yield show
    else:
        typer.echo(label, err=True)
        yield show


def _where(t: Any) -> str:
    return f"stack {t.stack!r} of project {t.project!r} in {t.backend}"


def _print_changes(changes: dict[str, int], title: str) -> None:
    rows = [(op, str(n)) for op, n in sorted(changes.items())] or [("(none)", "0")]
    print_table(CHANGE_COLUMNS, rows, title=title)


def _has_changes(changes: dict[str, int]) -> bool:
    return any(n for op, n in changes.items() if op not in NO_CHANGE_OPS)


def _shown(name: str, value: Any, secret: tuple[str, ...] | list[str], show_secrets: bool) -> str:
    if name in secret and not show_secrets:
        return "[secret]"
    return value if isinstance(value, str) else json.dumps(value)


def _masked(
    values: dict[str, Any], secret: tuple[str, ...] | list[str], show_secrets: bool
) -> dict[str, Any]:
    return {k: ("[secret]" if k in secret and not show_secrets else v) for k, v in sorted(values.items())}


def _print_outputs(values: dict[str, Any], secret: tuple[str, ...] | list[str], show_secrets: bool) -> None:
    rows = [(k, _shown(k, v, secret, show_secrets)) for k, v in sorted(values.items())]
    print_table(OUTPUT_COLUMNS, rows or [("(none)", "")])


def _write(t: Any, out: Any) -> Path:
    from cloudmodal.infra import automation
    from cloudmodal.infra.outputs import overrides_for, write_outputs

    path = write_outputs(
        t.cfg.cloud,
        out.values,
        stack=t.stack,
        project=t.project,
        backend=t.backend,
        config=automation.config_record(t.cfg),
        secret=out.secret,
        home=_home(),
    )
    typer.echo(f"Wrote the outputs to {path} (0600).", err=True)
    mapped = overrides_for(t.cfg.cloud, out.values)
    if mapped:
        typer.echo("The control plane uses them unless its environment says otherwise:", err=True)
        for field, value in mapped.items():
            typer.echo(f"  {SETTING_ENV.get(field, field)}={value}", err=True)
    return path


def _confirm(yes: bool, question: str) -> None:
    if not yes and not typer.confirm(question, default=False):
        typer.echo("Aborted.", err=True)
        raise typer.Exit(1)


# -- commands ----------------------------------------------------------------------------------------------------
@app.command("preview")
@_stack_command
def preview_command(
    opts: StackOptions,
    as_json: bool = typer.Option(False, "--json", help="The changes as JSON on stdout."),
) -> None:
    """What `up` would create, update or delete on the cloud (changes nothing)."""
    from cloudmodal.infra import automation

    with user_errors():
        t, command = opts.prepare()
        with _pulumi_output(f"Previewing {_where(t)}…") as show:
            changes = automation.preview(t, on_output=show, command=command)
    if as_json:
        typer.echo(
            json.dumps({"stack": t.stack, "project": t.project, "backend": t.backend, "changes": changes})
        )
    else:
        _print_changes(changes, f"Preview of {_where(t)}")


@app.command("up")
@_stack_command
def up_command(
    opts: StackOptions,
    yes: bool = typer.Option(False, "--yes", "-y", help="Apply without showing a preview and asking."),
    as_json: bool = typer.Option(False, "--json", help="The outputs as JSON on stdout."),
) -> None:
    """Create or update the cloud's infrastructure and write its outputs where the control plane reads them."""
    from cloudmodal.infra import automation

    with user_errors():
        t, command = opts.prepare()
        if not yes:
            with _pulumi_output(f"Previewing {_where(t)}…") as show:
                changes = automation.preview(t, on_output=show, command=command)
            _print_changes(changes, f"Preview of {_where(t)}")
            if _has_changes(changes):
                _confirm(False, f"Apply these changes to {t.cfg.cloud}?")
        with _pulumi_output(f"Updating {_where(t)}…") as show:
            out = automation.up(t, on_output=show, command=command)
        _write(t, out)
    if as_json:
        typer.echo(json.dumps(_masked(out.values, out.secret, False)))
    else:
        _print_outputs(out.values, out.secret, False)


@app.command("destroy")
def destroy_command(
    cloud: CloudOpt,
    name: NameOpt = None,
    region: str | None = typer.Option(None, "--region", help="The cloud's region (default: what `up` used)."),
    project: str | None = typer.Option(None, "--project", help="GCP project id (default: what `up` used)."),
    backend: BackendOpt = None,
    secrets_provider: SecretsProviderOpt = None,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete every resource of the cloud's stack: the bucket with its volumes and blobs, the identity, the
    network and the control host."""
    from cloudmodal.infra import automation
    from cloudmodal.infra.outputs import remove_outputs

    with user_errors():
        cfg, recorded = _config(cloud, name=name, region=region, project=project)
        t, command = _prepare(cfg, recorded, backend, secrets_provider)
        _confirm(
            yes,
            f"Destroy every resource of {_where(t)}, including the bucket's volumes and blobs? This cannot be "
            "undone.",
        )
        with _pulumi_output(f"Destroying {_where(t)}…") as show:
            changes = automation.destroy(t, on_output=show, command=command)
        if recorded and recorded.get("project") == t.project and recorded.get("backend") == t.backend:
            if remove_outputs(cfg.cloud, _home()):
                typer.echo(
                    f"Removed the outputs of {cfg.cloud} from the control plane's configuration.", err=True
                )
    _print_changes(changes, f"Destroyed {_where(t)}")


@app.command("outputs")
def outputs_command(
    cloud: CloudOpt,
    name: str | None = typer.Option(None, "--name", help="The Pulumi project (default: what `up` used)."),
    backend: BackendOpt = None,
    secrets_provider: SecretsProviderOpt = None,
    as_json: bool = typer.Option(False, "--json", help="As a JSON object on stdout."),
    write: bool = typer.Option(
        False,
        "--write",
        help="Also write them where the control plane reads them (makes this cloud the latest).",
    ),
    cached: bool = typer.Option(
        False,
        "--cached",
        help="Show what the last `up` wrote instead of asking the backend (no Pulumi CLI needed).",
    ),
    show_secrets: bool = typer.Option(False, "--show-secrets", help="Show secret outputs in clear."),
) -> None:
    """The stack's outputs: bucket, store URLs, worker identity, network, control plane address."""
    from cloudmodal.infra import automation

    with user_errors():
        if cached:
            if write:
                raise InvalidError(
                    "--cached and --write together would rewrite the file with itself: pick one"
                )
            cfg, recorded = _config(cloud, name=name)
            if recorded is None:
                raise InvalidError(
                    f"no outputs of {cfg.cloud} were written here: run `cloudmodal infra up --cloud {cfg.cloud}` "
                    f"(or `cloudmodal infra outputs --cloud {cfg.cloud} --write`)"
                )
            values, secret = dict(recorded["outputs"]), list(recorded.get("secret") or [])
        else:
            cfg, recorded = _config(cloud, name=name)
            t, command = _prepare(cfg, recorded, backend, secrets_provider)
            out = automation.outputs(t, command=command)
            values, secret = out.values, list(out.secret)
            if write:
                _write(t, out)
    if as_json:
        typer.echo(json.dumps(_masked(values, secret, show_secrets)))
    else:
        _print_outputs(values, secret, show_secrets)
