"""``cloudmodal.runner``: where Modal's ``modal.runner`` functions live (``from modal.runner import
deploy_app``). They are the programmatic forms of ``App.deploy`` and ``App.run``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloudmodal.app import App
from cloudmodal.exception import InvalidError

__all__ = ["DeployResult", "deploy_app", "run_app"]


@dataclass(frozen=True)
class DeployResult:
    """What :func:`deploy_app` did. ``app_page_url``/``app_logs_url`` are None: the control plane has no
    per-app web page (``cloudmodal app logs NAME`` shows the logs)."""

    app_id: str
    app_page_url: str | None = None
    app_logs_url: str | None = None
    warnings: list[str] = field(default_factory=list)
    version: int | None = None  # ours: the deployment's version number


def _check_app(app: Any, what: str) -> App:
    if not isinstance(app, App):
        raise InvalidError(f"{what} takes a cloudmodal.App, got {type(app).__name__}.")
    return app


def deploy_app(
    app: App, name: str | None = None, environment_name: str | None = None, tag: str = "", client: Any = None
) -> DeployResult:
    """Deploy ``app`` (as ``app.deploy(name=...)``) and say what was deployed."""
    info = _check_app(app, "deploy_app").deploy(name=name, environment_name=environment_name, tag=tag)
    return DeployResult(app_id=info["app_id"], version=info.get("version"))


def run_app(
    app: App,
    *,
    client: Any = None,
    detach: bool = False,
    environment_name: str | None = None,
    interactive: bool = False,
) -> Any:
    """Context manager running ``app`` ephemerally: ``with run_app(app): f.remote()`` (as ``app.run()``)."""
    return _check_app(app, "run_app").run(detach=detach, environment_name=environment_name)
