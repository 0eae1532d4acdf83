"""What every command module shares: consoles, settings, errors, progress, sessions."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from thyrocad.settings import Settings, load_settings

console = Console()
err = Console(stderr=True)


class State:
    """The settings of this invocation, set once by the app callback."""

    settings: Settings | None = None


def settings() -> Settings:
    if State.settings is None:
        State.settings = load_settings()
    return State.settings


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error and return the Exit to raise."""
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
    )


def ensure_schema(s: Settings) -> None:
    """The embedded default migrates itself; production runs 'thyrocad db upgrade'."""
    from db.engine import upgrade

    if not s.database_url:
        s.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(s.db_url)


def sessions(s: Settings) -> Any:
    """A session factory for the configured database (migrated first when embedded)."""
    from db.engine import make_engine, make_session_factory

    ensure_schema(s)
    return make_session_factory(make_engine(s.db_url))
