"""Functions that read named secrets from their environment and report what they see without the values:
whether each variable is set, and its length."""

from __future__ import annotations

import os

import cloudmodal

NAMES = ("API_KEY", "DB_PASSWORD", "OTHER_TOKEN")
MARKER = "secrets-app checked its environment"  # printed, so a test can see the logs API returns worker lines


def _seen() -> dict[str, int | None]:
    print(MARKER)
    return {k: (len(os.environ[k]) if k in os.environ else None) for k in NAMES}


app = cloudmodal.App("secrets-app")


@app.function(secrets=[cloudmodal.Secret.from_name("cm-test-api", required_keys=["API_KEY"])])
def uses_secret() -> dict[str, int | None]:
    return _seen()


@app.function()
def no_secret() -> dict[str, int | None]:
    return _seen()


# App-level secrets reach every function of the app.
app_level = cloudmodal.App("secrets-app-level", secrets=[cloudmodal.Secret.from_name("cm-test-other")])


@app_level.function()
def from_app() -> dict[str, int | None]:
    return _seen()


missing = cloudmodal.App("secrets-app-missing")


@missing.function(secrets=[cloudmodal.Secret.from_name("cm-test-missing")])
def needs_missing() -> dict[str, int | None]:
    return _seen()


# Deployed, with workers that leave soon after their last input: each call after a pause starts a new one.
deployed = cloudmodal.App("secrets-app-deployed")


@deployed.function(secrets=[cloudmodal.Secret.from_name("cm-test-rotating")], scaledown_window=2)
def deployed_fn() -> dict[str, int | None]:
    return _seen()
