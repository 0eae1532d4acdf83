"""Fixtures for integration tests: real PostgreSQL, Redis, DICOM peers and processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.db_fixtures import fresh_postgres_url, postgres_unavailable_reason
from tests.procs import ROOT


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database, dropped after the test."""
    problem = postgres_unavailable_reason()
    if problem:
        pytest.fail(f"PostgreSQL is required for integration tests: {problem}")
    with fresh_postgres_url() as url:
        yield url


def cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m thyrocad`` to completion and return its output."""
    result = subprocess.run(
        [sys.executable, "-m", "thyrocad", *args],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"thyrocad {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real, tiny VGG-19 version (32 px, random base, 2 epochs) in a registry folder."""
    root = tmp_path_factory.mktemp("tiny-model")
    env = {"THYROCAD_DATA_DIR": str(root)}
    cli(
        "synth",
        "--out",
        str(root / "train"),
        "--patients",
        "8",
        "--size",
        "64",
        "--seed",
        "5",
        env=env,
    )
    out = cli(
        "train",
        "--data",
        str(root / "train"),
        "--arch",
        "vgg19",
        "--epochs",
        "2",
        "--input-size",
        "32",
        "--weights",
        "none",
        "--batch-size",
        "8",
        env=env,
    )
    version = out.stdout.strip().splitlines()[-1].strip()
    assert (root / "models" / version / "metadata.json").exists(), out.stdout
    return root / "models", version
