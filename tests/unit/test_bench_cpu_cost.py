"""bench/bench_cpu_cost.py --smoke runs and prints every stage, the total and its ratios
(no timing is asserted: the figures depend on the machine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_cpu_cost.py"
STAGES = (
    "listener process (receive, parse, spool, register, queue)",
    "listener's spool reconciler, one pass",
    "worker: claim, decode, crop, grey, resize, store",
    "aggregation: finalise the studies",
    "TOTAL outside the model",
    "pynetdicom transport (listener's AE, no work)",
    "header parse + validation",
    "spool: SHA-256, write, fsync file + folder",
    "registration (batches of 64)",
    "Celery publish + mark queued",
    "reconciler pass, files another process wrote",
    "decode + crop + grey + resize",
    "baseline: pydicom dcmread + dcmwrite in memory",
)


# Starts the production listener on a throw-away PostgreSQL database and a private Redis,
# and sends with dcmtk's storescu, like the pipeline benchmarks.
@pytest.mark.slow
@pytest.mark.integration
def test_bench_cpu_cost_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5:
            rows[cells[0]] = cells
    for stage in STAGES:
        assert stage in rows, f"no row {stage!r} in:\n{done.stdout}"
        assert float(rows[stage][3]) > 0, rows[stage]  # CPU was counted for every stage
    assert any(line.startswith("machine:") for line in lines)
    assert re.fullmatch(r"ratio total CPU outside the model / target 8 ms: \d+\.\d\d x", lines[-2])
    assert re.fullmatch(
        r"ratio total CPU outside the model / bare dcmread \+ dcmwrite: \d+\.\d x", lines[-1]
    )
