"""`cloudmodal volume create|list|ls|put|get|rm|cp|rename|delete`: Volumes from the command line, as Modal's
`modal volume`. Transfers read and write the volume's object store directly (the control plane only names the
volume and publishes commits); long ones show a progress bar on stderr when it is a terminal."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import typer

from cloudmodal.cli.errors import fail, user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

app = typer.Typer(help="Manage volumes.", no_args_is_help=True)

LIST_COLUMNS = (
    Column("Name"),
    Column("Volume ID", keep=2),
    Column("Version", "right", keep=1),
    Column("Created"),
)
LS_COLUMNS = (Column("Filename"), Column("Type", keep=1), Column("Modified", keep=2), Column("Size", "right"))
PROGRESS_MIN_BYTES = 16 * 1024 * 1024  # transfers smaller than this show no bar


def _ts(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _volume(name: str) -> Any:
    from cloudmodal.volume import Volume

    return Volume.from_name(name)


# -- progress -------------------------------------------------------------------------------------------
class _Progress:
    """Bytes moved so far, as a rich bar on stderr (only in a terminal, and only for large transfers)."""

    def __init__(self, label: str, total: int) -> None:
        self._bar: Any = None
        if total >= PROGRESS_MIN_BYTES and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=True,
            )
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@contextmanager
def _progress(label: str, total: int) -> Iterator[_Progress]:
    p = _Progress(label, total)
    try:
        yield p
    finally:
        p.close()


class _Counted:
    """A binary file whose reads advance a progress bar (what the engine streams an upload from)."""

    def __init__(self, f: BinaryIO, progress: _Progress) -> None:
        self._f = f
        self._p = progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._p.advance(len(data))
        return data


# -- commands -------------------------------------------------------------------------------------------
@app.command("create")
def create(
    name: str = typer.Argument(..., help="The new volume's name."),
    version: int | None = typer.Option(None, "--version", help="Accepted for Modal compatibility (1 or 2)."),
) -> None:
    """Create a named volume."""
    from cloudmodal.volume import Volume

    with user_errors():
        if version not in (None, 1, 2):
            fail(f"--version must be 1 or 2, not {version}.", 2)
        Volume.objects.create(name)
    typer.echo(f"Created volume {name!r}. Mount it with volumes={{'/data': Volume.from_name({name!r})}}.")


@app.command("list")
def list_volumes(
    as_json: bool = typer.Option(False, "--json"),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """The team's named volumes, newest first."""
    from cloudmodal.client.session import current_session

    with user_errors():
        rows = current_session().transport.get("/v1/volumes")
    if as_json:
        typer.echo(
            json.dumps(
                [{k: r[k] for k in ("name", "id", "version", "created_at", "created_by")} for r in rows],
                indent=2,
            )
        )
        return
    print_table(
        LIST_COLUMNS, [[r["name"], r["id"], str(r["version"]), _ts(r["created_at"])] for r in rows], wide=wide
    )


@app.command("ls")
def ls(
    volume_name: str = typer.Argument(..., help="The volume."),
    path: str = typer.Argument("/", help="A directory (or file) in the volume."),
    as_json: bool = typer.Option(False, "--json"),
    wide: bool = typer.Option(False, "--wide", help=WIDE_HELP),
) -> None:
    """List a directory of a volume."""
    with user_errors():
        try:
            entries = _volume(volume_name).listdir(path)
        except FileNotFoundError:
            fail(f"{path!r} is not in volume {volume_name!r}.")
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {"path": e.path, "type": e.type.name.lower(), "mtime": e.mtime, "size": e.size}
                    for e in entries
                ],
                indent=2,
            )
        )
        return
    rows = [
        [
            e.path + ("/" if e.type.name == "DIRECTORY" else ""),
            e.type.name.lower(),
            _ts(e.mtime),
            _size(e.size) if e.type.name == "FILE" else "-",
        ]
        for e in entries
    ]
    print_table(LS_COLUMNS, rows, wide=wide, title=f"Directory listing of {path!r} in {volume_name!r}")


def _local_files(local: Path) -> list[tuple[Path, str]]:
    """(file, its path relative to ``local``) for a file (its own name) or a directory's files, recursively."""
    if local.is_file():
        return [(local, local.name)]
    out = []
    for dirpath, _dirs, files in os.walk(local):
        for f in sorted(files):
            full = Path(dirpath) / f
            if full.is_file():
                out.append((full, full.relative_to(local).as_posix()))
    return out


@app.command("put")
def put(
    volume_name: str = typer.Argument(..., help="The volume."),
    local_path: Path = typer.Argument(..., help="A local file or directory."),
    remote_path: str = typer.Argument("/", help="Where in the volume ('/dir/' puts it inside /dir)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite files that exist in the volume."),
) -> None:
    """Upload a file or a directory into a volume (one commit)."""
    if not local_path.exists():
        fail(f"{str(local_path)!r} does not exist.", 2)
    if local_path.is_dir():
        base = remote_path
    elif remote_path.endswith("/"):
        base = remote_path + local_path.name
    else:
        base = remote_path
    files = _local_files(local_path)
    total = sum(f.stat().st_size for f, _ in files)
    with user_errors():
        vol = _volume(volume_name)
        try:
            with (
                _progress(f"put {local_path.name}", total) as progress,
                vol.batch_upload(force=force) as batch,
            ):
                for f, rel in files:
                    remote = base if local_path.is_file() else str(PurePosixPath("/", base, rel))
                    with f.open("rb") as fh:
                        batch.put_file(_Counted(fh, progress), remote, stat.S_IMODE(f.stat().st_mode))
        except FileExistsError as e:
            fail(f"{e}. Use --force to overwrite.")
    where = base if local_path.is_file() else base.rstrip("/") + "/"
    typer.echo(f"Uploaded {len(files)} file(s), {_size(total)}, to {where!r} in {volume_name!r}.")


@app.command("get")
def get(
    volume_name: str = typer.Argument(..., help="The volume."),
    remote_path: str = typer.Argument(..., help="A file or directory in the volume."),
    local_path: str = typer.Argument(".", help="Where to write it ('-': the file to stdout)."),
    force: bool = typer.Option(False, "--force", help="Overwrite local files."),
) -> None:
    """Download a file or a directory from a volume."""
    from cloudmodal.volumes.engine import FileEntryType

    with user_errors():
        vol = _volume(volume_name)
        try:
            entries = vol.listdir(remote_path, recursive=True)
        except FileNotFoundError:
            fail(f"{remote_path!r} is not in volume {volume_name!r}.")
        files = [e for e in entries if e.type == FileEntryType.FILE]
        is_file = len(entries) == 1 and files and files[0].path == remote_path.strip("/")
        if local_path == "-":
            if not is_file:
                fail(f"{remote_path!r} is a directory: only a file can be written to stdout.", 2)
            out = sys.stdout.buffer
            for chunk in vol.read_file(remote_path):
                out.write(chunk)
            out.flush()
            return
        local = Path(local_path)
        root = remote_path.strip("/")
        targets: list[tuple[str, Path]] = []
        for e in files:
            if is_file:
                dest = local / PurePosixPath(e.path).name if local.is_dir() else local
            else:
                name = PurePosixPath(root).name if root else ""
                rel = PurePosixPath(e.path).relative_to(root) if root else PurePosixPath(e.path)
                dest = local / name / rel
            if dest.exists() and not force:
                fail(f"{str(dest)!r} exists. Use --force to overwrite.")
            targets.append((e.path, dest))
        total = sum(e.size for e in files)
        with _progress(f"get {PurePosixPath(root).name or volume_name}", total) as progress:
            for path, dest in targets:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.cloudmodal-part")
                with tmp.open("wb") as fh:
                    for chunk in vol.read_file(path):
                        fh.write(chunk)
                        progress.advance(len(chunk))
                os.replace(tmp, dest)  # a file is whole or absent, never half-written
    typer.echo(f"Downloaded {len(targets)} file(s), {_size(total)}, to {str(local)!r}.", err=True)


@app.command("rm")
def rm(
    volume_name: str = typer.Argument(..., help="The volume."),
    remote_path: str = typer.Argument(..., help="A file or directory in the volume."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Remove a directory and its contents."),
) -> None:
    """Remove a file or a directory from a volume (one commit)."""
    with user_errors():
        try:
            _volume(volume_name).remove_file(remote_path, recursive=recursive)
        except FileNotFoundError:
            fail(f"{remote_path!r} is not in volume {volume_name!r}.")
        except (IsADirectoryError, OSError) as e:
            fail(f"{e}" + (" Use -r to remove a directory." if isinstance(e, IsADirectoryError) else ""))
    typer.echo(f"Removed {remote_path!r} from {volume_name!r}.")


@app.command("cp")
def cp(
    volume_name: str = typer.Argument(..., help="The volume."),
    paths: list[str] = typer.Argument(..., help="Sources, then the destination (cp's rules)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Copy directories."),
) -> None:
    """Copy files within a volume (one commit)."""
    if len(paths) < 2:
        fail("Give at least one source and a destination.", 2)
    with user_errors():
        try:
            _volume(volume_name).copy_files(paths[:-1], paths[-1], recursive=recursive)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
            fail(f"{e}" + (" Use -r to copy a directory." if isinstance(e, IsADirectoryError) else ""))


@app.command("rename")
def rename(
    old_name: str = typer.Argument(..., help="The volume's name."),
    new_name: str = typer.Argument(..., help="Its new name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Rename a volume (functions that mount it by its old name will not find it)."""
    from cloudmodal.volume import Volume

    if not yes:
        typer.confirm(f"Rename volume {old_name!r} to {new_name!r}?", abort=True)
    with user_errors():
        Volume.rename(old_name, new_name)
    typer.echo(f"Renamed {old_name!r} to {new_name!r}.")


@app.command("delete")
def delete(
    name: str = typer.Argument(..., help="The volume's name."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Succeed if it does not exist."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a volume and every file in it. This cannot be undone."""
    from cloudmodal.volume import Volume

    if not yes:
        typer.confirm(f"Delete volume {name!r} and all its files? This cannot be undone.", abort=True)
    with user_errors():
        Volume.objects.delete(name, allow_missing=allow_missing)
    typer.echo(f"Deleted volume {name!r}.")
