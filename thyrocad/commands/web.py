"""The radiologists' web page and its accounts.

::

    thyrocad web [--host H] [--port P]
    thyrocad users add NAME --role reader|labeller [--password-stdin]
    thyrocad users list
    thyrocad users disable NAME
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from typing import Annotated

import typer
from rich.table import Table

from thyrocad.commands.common import (
    State,
    console,
    ensure_schema,
    fail,
    read_sessions,
    say_database,
    sessions,
    settings,
)
from thyrocad.errors import PortInUse, UserError, database_name

logger = logging.getLogger(__name__)

app = typer.Typer()
users_app = typer.Typer(
    help="Who may sign in to the web page: 'users add NAME --role reader|labeller', "
    "'users list', 'users disable NAME'.",
    no_args_is_help=True,
)

ROLES = ("reader", "labeller")


@app.command()
def web(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on; overrides THYROCAD_WEB_HOST.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port; overrides THYROCAD_WEB_PORT.")] = None,
) -> None:
    """Serve the radiologists' web page (worklist, studies with evidence, labels, models)."""
    import uvicorn

    from thyrocad.web.app import create_app

    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a port: give 1 to 65535")
    s = settings()
    overrides = {k: v for k, v in (("web_host", host), ("web_port", port)) if v is not None}
    if overrides:
        s = State.settings = s.model_copy(update=overrides)
    _check_port_free(s.web_host, s.web_port)
    ensure_schema(s, service=True)
    application = create_app(s)
    shown_host = f"[{s.web_host}]" if ":" in s.web_host else s.web_host
    logger.info(
        "web page on http://%s:%d/ (database %s)",
        shown_host,
        s.web_port,
        database_name(s),
        extra={"host": s.web_host, "port": s.web_port},
    )
    # Our own line above says where; uvicorn's start-up chatter and access lines (raw
    # paths, client addresses) stay out. Requests are logged by route template instead.
    uvicorn.run(
        application,
        host=s.web_host,
        port=s.web_port,
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
    )


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is already in use by another process: stop it, "
                    "or choose another port with --port / THYROCAD_WEB_PORT"
                ) from exc
            if exc.errno == errno.EACCES:
                raise PortInUse(
                    f"not allowed to listen on port {port} (ports below 1024 need root): "
                    "choose another with --port / THYROCAD_WEB_PORT"
                ) from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortInUse(
                    f"{host} is not an address of this machine: fix --host / THYROCAD_WEB_HOST"
                ) from exc
            raise


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = typer.prompt("Password", hide_input=True, default="", show_default=False)
    if not first:
        return ""
    second = typer.prompt("Repeat the password", hide_input=True, default="", show_default=False)
    if first != second:
        raise fail("the two passwords differ: nothing changed")
    return first


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user name they sign in with.")],
    role: Annotated[
        str, typer.Option(help="reader (views) or labeller (views and records labels).")
    ],
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the password from the first line of stdin."),
    ] = False,
) -> None:
    """Add a user who may sign in to the web page (asks for the password twice)."""
    from thyrocad.db.errors import RepositoryError
    from thyrocad.db.repository import users
    from thyrocad.web.auth import PasswordRefused, Passwords, check_new_password

    if role not in ROLES:
        raise fail(f"unknown role {role!r}: choose reader or labeller")
    try:
        users.check_username(name)
    except RepositoryError as exc:
        raise fail(str(exc)) from exc
    s = settings()
    factory = sessions(s)
    with factory() as session:  # before the password is asked for: a taken name fails fast
        if any(u.username == name for u in users.list_users(session)):
            raise fail(f"a user named {name!r} exists already (see 'thyrocad users list')")
    password = _read_password(password_stdin)
    try:
        check_new_password(password)
    except PasswordRefused as exc:
        raise fail(f"{exc}: nothing changed") from exc
    try:
        with factory.begin() as session:
            user = users.create_user(session, name, Passwords().hash(password), role)
    except RepositoryError as exc:
        raise fail(str(exc)) from exc
    console.print(f"user [bold]{user.username}[/] added as {user.role}")


@users_app.command("list")
def users_list() -> None:
    """Every user of the web page: role, disabled, created, last sign-in."""
    from thyrocad.db.repository import users

    s = settings()
    with read_sessions(s)() as session:
        rows = users.list_users(session)
    say_database(s)
    if not rows:
        console.print("no users: add one with 'thyrocad users add NAME --role reader|labeller'")
        return
    table = Table("name", "role", "disabled", "created (UTC)", "last sign-in (UTC)")
    for u in rows:
        table.add_row(
            u.username,
            u.role,
            "yes" if u.disabled else "no",
            f"{u.created_at:%Y-%m-%d %H:%M}",
            f"{u.last_login_at:%Y-%m-%d %H:%M}" if u.last_login_at else "never",
        )
    console.print(table)


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="The user name.")]) -> None:
    """Disable a user: no more sign-ins, and an open session ends at its next request."""
    from thyrocad.db.errors import RepositoryError
    from thyrocad.db.repository import users

    s = settings()
    try:
        with sessions(s).begin() as session:
            user = users.disable_user(session, name)
    except RepositoryError as exc:
        raise fail(f"{exc} (see 'thyrocad users list')") from exc
    console.print(f"user [bold]{user.username}[/] disabled; their open sessions end now")
