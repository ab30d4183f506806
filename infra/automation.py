"""Run a cloud's Pulumi program through Pulumi's Automation API: the one seam between cloudmodal and Pulumi.

Everything here builds what the Automation API needs (the project, its state backend, the stack, its config and
secrets provider) and turns what comes back (outputs, change summaries, the CLI's errors) into cloudmodal's own
values and errors. The Automation API drives the ``pulumi`` executable by subprocess, so the CLI must be
installed (https://www.pulumi.com/docs/install/); the SDK comes with ``pip install 'cloudmodal[pulumi]'``.

State lives in a backend the user picks (``--backend``): by default a local file backend under the state
directory (``file://<CLOUDMODAL_HOME>/infra/state``, 0700), else ``s3://``, ``gs://``, ``azblob://`` or a Pulumi
Cloud URL (``https://api.pulumi.com``). With a file or bucket backend, stack secrets are sealed with a passphrase
cloudmodal generates once and keeps in ``<CLOUDMODAL_HOME>/infra/passphrase`` (0600); the CLI reads it through
``PULUMI_CONFIG_PASSPHRASE_FILE``, so it is never on a command line nor in a log. A team sharing a bucket backend
shares that file, or sets ``PULUMI_CONFIG_PASSPHRASE(_FILE)`` itself, or uses ``--secrets-provider`` (a KMS key).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from cloudmodal.config import private_dir
from cloudmodal.exception import ConflictError, Error, InvalidError, NotFoundError
from cloudmodal.infra.common import InfraConfig, program_for
from cloudmodal.infra.outputs import INFRA_DIR

INSTALL_CLI = "https://www.pulumi.com/docs/install/ (e.g. `curl -fsSL https://get.pulumi.com | sh`)"
INSTALL_SDK = "pip install 'cloudmodal[pulumi]'"
MIN_CLI_VERSION = (3, 181, 0)  # the first CLI that runs inline programs for destroy/refresh (--client)
BACKEND_SCHEMES = ("file", "s3", "gs", "azblob", "https", "http")
PULUMI_CLOUD_SCHEMES = ("https", "http")  # a Pulumi Cloud (or self-hosted) service keeps its own secrets
PASSPHRASE_ENVS = ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE")
STATE_DIR = "state"  # <home>/infra/state: the default file backend
WORK_DIR = "work"  # <home>/infra/<WORK_DIR>/<name>-<cloud> holds Pulumi.yaml and the stack's settings file
PASSPHRASE_FILE = "passphrase"
OUTPUT_TAIL_LINES = 25  # of a failed command's output, in the error


class InfraError(Error):
    """A ``cloudmodal infra`` operation failed; the message says what Pulumi said and what to do."""


class PulumiMissingError(InfraError):
    """The Pulumi CLI (or its Python SDK) is not installed."""


# -- what to run ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One cloud's stack: what to build (``cfg``), where its state lives (``backend``), how its secrets are
    sealed, and where the workspace files go. Build it with :func:`target`."""

    cfg: InfraConfig
    backend: str  # the state backend's URL
    project: str  # the Pulumi project: cfg.name, so two teams' names never share a stack
    stack: str  # the stack: the cloud's name
    work_dir: Path  # Pulumi.yaml and Pulumi.<stack>.yaml (0700)
    secrets_provider: str | None  # None: the backend's default (Pulumi Cloud's own)
    env: Mapping[str, str] = field(default_factory=dict)  # added to the CLI's environment (no secret values)

    def stack_config(self) -> dict[str, str]:
        return stack_config(self.cfg)


def target(
    cfg: InfraConfig,
    *,
    home: Path,
    backend: str | None = None,
    secrets_provider: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """Validate ``cfg`` and the backend, create the private directories a local backend needs, and say how the
    stack's secrets are sealed. Raises InvalidError naming the fix."""
    try:
        cfg.validate()
    except ValueError as e:
        raise InvalidError(str(e)) from None
    environ = os.environ if environ is None else environ
    infra = private_dir(home / INFRA_DIR)
    url = check_backend(backend) if backend else default_backend(home)
    scheme = urlsplit(url).scheme
    if scheme == "file":
        _make_file_backend(url)
    env: dict[str, str] = {"PULUMI_BACKEND_URL": url, "PULUMI_SKIP_UPDATE_CHECK": "true"}
    provider = secrets_provider
    if provider is None and scheme not in PULUMI_CLOUD_SCHEMES:
        provider = "passphrase"
    if provider == "passphrase" and not any(environ.get(k) for k in PASSPHRASE_ENVS):
        env["PULUMI_CONFIG_PASSPHRASE_FILE"] = str(passphrase_file(infra))
    work = private_dir(infra / WORK_DIR / f"{cfg.name}-{cfg.cloud}")
    return Target(
        cfg=cfg,
        backend=url,
        project=cfg.name,
        stack=cfg.cloud,
        work_dir=work,
        secrets_provider=provider,
        env=env,
    )


def default_backend(home: Path) -> str:
    """``file://<home>/infra/state``."""
    return (home / INFRA_DIR / STATE_DIR).resolve().as_uri()


def check_backend(url: str) -> str:
    """``url`` if it names a backend Pulumi can keep state in, else InvalidError listing the kinds."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in BACKEND_SCHEMES or not (parts.netloc or parts.path):
        raise InvalidError(
            f"--backend {url!r} is not a Pulumi state backend: use file:///absolute/dir (the default is the "
            "state directory's infra/state), s3://bucket, gs://bucket, azblob://container or "
            "https://api.pulumi.com"
        )
    if parts.scheme == "file" and parts.netloc not in ("", "~") and not parts.path:
        raise InvalidError(
            f"--backend {url!r}: a file backend needs an absolute path, e.g. file:///srv/pulumi"
        )
    if parts.scheme == "file" and parts.netloc == "" and not parts.path.startswith("/"):
        raise InvalidError(
            f"--backend {url!r}: a file backend needs an absolute path, e.g. file:///srv/pulumi"
        )
    if parts.password:
        raise InvalidError(
            "--backend must not carry a password: give the backend's credentials in its usual environment "
            "variables (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*, PULUMI_ACCESS_TOKEN)"
        )
    return url


def _make_file_backend(url: str) -> None:
    parts = urlsplit(url)
    if parts.netloc == "~":
        return  # file://~ : the CLI's own ~/.pulumi
    path = Path(parts.path)
    if not path.exists():
        private_dir(path)


def passphrase_file(infra: Path) -> Path:
    """The passphrase sealing stack secrets in file and bucket backends: made once (256 random bits), 0600,
    never printed. Losing it loses the stack's secrets (not its resources)."""
    path = infra / PASSPHRASE_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return path
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(32))
    return path


def stack_config(cfg: InfraConfig) -> dict[str, str]:
    """The provider configuration the stack carries, so that ``pulumi`` commands run by hand on this stack (and
    the providers' defaults) agree with the program's region and project."""
    region = cfg.resolved_region
    if cfg.cloud == "aws":
        return {"aws:region": region}
    if cfg.cloud == "gcp":
        return {"gcp:project": cfg.project or "", "gcp:region": region}
    if cfg.cloud == "azure":
        return {"azure-native:location": region}
    return {}


def config_record(cfg: InfraConfig) -> dict[str, Any]:
    """``cfg`` as JSON, without the cloud (the outputs file names it) and the admin's SSH key (a public key,
    but nothing reads it back)."""
    rec = asdict(cfg)
    rec.pop("cloud", None)
    rec.pop("ssh_public_key", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in rec.items()}


# -- the CLI and the SDK -------------------------------------------------------------------------------------
MISSING_CLI = (
    "the Pulumi CLI (`pulumi`) is not installed, or not on PATH: `cloudmodal infra` runs Pulumi's Automation "
    f"API, which drives it. Install it: {INSTALL_CLI}, then open a new shell (or add ~/.pulumi/bin to PATH)"
)


def find_cli(environ: Mapping[str, str] | None = None) -> Path:
    """The ``pulumi`` executable: on PATH, else where Pulumi's installer puts it (``~/.pulumi/bin``, which a
    shell opened before the install does not have on PATH yet). Raises PulumiMissingError."""
    environ = os.environ if environ is None else environ
    found = shutil.which("pulumi", path=environ.get("PATH", os.defpath))
    if found:
        return Path(found)
    installed = Path(environ.get("HOME") or Path.home()) / ".pulumi" / "bin" / "pulumi"
    if installed.is_file() and os.access(installed, os.X_OK):
        return installed
    raise PulumiMissingError(MISSING_CLI)


def sdk() -> ModuleType:
    """``pulumi.automation``, or PulumiMissingError naming the extra to install."""
    try:
        import pulumi.automation as auto
    except ImportError as e:
        raise PulumiMissingError(
            f"`cloudmodal infra` needs Pulumi's Python SDK (`{e.name or 'pulumi'}` is missing). Install it: "
            f"{INSTALL_SDK}; it also needs the Pulumi CLI: {INSTALL_CLI}"
        ) from None
    return auto


def pulumi_command(environ: Mapping[str, str] | None = None) -> Any:
    """A ``PulumiCommand`` for the CLI :func:`find_cli` finds, its version checked (at least
    ``MIN_CLI_VERSION``)."""
    auto = sdk()
    from semver import VersionInfo

    cli = find_cli(environ)
    root = str(cli.parent.parent) if cli.parent.name == "bin" else None
    try:
        if root is not None:
            return auto.PulumiCommand(root=root, version=VersionInfo(*MIN_CLI_VERSION))
        return auto.PulumiCommand(version=VersionInfo(*MIN_CLI_VERSION))
    except auto.errors.InvalidVersionError as e:
        raise InfraError(
            f"the Pulumi CLI at {cli} is too old for cloudmodal: {e} Install a current one: {INSTALL_CLI}"
        ) from None
    except FileNotFoundError:
        raise PulumiMissingError(MISSING_CLI) from None
    except (subprocess.CalledProcessError, OSError) as e:
        raise InfraError(f"the Pulumi CLI at {cli} does not run ({e}): reinstall it: {INSTALL_CLI}") from None


# -- errors ----------------------------------------------------------------------------------------------------
def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-OUTPUT_TAIL_LINES:])


@contextlib.contextmanager
def pulumi_errors(t: Target, what: str) -> Iterator[None]:
    """The Automation API's errors as cloudmodal's, in one place (the most specific class first)."""
    auto = sdk()
    errors = auto.errors
    try:
        yield
    except errors.StackNotFoundError:
        raise NotFoundError(
            f"no stack {t.stack!r} of project {t.project!r} in {t.backend}: nothing was brought up there. "
            f"Run `cloudmodal infra up --cloud {t.cfg.cloud}` (with the same --name and --backend)"
        ) from None
    except errors.ConcurrentUpdateError as e:
        raise ConflictError(
            f"{what}: another update of stack {t.stack!r} is running (or one that crashed left it locked). "
            f"Wait for it; if none is running, `pulumi cancel` (Pulumi Cloud) or `pulumi stack export | pulumi "
            f"stack import` clears the lock.\n{_tail(_stderr(e))}"
        ) from None
    except errors.CommandError as e:
        raise InfraError(f"{what} failed:\n{_tail(_stderr(e)) or _tail(str(e))}") from None
    except FileNotFoundError as e:
        if e.filename and Path(str(e.filename)).name == "pulumi":
            raise PulumiMissingError(MISSING_CLI) from None
        raise


def _stderr(e: Exception) -> str:
    # CommandError keeps only str(CommandResult): "code: N\n stdout: …\n stderr: …"
    text = str(e)
    head, sep, rest = text.partition(" stderr: ")
    return rest if sep else text


# -- operations ------------------------------------------------------------------------------------------------
OnOutput = Callable[[str], None]


@dataclass(frozen=True)
class Outputs:
    values: dict[str, Any]  # output name -> value
    secret: tuple[str, ...]  # the names whose values are secrets


def open_stack(t: Target, *, command: Any = None, create: bool = True) -> Any:
    """The Automation API's ``Stack`` for ``t``: the workspace's project settings name the backend, the
    environment carries the passphrase file's path, and the stack's config is set. ``create``: make the stack
    when the backend has none (``up`` and ``preview``); otherwise a missing stack is NotFoundError."""
    auto = sdk()
    command = command or pulumi_command()
    cfg = t.cfg

    def program() -> None:
        program_for(cfg.cloud)(cfg)

    opts = auto.LocalWorkspaceOptions(
        work_dir=str(t.work_dir),
        env_vars=dict(t.env),
        secrets_provider=t.secrets_provider,
        project_settings=auto.ProjectSettings(
            name=t.project,
            runtime="python",
            description=f"cloudmodal's standing infrastructure on {cfg.cloud}",
            backend=auto.ProjectBackend(url=t.backend),
        ),
        pulumi_command=command,
    )
    with pulumi_errors(t, f"opening stack {t.stack!r}"):
        if create:
            stack = auto.create_or_select_stack(
                stack_name=t.stack, project_name=t.project, program=program, opts=opts
            )
            config = {k: auto.ConfigValue(value=v) for k, v in t.stack_config().items()}
            if config:
                stack.set_all_config(config)
        else:
            stack = auto.select_stack(stack_name=t.stack, project_name=t.project, program=program, opts=opts)
    return stack


def preview(t: Target, *, on_output: OnOutput | None = None, command: Any = None) -> dict[str, int]:
    """What ``up`` would change: operation (``create``, ``update``, ``delete``, ``same``, …) -> resources."""
    stack = open_stack(t, command=command)
    with pulumi_errors(t, f"pulumi preview of stack {t.stack!r}"):
        result = stack.preview(on_output=on_output, color="never")
    return {str(k): int(v) for k, v in (result.change_summary or {}).items()}


def up(t: Target, *, on_output: OnOutput | None = None, command: Any = None) -> Outputs:
    """Create or update the stack's resources; its outputs."""
    stack = open_stack(t, command=command)
    with pulumi_errors(t, f"pulumi up of stack {t.stack!r}"):
        result = stack.up(on_output=on_output, color="never")
    return _outputs(result.outputs)


def destroy(t: Target, *, on_output: OnOutput | None = None, command: Any = None) -> dict[str, int]:
    """Delete every resource of the stack (the stack and its history stay); what was done."""
    stack = open_stack(t, command=command, create=False)
    with pulumi_errors(t, f"pulumi destroy of stack {t.stack!r}"):
        result = stack.destroy(on_output=on_output, color="never")
    changes = getattr(result.summary, "resource_changes", None) or {}
    return {str(k): int(v) for k, v in changes.items()}


def outputs(t: Target, *, command: Any = None) -> Outputs:
    """The stack's current outputs, from its backend."""
    stack = open_stack(t, command=command, create=False)
    with pulumi_errors(t, f"reading the outputs of stack {t.stack!r}"):
        return _outputs(stack.outputs())


def _outputs(raw: Mapping[str, Any]) -> Outputs:
    values = {k: getattr(v, "value", v) for k, v in raw.items()}
    secret = tuple(sorted(k for k, v in raw.items() if getattr(v, "secret", False)))
    return Outputs(values=values, secret=secret)
