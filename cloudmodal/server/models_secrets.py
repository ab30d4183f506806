"""Tables of named Secrets (``Secret.from_name``; values encrypted at rest).

Imported by :mod:`cloudmodal.server.models` (so one ``metadata`` holds every table); created by their migration.
"""

# No ``from __future__ import annotations`` (see models.py: Pydantic would compile each annotation's string).
from sqlmodel import Field

from cloudmodal.server.models import Row, _table


class NamedSecret(Row, table=True):
    """A named secret: its values as one ciphertext (the whole ``{KEY: value}`` dict as JSON, sealed with the
    control plane's key by :class:`~cloudmodal.server.secretbox.SecretBox`). Neither values nor key names are
    stored in clear: ``required_keys`` are checked after decryption, on the server."""

    __tablename__ = "secret"

    id: str = Field(primary_key=True)  # "st-..."
    name: str = Field(index=True, unique=True)
    sealed: str = ""  # a Fernet token of the JSON-encoded values
    created_at: float = 0.0
    updated_at: float = 0.0  # the values last written (create, overwrite, update)
    created_by: str = ""  # the creating token's principal (token id)
    last_used_at: float | None = None  # the values last resolved into a worker's environment


named_secrets = _table(NamedSecret)
