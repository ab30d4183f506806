"""The ``cloudmodal`` command line."""

from __future__ import annotations

import typer

from cloudmodal.cli import (
    app_cmd,
    container_cmd,
    cost_cmd,
    dashboard_cmd,
    dict_cmd,
    infra_cmd,
    login_cmd,
    queue_cmd,
    run,
    sandbox_cmd,
    secret_cmd,
    serve,
    server_cmd,
    setup_cmd,
    token_cmd,
    volume_cmd,
)
from cloudmodal.cli import offers as _offers
from cloudmodal.cli import pricing as _pricing

app = typer.Typer(
    name="cloudmodal",
    help="Run Modal-style apps on your own cloud accounts (or this machine).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    run.run_command
)
app.command("deploy")(run.deploy_command)
app.command("serve")(serve.serve_command)
app.command("cost")(cost_cmd.cost_command)
app.command("dashboard")(dashboard_cmd.dashboard_command)
app.command("shell")(run.shell_command)
app.add_typer(server_cmd.app, name="server")
app.add_typer(app_cmd.app, name="app")
app.add_typer(token_cmd.app, name="token")
app.add_typer(secret_cmd.app, name="secret")
app.add_typer(volume_cmd.app, name="volume")
app.add_typer(dict_cmd.app, name="dict")
app.add_typer(queue_cmd.app, name="queue")
app.add_typer(sandbox_cmd.app, name="sandbox")
app.add_typer(infra_cmd.app, name="infra")
app.add_typer(container_cmd.app, name="container")
app.command("login")(login_cmd.login_command)
app.add_typer(login_cmd.profile_app, name="profile")
app.command("offers")(_offers.offers_command)
app.add_typer(_pricing.app, name="pricing")
app.command("setup")(setup_cmd.setup_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
