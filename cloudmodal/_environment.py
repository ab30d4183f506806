"""Modal's environments (``environment_name=``): cloudmodal has one per control plane.

Modal keeps a workspace's objects in named environments (``main`` by default). A cloudmodal control plane is one
namespace, so the name ``main`` (or none) is accepted everywhere Modal takes one, and any other name is refused:
quietly using ``main``'s objects for a program that asked for ``prod`` would be wrong in the worst way.
"""

from __future__ import annotations

from cloudmodal.exception import InvalidError

DEFAULT_ENVIRONMENT = "main"


def check_environment(name: str | None, where: str) -> None:
    """Refuse an ``environment_name`` other than the control plane's one environment; ``where`` names the
    call for the message."""
    if name is None or name == "" or name == DEFAULT_ENVIRONMENT:
        return
    if not isinstance(name, str):
        raise InvalidError(f"{where}: environment_name must be a string, not {type(name).__name__}.")
    raise InvalidError(
        f"{where}: environment_name={name!r} is not available: a cloudmodal control plane has one environment, "
        f"{DEFAULT_ENVIRONMENT!r}. Run a control plane per environment and point CLOUDMODAL_SERVER_URL at the "
        f"one for {name!r}, then drop environment_name (or pass {DEFAULT_ENVIRONMENT!r})."
    )
