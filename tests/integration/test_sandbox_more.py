"""Sandboxes' images, volumes, named secrets, exec timeouts and ``.aio`` forms, with real processes: a real control
plane, real hosts under bubblewrap, a real pip build of the image's environment (from a wheel made here, no
network), a real volume store. Each property has its negative control (the same probe without the feature)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import start_server, use_server

import cloudmodal
from cloudmodal.client.session import current_session
from cloudmodal.exception import AlreadyExistsError, InvalidError, NotFoundError
from cloudmodal.sandbox import Sandbox
from cloudmodal.server.app import ServerHandle

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)"
)

PKG = "cmsbxpkg"  # a package made here: in no environment of this machine


def make_wheel(directory: Path) -> Path:
    """A pure-Python wheel of :data:`PKG` 0.1 (``VALUE = 42``), built by hand (no build backend, no index)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{PKG}-0.1-py3-none-any.whl"
    info = f"{PKG}-0.1.dist-info"
    files = {
        f"{PKG}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", record)
    return path


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    state = tmp_path_factory.mktemp("cp")
    if request.param == "sqlite":
        url = f"sqlite:///{state / 'cloudmodal.db'}"
    else:
        url = request.getfixturevalue("new_postgres_database")()
    with pytest.MonkeyPatch.context() as mp:
        # image environments are built into this module's own cache
        mp.setenv("CLOUDMODAL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        handle = start_server(state, url)
        try:
            with use_server(handle):
                yield handle
        finally:
            handle.stop()


@pytest.fixture(scope="module")
def app(plane: ServerHandle) -> cloudmodal.App:
    return cloudmodal.App.lookup("sandbox-more", create_if_missing=True)


def run(sb: Sandbox, *argv: str, **kw: object) -> tuple[int, str, str]:
    p = sb.exec(*argv, **kw)
    out, err = p.stdout.read(), p.stderr.read()
    return p.wait(), out, err


IMPORT = f"import {PKG}; print({PKG}.VALUE)"


# -- images ---------------------------------------------------------------------------------------------------
def test_image_with_pip_packages_env_and_workdir(app: cloudmodal.App, tmp_path: Path) -> None:
    wheels = make_wheel(tmp_path / "wheels").parent
    image = (
        cloudmodal.Image.debian_slim()
        .pip_install(f"{PKG}==0.1", find_links=str(wheels), extra_options="--no-index")
        .env({"IMAGE_VAR": "from-the-image"})
        .workdir("/app")
    )
    sb = Sandbox.create(app=app, image=image, timeout=120)
    plain = Sandbox.create(app=app, timeout=120)
    try:
        code, out, err = run(sb, "python", "-c", IMPORT)
        assert (code, out.strip()) == (0, "42"), err
        # control: the same import without the image fails (the package is in no environment here)
        code, _, err = run(plain, "python", "-c", IMPORT)
        assert code == 1 and "ModuleNotFoundError" in err
        # the image's env and workdir; neither in a sandbox without it
        assert run(sb, "sh", "-c", 'echo "$IMAGE_VAR"; pwd')[1].split() == ["from-the-image", "/app"]
        assert run(plain, "sh", "-c", 'echo "<$IMAGE_VAR>"; pwd')[1].split() == ["<>", "/root"]
        # the image's environment is read-only in the sandbox; its workdir is writable
        probe = f"import {PKG}, os; open(os.path.join(os.path.dirname({PKG}.__file__), 'x'), 'w')"
        code, _, err = run(sb, "python", "-c", probe)
        assert code == 1 and "Read-only file system" in err
        assert run(sb, "python", "-c", "open('/app/x', 'w').write('ok')")[0] == 0
    finally:
        sb.terminate()
        plain.terminate()


def test_image_env_is_built_once_per_image(app: cloudmodal.App, tmp_path: Path) -> None:
    """Two sandboxes of one image use one environment (the same interpreter prefix)."""
    wheels = make_wheel(tmp_path / "wheels").parent
    image = cloudmodal.Image.debian_slim().pip_install(
        f"{PKG}==0.1", find_links=str(wheels), extra_options="--no-index"
    )
    prefixes = []
    for _ in range(2):
        sb = Sandbox.create("python", "-c", "import sys; print(sys.prefix)", app=app, image=image, timeout=60)
        prefixes.append(sb.stdout.read().strip())
        sb.wait()
    assert prefixes[0] == prefixes[1] and "/envs/" in prefixes[0]


def test_image_build_failure_is_reported(app: cloudmodal.App, tmp_path: Path) -> None:
    image = cloudmodal.Image.debian_slim().pip_install(
        "cm-no-such-package-xyz==1.0", find_links=str(tmp_path), extra_options="--no-index"
    )
    with pytest.raises(InvalidError, match="cm-no-such-package-xyz"):
        Sandbox.create(app=app, image=image, timeout=60)


def test_image_pip_options_that_write_elsewhere_are_refused(app: cloudmodal.App, tmp_path: Path) -> None:
    target = tmp_path / "target"
    image = cloudmodal.Image.debian_slim().pip_install(
        f"{PKG}==0.1", extra_options=f"--no-index --target {target}"
    )
    with pytest.raises(InvalidError, match="'--target' is not taken"):
        Sandbox.create(app=app, image=image, timeout=60)
    assert not target.exists()


# -- volumes --------------------------------------------------------------------------------------------------
def test_volume_mounted_and_committed_when_the_sandbox_ends(app: cloudmodal.App) -> None:
    vol = cloudmodal.Volume.from_name(f"sbvol-{uuid.uuid4().hex[:10]}", create_if_missing=True)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"seeded\n"), "/seed.txt")
    sb = Sandbox.create(app=app, volumes={"/data": vol}, timeout=120)
    assert run(sb, "cat", "/data/seed.txt")[1] == "seeded\n"
    assert run(sb, "sh", "-c", "echo written > /data/out.txt")[0] == 0
    # not committed while the sandbox runs (Modal commits a sandbox's volumes when it terminates)
    with pytest.raises(FileNotFoundError):
        b"".join(vol.read_file("out.txt"))
    sb.terminate(wait=True)
    assert b"".join(vol.read_file("out.txt")) == b"written\n"
    # control: a sandbox without the volume has no /data
    other = Sandbox.create("cat", "/data/seed.txt", app=app, timeout=60)
    other.wait()
    assert other.returncode != 0


def test_volume_read_only_mount_and_command_end_commits(app: cloudmodal.App) -> None:
    vol = cloudmodal.Volume.from_name(f"sbvol-{uuid.uuid4().hex[:10]}", create_if_missing=True)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"v1\n"), "/a.txt")
    ro = Sandbox.create(
        "sh",
        "-c",
        "cat /v/a.txt; echo x > /v/b.txt",
        app=app,
        volumes={"/v": vol.with_mount_options(read_only=True)},
    )
    assert ro.stdout.read() == "v1\n"
    assert "Read-only file system" in ro.stderr.read()
    ro.wait()
    assert ro.returncode != 0
    # a sandbox whose command ends (no terminate) commits too; control for the read-only one above
    rw = Sandbox.create("sh", "-c", "echo x > /v/b.txt", app=app, volumes={"/v": vol})
    rw.wait()
    assert rw.returncode == 0
    assert b"".join(vol.read_file("b.txt")) == b"x\n"


def test_volume_mount_path_checked(app: cloudmodal.App) -> None:
    vol = cloudmodal.Volume.from_name(f"sbvol-{uuid.uuid4().hex[:10]}", create_if_missing=True)
    with pytest.raises(InvalidError, match="system directories"):
        Sandbox.create(app=app, volumes={"/usr/data": vol}, timeout=60)


# -- named secrets --------------------------------------------------------------------------------------------
def test_named_secret_reaches_the_sandbox_only(app: cloudmodal.App) -> None:
    name = f"sb-secret-{uuid.uuid4().hex[:8]}"
    value = uuid.uuid4().hex
    cloudmodal.Secret.objects.create(name, {"SB_NAMED": value})
    sb = Sandbox.create(app=app, secrets=[cloudmodal.Secret.from_name(name)], timeout=60)
    plain = Sandbox.create(app=app, timeout=60)
    try:
        assert run(sb, "sh", "-c", 'echo "<$SB_NAMED>"')[1].strip() == f"<{value}>"
        # control: absent from a sandbox without it
        assert run(plain, "sh", "-c", 'echo "<$SB_NAMED>"')[1].strip() == "<>"
        # exec(secrets=...) gives it to that process only
        assert (
            run(plain, "sh", "-c", 'echo "<$SB_NAMED>"', secrets=[cloudmodal.Secret.from_name(name)])[
                1
            ].strip()
            == f"<{value}>"
        )
        assert run(plain, "sh", "-c", 'echo "<$SB_NAMED>"')[1].strip() == "<>"
        # nor in the sandbox's row
        row = current_session().transport.get(f"/v1/sandboxes/{sb.object_id}")
        assert value not in json.dumps(row) and name in json.dumps(row["spec"])
    finally:
        sb.terminate()
        plain.terminate()
    with pytest.raises(NotFoundError, match="not found"):
        Sandbox.create(app=app, secrets=[cloudmodal.Secret.from_name(name + "-missing")], timeout=60)


# live sleeps (a killed one that is not reaped yet is a zombie with the same name: not counted)
COUNT_SLEEPS = (
    "import os\nn = 0\nfor p in os.listdir('/proc'):\n    try:\n"
    "        st = open(f'/proc/{p}/stat').read() if p.isdigit() else '(x) Z'\n"
    "        n += st[st.index('(') + 1 : st.rindex(')')] == 'sleep' and st[st.rindex(')') + 2] != 'Z'\n"
    "    except OSError:\n        pass\nprint(n)"
)


def sleeps_become(sb: Sandbox, n: int) -> None:
    """Wait until the sandbox runs ``n`` sleeps (a kill is reaped, an exec has exec'd, a moment later)."""
    deadline = time.monotonic() + 60
    while (got := run(sb, "python", "-c", COUNT_SLEEPS)[1].strip()) != str(n):
        assert time.monotonic() < deadline, f"the sandbox runs {got} sleeps, not {n}"
        time.sleep(0.1)


# -- exec(timeout=) -------------------------------------------------------------------------------------------
def test_exec_timeout_kills_the_process_and_its_children(app: cloudmodal.App) -> None:
    sb = Sandbox.create(app=app, timeout=120)
    try:
        p = sb.exec("sh", "-c", "sleep 600 & sleep 600; echo never", timeout=1)
        assert p.wait() == -1  # Modal's returncode after an exec's timeout
        assert p.stdout.read() == ""
        # the sandbox goes on; no sleep is left in it
        sleeps_become(sb, 0)
        # control: the probe counts a sleep that runs
        sb.exec("sleep", "600")
        sleeps_become(sb, 1)
        # control: a process that ends within its timeout keeps its own code
        assert sb.exec("sh", "-c", "exit 7", timeout=60).wait() == 7
    finally:
        sb.terminate()


# -- names ----------------------------------------------------------------------------------------------------
def test_name_is_unique_among_running_sandboxes_and_from_name_finds_it(app: cloudmodal.App) -> None:
    name = f"box-{uuid.uuid4().hex[:8]}"
    sb = Sandbox.create(app=app, name=name, timeout=60)
    try:
        found = Sandbox.from_name("sandbox-more", name)
        assert found.object_id == sb.object_id
        assert run(found, "echo", "same")[1] == "same\n"
        with pytest.raises(AlreadyExistsError, match="already named"):
            Sandbox.create(app=app, name=name, timeout=60)
        # control: another name is free, and an unknown one is not found
        Sandbox.create(app=app, name=name + "-2", timeout=60).terminate()
        with pytest.raises(NotFoundError):
            Sandbox.from_name("sandbox-more", name + "-none")
    finally:
        sb.terminate(wait=True)
    # once it has ended, the name is free again
    again = Sandbox.create(app=app, name=name, timeout=60)
    again.terminate()


# -- .aio -----------------------------------------------------------------------------------------------------
def test_aio_forms(app: cloudmodal.App) -> None:
    async def main() -> tuple[int, str, int | None]:
        sb = await Sandbox.create.aio(app=app, timeout=60)
        p = await sb.exec.aio("sh", "-c", "echo aio; exit 4")
        out = await p.stdout.read.aio()
        code = await p.wait.aio()
        await sb.terminate.aio()
        await sb.wait.aio(raise_on_termination=False)
        return code, out, await sb.poll.aio()

    code, out, end = asyncio.run(main())
    assert (code, out, end) == (4, "aio\n", 137)
