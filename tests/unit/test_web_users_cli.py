"""thyrocad users add/list/disable on the embedded SQLite database."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from thyrocad.cli import app


@pytest.fixture
def run(tmp_path: Path) -> Iterator[object]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    env = {"THYROCAD_DATA_DIR": str(tmp_path), "DATABASE_URL": "", "CELERY_BROKER_URL": ""}

    def invoke(*args: str, given: str | None = None) -> object:
        return CliRunner().invoke(app, list(args), input=given, env=env)

    yield invoke
    root.handlers[:] = handlers
    root.setLevel(level)


def test_add_asks_twice_then_lists_and_disables(run) -> None:
    added = run("users", "add", "alice", "--role", "labeller", given="long enough\nlong enough\n")
    assert added.exit_code == 0, added.output
    assert "user alice added as labeller" in added.output
    assert "long enough" not in added.output  # the password is not echoed
    piped = run("users", "add", "bob", "--role", "reader", "--password-stdin", given="pw-of-bob!\n")
    assert piped.exit_code == 0, piped.output
    listed = run("users", "list")
    assert listed.exit_code == 0
    lines = [line for line in listed.output.splitlines() if "alice" in line or "bob" in line]
    assert "labeller" in lines[0] and "never" in lines[0] and "reader" in lines[1]
    disabled = run("users", "disable", "bob")
    assert disabled.exit_code == 0 and "bob disabled" in disabled.output
    assert "yes" in [line for line in run("users", "list").output.splitlines() if "bob" in line][0]


@pytest.mark.parametrize(
    ("args", "given", "message"),
    [
        (("alice", "--role", "reader"), "one password\nanother one\n", "the two passwords differ"),
        (("alice", "--role", "reader", "--password-stdin"), "short\n", "too weak"),
        (("alice", "--role", "reader", "--password-stdin"), "\n", "the password is empty"),
        (("alice", "--role", "admin", "--password-stdin"), "long enough\n", "unknown role 'admin'"),
        (("al ice", "--role", "reader", "--password-stdin"), "long enough\n", "is not a user name"),
    ],
)
def test_add_refuses_clearly(run, args, given, message) -> None:
    done = run("users", "add", *args, given=given)
    assert done.exit_code == 1
    assert message in done.output
    assert "Traceback" not in done.output
    assert "alice" not in run("users", "list").output.split("database:")[0]


def test_duplicate_and_unknown_users_are_errors(run) -> None:
    assert (
        run(
            "users", "add", "alice", "--role", "reader", "--password-stdin", given="a-password\n"
        ).exit_code
        == 0
    )
    again = run(
        "users", "add", "alice", "--role", "labeller", "--password-stdin", given="b-password\n"
    )
    assert again.exit_code == 1 and "a user named 'alice' exists already" in again.output
    missing = run("users", "disable", "nobody")
    assert missing.exit_code == 1 and "no user named 'nobody'" in missing.output
