"""Another tenant's app, with an inline secret. The value is made fresh by each process that imports this
module; only the test process's copy matters (workers get theirs from the control plane), and it is never in
this file, so a shipped source never carries it."""

from __future__ import annotations

import hashlib
import os
import secrets

import cloudmodal

SECRET_VALUE = "cmsec-" + secrets.token_hex(20)

app = cloudmodal.App("sec-tenant")


@app.function(secrets=[cloudmodal.Secret.from_dict({"TOKENX": SECRET_VALUE})])
def secret_digest() -> str:
    """A digest of the secret the worker sees, never the value itself: the result is stored, and the state
    dir must not contain the value anywhere."""
    return hashlib.sha256(os.environ.get("TOKENX", "").encode()).hexdigest()
