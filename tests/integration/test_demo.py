"""``thyrocad demo`` end to end, as a user runs it with stdout not a terminal.

It trains a quick model, runs the embedded pipeline with its web page, prints the
results, then the page's address with a demo login and the command that serves the
page again, and exits 0. The login it printed signs in to the page that command
serves (that a rerun prints the same login: tests/unit/test_cli_demo.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.procs import ROOT, free_port, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADDRESS = re.compile(r"^Web page: (http://127\.0\.0\.1:(\d+)/)  — sign in as (\S+) / (\S+)$")
AGAIN = "To serve the web page again over the same data: "


def run_demo(env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "thyrocad", "demo", "--patients", "2"]
        + ["--train-patients", "8", "--input-size", "64", "--epochs", "2", "--timeout", "300"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout.strip().splitlines()


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_demo_ends_with_a_web_login_that_works(tmp_path: Path) -> None:
    web_port = free_port()
    env = {
        **os.environ,
        "THYROCAD_DATA_DIR": str(tmp_path / "demo"),
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
        "THYROCAD_PORT": str(free_port()),
        "THYROCAD_WEB_PORT": str(web_port),
    }
    lines = run_demo(env)
    assert "patients classified correctly" in lines[-3], lines
    found = ADDRESS.match(lines[-2])
    assert found, lines[-2:]
    url, port, username, password = found.groups()
    assert int(port) == web_port and username == "demo"
    assert lines[-1].startswith(AGAIN), lines[-1]
    command = lines[-1][len(AGAIN) :]
    assert f"THYROCAD_DATA_DIR={shlex.quote(str(tmp_path / 'demo'))}" in command

    # The command it printed, run as printed, serves the page; the login signs in.
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        # bash runs a lone simple command in its own process: stopping it stops the page.
        web = subprocess.Popen(["bash", "-c", command], env=env, stdout=out, stderr=out)
    try:
        wait_for(
            lambda: answers(url),
            60,
            lambda: f"{url}healthz after {command!r}:\n{log.read_text(errors='replace')}",
        )
        with httpx.Client(base_url=url, timeout=10) as client:
            wrong = client.post("/login", data={"username": username, "password": "x" + password})
            assert wrong.status_code == 401
            signed = client.post("/login", data={"username": username, "password": password})
            assert signed.status_code in (302, 303), signed.text[:300]
            assert signed.headers["location"] in ("/", f"{url}")
            worklist = client.get("/")
            assert worklist.status_code == 200 and 'id="worklist"' in worklist.text
            assert "demo" in worklist.text and "labeller" in worklist.text.lower()
            # Both demo studies are listed.
            assert worklist.text.count("data-study-id=") == 2
    finally:
        stop(web)
