"""The ``thyrocad`` command line: the one place that prints to the user (with rich).

Commands live in ``thyrocad.commands``, one module per concern; this module
assembles them, reads the global options and holds the one error boundary:
an ordinary mistake (see :mod:`thyrocad.errors`) becomes one ``error:`` line,
with the traceback only under ``--debug`` or ``THYROCAD_LOG_LEVEL=DEBUG``.
"""

from __future__ import annotations

import os
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from thyrocad.commands import archive, audit, learning, models, pipeline, web
from thyrocad.commands.common import State, fail
from thyrocad.errors import explain, settings_message
from thyrocad.logs import configure_logging, quiet_native_imports
from thyrocad.settings import load_settings


def _debugging() -> bool:
    level = State.settings.log_level if State.settings else os.environ.get("THYROCAD_LOG_LEVEL")
    return State.debug or (level or "").upper() == "DEBUG"


def _is_bool(param: Any) -> bool:
    return getattr(getattr(param, "type_descriptor", None), "annotation", None) is bool


def _no_flag_metavars(command: Any) -> None:
    """Help shows ``--json`` rather than ``--json <bool>``: a flag takes no value."""
    for param in command.params:
        if (getattr(param, "is_flag", False) or _is_bool(param)) and param.metavar is None:
            param.metavar = ""
    make_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:  # --help is made when help is asked for
        option = make_help_option(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _no_flag_metavars(sub)


class ErrorBoundary(TyperGroup):
    """Runs every command; a known mistake is answered in one line, a bug keeps its
    traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _no_flag_metavars(self)

    def get_params(self, ctx: Any) -> Any:
        params = super().get_params(ctx)  # now with typer's completion options
        for param in params:
            if getattr(param, "is_flag", False) or param.metavar is None and _is_bool(param):
                param.metavar = ""
        return params

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = explain(exc, State.settings)
            if message is None or _debugging():
                raise
            raise fail(message) from exc


app = typer.Typer(
    cls=ErrorBoundary,
    help="thyrocad: thyroid ultrasound classification beside a PACS.",
    no_args_is_help=True,
    # Locals can hold a database URL with its password.
    pretty_exceptions_show_locals=False,
)
for module in (models, pipeline, learning, archive, audit, web):
    app.registered_commands += module.app.registered_commands
app.add_typer(models.models_app, name="models")
app.add_typer(pipeline.db_app, name="db")
app.add_typer(learning.label_app, name="label")
app.add_typer(web.users_app, name="users")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"thyrocad {package_version('thyrocad')}")
        raise typer.Exit()


@app.callback()
def main_options(
    data_dir: Annotated[Path | None, typer.Option(help="Overrides THYROCAD_DATA_DIR.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG.")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error, and log at DEBUG.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    from pydantic import ValidationError

    State.debug = debug
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        State.settings = load_settings(**overrides)
    except ValidationError as exc:
        if _debugging():
            raise
        raise fail(settings_message(exc)) from exc
    configure_logging(
        "DEBUG" if verbose or debug else State.settings.log_level,
        State.settings.log_json,
        local_broker=State.settings.broker_url.startswith("filesystem://"),
    )
    if State.settings.audit_syslog:
        from thyrocad.audit_log import configure_audit_syslog  # loads the database layer

        configure_audit_syslog(State.settings.audit_syslog)


def main() -> None:
    # TensorFlow's C++ INFO lines (XLA start-up and the like) are noise for an operator;
    # its warnings and errors still show. An explicit setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    quiet_native_imports()  # TensorFlow 2.21 prints its start-up notes past that setting
    app()


if __name__ == "__main__":
    main()
