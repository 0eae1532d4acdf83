"""The ``thyrocad`` command line: the one place that prints to the user (with rich).

Commands live in ``thyrocad.commands``, one module per concern; this module
assembles them and reads the global options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from thyrocad.commands import archive, learning, models, pipeline
from thyrocad.commands.common import State, fail
from thyrocad.logs import configure_logging
from thyrocad.settings import load_settings

app = typer.Typer(
    help="thyrocad: thyroid ultrasound classification beside a PACS.", no_args_is_help=True
)
for module in (models, pipeline, learning, archive):
    app.registered_commands += module.app.registered_commands
app.add_typer(models.models_app, name="models")
app.add_typer(pipeline.db_app, name="db")
app.add_typer(learning.label_app, name="label")


@app.callback()
def main_options(
    data_dir: Annotated[Path | None, typer.Option(help="Overrides THYROCAD_DATA_DIR.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        State.settings = load_settings(**overrides)
    except Exception as exc:  # pydantic's message names the bad variable
        raise fail(f"invalid settings: {exc}") from exc
    configure_logging("DEBUG" if verbose else State.settings.log_level, State.settings.log_json)


def main() -> None:
    # TensorFlow's C++ INFO lines (XLA start-up and the like) are noise for an operator;
    # its warnings and errors still show. An explicit setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    app()


if __name__ == "__main__":
    main()
