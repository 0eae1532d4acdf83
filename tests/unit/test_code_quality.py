"""House style holds: ruff (lint and format) and mypy on the four packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_lint_and_format() -> None:
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout[-3000:]


def installed_layout(where: Path) -> Path:
    """A tree of links laid out as the package installs (``thyrocad/pacs`` -> ``pacs/``):
    mypy resolves ``thyrocad.pacs`` through folders, not through the editable install's
    package-dir mapping."""
    package = where / "thyrocad"
    package.mkdir()
    for entry in (ROOT / "thyrocad").iterdir():
        (package / entry.name).symlink_to(entry)
    for part in ("pacs", "worker", "models", "db"):
        (package / part).symlink_to(ROOT / part)
    return where


def test_mypy_on_the_packages(tmp_path: Path) -> None:
    tree = installed_layout(tmp_path)
    config = ["--config-file", str(ROOT / "pyproject.toml")]
    typed = subprocess.run(
        [sys.executable, "-m", "mypy", *config, "--cache-dir", "/tmp/thyrocad-mypy-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typed.returncode == 0, typed.stdout[-3000:]
    assert "no issues found in" in typed.stdout
