"""Every ordinary mistake gets one ``error:`` line from the real CLI, no traceback, exit
code 1; ``--debug`` shows the traceback. Real PostgreSQL, real sockets, loopback only."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import cli
from tests.procs import free_port

PG = "postgresql+psycopg2://postgres:pw-never-shown@127.0.0.1"


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A port some other process listens on."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


# (name, arguments, environment, what the line says); {taken} and {free} are ports.
CASES = [
    (
        "database unreachable",
        ["status"],
        {"DATABASE_URL": PG + ":{free}/thyrocad"},
        "error: cannot reach the database postgresql+psycopg2://postgres:***@127.0.0.1:",
    ),
    (
        "database missing",
        ["results"],
        {"DATABASE_URL": PG + ":5432/thyrocad_no_such_db"},
        "error: the database postgresql+psycopg2://postgres:***@127.0.0.1:5432/"
        "thyrocad_no_such_db (DATABASE_URL) does not exist",
    ),
    (
        "database URL not a URL",
        ["label", "history"],
        {"DATABASE_URL": "thyrocad-db"},
        "error: DATABASE_URL is not a database URL",
    ),
    (
        "write command, database unreachable",
        ["label", "--study", "1.2.3", "--diagnosis", "normal"],
        {"DATABASE_URL": PG + ":{free}/thyrocad"},
        "error: cannot reach the database",
    ),
    (
        "no embedded database",
        ["results"],
        {},
        "error: no database at {data}/thyrocad.sqlite",
    ),
    ("listening port in use", ["serve"], {"THYROCAD_PORT": "{taken}"}, "error: port {taken}"),
    ("--port in use", ["serve", "--embedded", "--port", "{taken}"], {}, "error: port {taken}"),
    (
        "metrics port in use",
        ["worker", "--pool", "solo", "--queues", "maintenance"],
        {"THYROCAD_METRICS_PORT": "{taken}"},
        "error: port {taken} on 127.0.0.1 is already in use",
    ),
    (
        "port out of range",
        ["serve"],
        {"THYROCAD_PORT": "99999"},
        "error: invalid settings: THYROCAD_PORT=99999: Input should be less than or equal",
    ),
    ("--port out of range", ["serve", "--port", "0"], {}, "error: --port 0 is not a port"),
    (
        "log level",
        ["status"],
        {"THYROCAD_LOG_LEVEL": "loud"},
        "error: invalid settings: THYROCAD_LOG_LEVEL=loud",
    ),
    (
        "send to a port out of range",
        ["send", "--to", "127.0.0.1:99999", "{data}"],
        {},
        "error: --to 127.0.0.1:99999: 99999 is not a port",
    ),
    (
        "unknown pool",
        ["worker", "--pool", "bogus"],
        {},
        "error: unknown pool 'bogus': --pool is one of prefork, solo, threads",
    ),
    (
        "unknown queue",
        ["worker", "--queues", "inference,bogus"],
        {},
        "error: unknown queue bogus: --queues takes a comma-separated list of inference, "
        "aggregation, training, maintenance",
    ),
    (
        "train: unknown architecture",
        ["train", "--data", "{data}", "--arch", "resnet"],
        {},
        "error: unknown --arch 'resnet': choose one of vgg19, inception_v3",
    ),
    (
        "train: no data folder",
        ["train", "--data", "{data}/missing"],
        {},
        "error: --data {data}/missing does not exist",
    ),
    (
        "train: input too small",
        ["train", "--data", "{data}", "--arch", "inception_v3", "--input-size", "64"],
        {},
        "error: --input-size 64 is too small: inception_v3 needs 75 or more",
    ),
]


def _run(tmp_path: Path, port: int, args: list[str], env: dict[str, str], debug: bool) -> Any:
    data = tmp_path / "data"
    if args[0] in ("send", "train"):
        data.mkdir()
    values = {"taken": port, "free": free_port(), "data": data}
    run_env = {
        "THYROCAD_DATA_DIR": str(data),
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
        **{k: v.format(**values) for k, v in env.items()},
    }
    argv = [a.format(**values) for a in args]
    result = cli(*(["--debug"] if debug else []), *argv, env=run_env, check=False)
    assert result.returncode == 1, result.stderr
    assert "pw-never-shown" not in result.stderr + result.stdout
    return result, values


@pytest.mark.parametrize(
    ("args", "env", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_an_ordinary_mistake_is_one_line(
    tmp_path: Path, taken_port: int, args: list[str], env: dict[str, str], expected: str
) -> None:
    result, values = _run(tmp_path, taken_port, args, env, debug=False)
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(expected.format(**values)), result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
    if args[0] in ("results", "status", "label"):
        assert not values["data"].exists()  # nothing created where the mistake was made


# One of each kind of answer: ours, a database's, a setting's, a socket's.
DEBUG_CASES = ("database unreachable", "no embedded database", "port out of range")
DEBUG_CASES += ("listening port in use", "unknown queue", "train: unknown architecture")


@pytest.mark.parametrize(
    ("args", "env"),
    [c[1:3] for c in CASES if c[0] in DEBUG_CASES],
    ids=[c[0] for c in CASES if c[0] in DEBUG_CASES],
)
def test_debug_shows_the_traceback(
    tmp_path: Path, taken_port: int, args: list[str], env: dict[str, str]
) -> None:
    result, _ = _run(tmp_path, taken_port, args, env, debug=True)
    assert "Traceback" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) > 5
