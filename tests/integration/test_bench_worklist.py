"""The worklist benchmark's smallest configuration runs, so the script cannot rot (no
timing is asserted); it needs PostgreSQL (THYROCAD_TEST_PG), like the integration tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_worklist_smoke() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_worklist.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("seeded 1,000 studies"), done.stdout
    # The table, then the machine, then the ratio last.
    rows = [line for line in lines if line.startswith("| worklist")]
    assert len(rows) >= 8, done.stdout
    # Every page query returned what it should have: full pages, capped counts.
    pages = [r for r in rows if r.startswith("| worklist, ") and "day" not in r]
    assert len(pages) == 4 and all(" 50 |" in r for r in pages), done.stdout
    assert any(line.startswith("machine:") for line in lines), done.stdout
    assert lines[-1].startswith("ratio worklist first page / plain LIMIT of study_results")
    assert lines[-1].endswith(" x"), done.stdout
