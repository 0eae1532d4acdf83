"""The benchmarks' smallest configurations run, so the scripts cannot rot (no timings asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "ratio_line", "last_line"),
    [
        ("bench_training.py", "speed-up, uncached extrapolated / cached:", "machine:"),
        ("bench_classifier.py", "ratio model.predict / direct:", "ratio Classifier.predict"),
    ],
)
def test_bench_smoke(script: str, ratio_line: str, last_line: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith(last_line), done.stdout
    assert any(line.startswith(ratio_line) and line.endswith("x") for line in lines)
