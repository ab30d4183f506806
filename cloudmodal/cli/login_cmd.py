"""`cloudmodal login URL` and `cloudmodal profile list|activate|remove`: use a team's control plane.

``login`` is ``modal token set``'s counterpart: it checks the server's TLS certificate (a certificate from a
CA the system trusts needs nothing more; a self-signed one is pinned: ``--fingerprint``, or shown and trusted
on first use), checks the token with an authenticated request, then stores a profile (URL, token, pinned
fingerprint) in ``<CLOUDMODAL_HOME>/profiles.json`` (0600) and makes it the active one. See
:mod:`cloudmodal.profiles` and :mod:`cloudmodal.tls`.
"""

from __future__ import annotations

import re
import sys
from urllib.parse import urlsplit

import typer

from cloudmodal.cli.errors import fail, user_errors
from cloudmodal.cli.tables import WIDE_HELP, Column, print_table

profile_app = typer.Typer(help="List, switch and remove `cloudmodal login` profiles.", no_args_is_help=True)

PROFILE_COLUMNS = (
    Column("Active"),
    Column("Name"),
    Column("URL", keep=1),
    Column("TLS", keep=2, shrink=True),
    Column("Token", keep=3),
)


def _check_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise typer.BadParameter(
            f"{url!r} is not a control plane URL: e.g. https://cp.example.com:8765", param_hint="'URL'"
        )
    if parts.query or parts.fragment:
        raise typer.BadParameter(f"{url!r}: no query or fragment, please.", param_hint="'URL'")
    return url.strip().rstrip("/")


def _default_name(url: str) -> str:
    host = urlsplit(url).hostname or "default"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", host).strip("-.") or "default"
    return name[:64]


def _read_token(token: str | None) -> str:
    if token == "-" or (token is None and not sys.stdin.isatty()):
        value = sys.stdin.readline().strip()
    elif token is None:
        value = typer.prompt("Token (input hidden)", hide_input=True).strip()
    else:
        value = token.strip()
    if not value:
        fail(
            "No token given: type it at the prompt, pipe it on stdin (`... | cloudmodal login URL`), or pass "
            "--token. The control plane's owner makes one with `cloudmodal token create`.",
            2,
        )
    return value


def _trusted_fingerprint(url: str, fingerprint: str | None, yes: bool) -> str | None:
    """The fingerprint to pin for ``url`` (None: the system's CAs verify its certificate)."""
    from cloudmodal import tls

    presented = tls.probe(url)
    where = f"{urlsplit(url).hostname}:{urlsplit(url).port or 443}"
    if fingerprint is not None:
        wanted = tls.normalize_fingerprint(fingerprint)
        if presented.fingerprint != wanted:
            fail(tls.mismatch_message(where, wanted, presented.fingerprint))
        typer.echo(f"The certificate matches the fingerprint {tls.display_fingerprint(wanted)}: pinned.")
        return wanted
    if presented.ca_verified:
        typer.echo("The control plane's certificate is verified by the system's certificate authorities.")
        return None
    shown = tls.display_fingerprint(presented.fingerprint)
    typer.echo(
        f"The control plane at {where} presents a certificate no trusted authority vouches for "
        f"({presented.ca_error}), as a self-signed one.\n"
        f"Its SHA-256 fingerprint is:\n  {shown}\n"
        "Compare it with the one `cloudmodal server status` prints on the control plane's machine (or "
        "`cloudmodal server start` printed): if it differs, someone is between you and the server.",
        err=True,
    )
    if yes:
        typer.echo("Trusting it (--yes).", err=True)
    elif sys.stdin.isatty():
        if not typer.confirm("Trust this certificate and pin it?", default=False, err=True):
            fail("Not trusted: nothing saved.")
    else:
        fail(
            "Not trusting an unverified certificate without a terminal to ask: pass --fingerprint "
            f"{presented.fingerprint} once you have compared it with the server's (`cloudmodal server "
            "status` on its machine), or --yes to trust whatever the server presents now.",
            2,
        )
    return presented.fingerprint


def login_command(
    url: str = typer.Argument(..., help="The control plane, e.g. https://cp.example.com:8765."),
    token: str | None = typer.Option(
        None,
        "--token",
        help="The token (`cloudmodal token create` on the server). '-' or omitted without a terminal: read "
        "from stdin; omitted on a terminal: prompted for. Prefer those: a value here shows in the process list.",
    ),
    fingerprint: str | None = typer.Option(
        None,
        "--fingerprint",
        help="The SHA-256 fingerprint (hex, colons optional) the server's certificate must have, as "
        "`cloudmodal server start`/`status` print it: pinned, with no question asked.",
    ),
    profile: str | None = typer.Option(
        None,
        "--profile",
        help="The profile's name (default: the URL's host name). An existing one is replaced.",
    ),
    yes: bool = typer.Option(
        False,
        "--yes",
        "-y",
        help="Trust and pin the certificate the server presents without asking (trust on first use).",
    ),
    activate: bool = typer.Option(
        True, "--activate/--no-activate", help="Make it the active profile (the first one always is)."
    ),
    allow_http: bool = typer.Option(
        False,
        "--allow-http",
        help="Accept a plain-HTTP URL beyond loopback (the token then travels in clear text).",
    ),
) -> None:
    """Log in to a control plane: check its certificate and the token, then store them as a profile that
    this account's CLI and clients use (`cloudmodal profile list`)."""
    from cloudmodal import profiles
    from cloudmodal.client.transport import Transport
    from cloudmodal.exception import AuthError, Error
    from cloudmodal.server.auth import is_loopback

    url = _check_url(url)
    with user_errors():
        name = profiles.check_name(profile) if profile is not None else _default_name(url)
        pin: str | None = None
        if url.startswith("https://"):
            pin = _trusted_fingerprint(url, fingerprint, yes)
        else:
            if fingerprint is not None:
                fail("--fingerprint pins a TLS certificate: the URL must be https://.", 2)
            if not is_loopback(urlsplit(url).hostname) and not allow_http:
                fail(
                    f"{url} is plain HTTP beyond loopback: the token would travel in clear text. Serve TLS "
                    "(`cloudmodal server start --tls`, the default beyond loopback) and use https://, or pass "
                    "--allow-http on a network you trust.",
                    2,
                )
        secret = _read_token(token)
        t = Transport(url, secret, fingerprint=pin, reconnect_timeout=5)
        try:
            t.get("/v1/apps", all=False)
        except AuthError as e:
            fail(f"The control plane at {url} refused this token ({e}): nothing saved.")
        except Error as e:
            fail(f"Could not check the token at {url}: {e}")
        finally:
            t.close()
        state = profiles.put(profiles.Profile(name, url, secret, pin), activate=activate)
    active = state.active == name
    typer.echo(
        f"Logged in to {url} as profile {name!r}"
        + (" (active)." if active else f" (not active: `cloudmodal profile activate {name}`).")
        + f" Saved in {profiles.path()}."
    )
    from cloudmodal.settings import settings

    if active and settings().server_url:
        typer.echo(
            "Note: CLOUDMODAL_SERVER_URL is set in this shell and takes precedence over profiles.", err=True
        )


@profile_app.command("list")
def list_profiles(wide: bool = typer.Option(False, "--wide", help=WIDE_HELP)) -> None:
    """The stored profiles (tokens are never shown)."""
    from cloudmodal import profiles
    from cloudmodal.tls import display_fingerprint

    with user_errors():
        state = profiles.load()
        chosen = profiles.selected_name() or state.active
    if not state.profiles:
        typer.echo("No profiles: `cloudmodal login URL` makes one.")
        return
    rows = []
    for name, p in sorted(state.profiles.items()):
        if p.fingerprint:
            how = f"pinned {display_fingerprint(p.fingerprint)}"
        elif p.url.startswith("https://"):
            how = "verified by CAs"
        else:
            how = "none (plain HTTP)"
        rows.append(["*" if name == chosen else "", name, p.url, how, "set" if p.token else "none"])
    print_table(PROFILE_COLUMNS, rows, wide=wide)


@profile_app.command("activate")
def activate_profile(
    name: str = typer.Argument(..., help="The profile (`cloudmodal profile list`)."),
) -> None:
    """Make NAME the profile this account's CLI and clients use (CLOUDMODAL_PROFILE overrides it)."""
    from cloudmodal import profiles

    with user_errors():
        p = profiles.activate(name)
    typer.echo(f"Profile {name!r} is active: {p.url}.")


@profile_app.command("remove")
def remove_profile(name: str = typer.Argument(..., help="The profile (`cloudmodal profile list`).")) -> None:
    """Forget NAME (its token stays valid on the server: `cloudmodal token revoke` ends it)."""
    from cloudmodal import profiles

    with user_errors():
        state = profiles.remove(name)
    typer.echo(
        f"Removed profile {name!r}."
        + ("" if state.active else " No profile is active now: `cloudmodal profile activate NAME`.")
    )
