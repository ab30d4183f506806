"""``python -m cloudmodal.server.migrations new "what changes"``: autogenerate the next revision.

The difference is taken between the models (``cloudmodal/server/models.py``) and a scratch SQLite database
upgraded to the current head; the new file goes to ``versions/`` with the next sequence number as its id.
``python -m cloudmodal.server.migrations heads`` prints the head revision.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from sqlalchemy import create_engine


def main(argv: list[str]) -> int:
    from alembic import command
    from alembic.script import ScriptDirectory

    from cloudmodal.server import migrations

    if argv[:1] == ["heads"]:
        print(ScriptDirectory.from_config(migrations.alembic_config()).get_current_head())
        return 0
    if len(argv) != 2 or argv[0] != "new":
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'scratch.db'}"
        engine = create_engine(url)
        with engine.begin() as conn:
            command.upgrade(migrations.alembic_config(conn), "head")  # the chain, not the models
        engine.dispose()
        config = migrations.alembic_config(url=url)
        head = ScriptDirectory.from_config(config).get_current_head() or "0000"
        script = command.revision(config, message=argv[1], autogenerate=True, rev_id=f"{int(head) + 1:04d}")
    path = script.path if script is not None and not isinstance(script, list) else "?"
    print(f"wrote {path}; read it, then set HEAD in cloudmodal/server/migrations/__init__.py")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
