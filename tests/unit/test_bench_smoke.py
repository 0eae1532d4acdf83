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
        ("bench_evidence.py", "ratio predict + Grad-CAM / predict alone:", "ratio predict"),
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


# The pipeline benchmarks start the real processes: they need PostgreSQL (THYROCAD_TEST_PG),
# redis-server and dcmtk, like the integration tests (bench_association: dcmtk only).
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    ("script", "ratio_line"),
    [
        ("bench_e2e.py", "ratio end to end / bare model,"),
        ("bench_ingest.py", "ratio thyrocad ingest / VGG-19 inference rate"),
        ("bench_study_latency.py", "ratio p95 latency / idle time,"),
        ("bench_memory.py", "ratio listener RSS after"),
        ("bench_association.py", "ratio instances/s, thyrocad / as shipped"),
        ("bench_recovery.py", "ratio settle time, worst fault"),
    ],
)
def test_pipeline_bench_smoke(script: str, ratio_line: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    # The table, then the machine, then the ratios last.
    assert any(line.startswith("| ") for line in lines), done.stdout
    assert any(line.startswith("machine:") for line in lines), done.stdout
    assert lines[-1].startswith(ratio_line) and lines[-1].endswith("x"), done.stdout
