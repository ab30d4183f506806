"""Make ``release-0.1.0.sqlite3``: a control plane database as release 0.1.0 leaves it.

Run it with 0.1.0's code, not this checkout's (the file stands for databases that release made)::

    git worktree add /tmp/release-0.1.0 68c473f
    # an interpreter that imports cloudmodal from there: the package laid out as setuptools installs it
    mkdir -p /tmp/r010/pkg && cp -r /tmp/release-0.1.0/cloudmodal /tmp/r010/pkg/
    for d in providers pricing infra; do cp -r /tmp/release-0.1.0/$d /tmp/r010/pkg/cloudmodal/$d; done
    python -m venv /tmp/r010/venv && echo /tmp/r010/pkg > /tmp/r010/venv/lib/python3.11/site-packages/0.pth
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/r010/venv/lib/python3.11/site-packages/1.pth
    CLOUDMODAL_HOME=/tmp/r010/home /tmp/r010/venv/bin/python tests/server/data/make_release_db.py /tmp/r010/state
    sqlite3 /tmp/r010/state/cloudmodal.db "VACUUM INTO 'tests/server/data/release-0.1.0.sqlite3'"

It runs an ephemeral app (``.remote()``, ``.map()``, a failing call, a generator, a ``.spawn()`` whose call
id ``tests/server/test_migrations.py`` reads back), deploys a second app and calls it, and mints a member
token, on the local provider.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

RUN_APP = """
import cloudmodal

app = cloudmodal.App("release-db")


@app.function()
def square(x: int) -> int:
    print(f"squaring {x}")
    return x * x


@app.function(retries=0)
def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


@app.function()
def countdown(n: int):
    yield from range(n, 0, -1)
"""

DEPLOYED_APP = """
import cloudmodal

app = cloudmodal.App("release-deployed")


@app.function()
def double(x: int) -> int:
    return 2 * x
"""


def main(state: Path) -> None:
    import cloudmodal
    from cloudmodal.client import session as session_mod
    from cloudmodal.client.session import run_app
    from cloudmodal.server.app import ServerHandle, default_settings

    src = Path(tempfile.mkdtemp(prefix="release-db-src-"))
    (src / "relapp.py").write_text(RUN_APP)
    (src / "deployed.py").write_text(DEPLOYED_APP)
    sys.path.insert(0, str(src))
    os.chdir(src)  # the workers start here: nothing on their path but the apps (not this checkout)
    import deployed  # type: ignore[import-not-found]
    import relapp  # type: ignore[import-not-found]

    state.mkdir(parents=True, exist_ok=True)
    settings = default_settings(state, database_url=f"sqlite:///{state / 'cloudmodal.db'}")
    handle = ServerHandle(settings).start_in_thread()
    os.environ["CLOUDMODAL_SERVER_URL"] = handle.url
    os.environ["CLOUDMODAL_TOKEN"] = handle.token
    session_mod.disconnect()
    handle.cp.tokens.create("member", "release member")
    with run_app(relapp.app, show_logs=False):
        assert relapp.square.remote(7) == 49
        assert list(relapp.square.map(range(5))) == [0, 1, 4, 9, 16]
        try:
            relapp.fail.remote(3)
        except ValueError:
            pass
        assert list(relapp.countdown.remote_gen(3)) == [3, 2, 1]
        call = relapp.square.spawn(12)
        assert call.get() == 144
        print("spawn call id:", call.object_id)
        time.sleep(1.5)  # the workers' logs reach the database
    session_mod.deploy(deployed.app)
    assert cloudmodal.Function.from_name("release-deployed", "double").remote(21) == 42
    session_mod.disconnect()
    handle.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
