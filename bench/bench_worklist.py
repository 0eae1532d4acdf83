"""The web page's worklist queries at 100,000 studies, against a plain LIMIT of the table.

Seeds a throw-away PostgreSQL database (from ``THYROCAD_TEST_PG``) through the real
migrations, then with COPY: patients with one to three studies, one result revision per
study (a fifth have a second, under a newer model version), 2 % without a usable image,
15 % of studies labelled (and some patients), an SR sent for half of the latest
results. Then times the page's queries as the page runs them (``db.repository.worklist``,
each its median over the repeats, after one warm-up): the first page, a filtered page,
a page 90 % of the way down, the page before it, the count with and without filters, and
one study's page. The baseline, in the same run, is ``SELECT … FROM study_results
ORDER BY id DESC LIMIT 50``: the cheapest way to list 50 results at all.

    python bench/bench_worklist.py              # 100,000 studies
    python bench/bench_worklist.py --smoke      # 1,000 studies, a few repeats
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine, median, percentile, postgres_database, table  # noqa: E402

CLASSES = ("autoimmune", "normal")
VERSIONS = ("vgg19-2026-01", "vgg19-2026-02", "inception_v3-2026-03")
PAGE = 50
TARGET_MS = 100.0
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _copy(connection: Any, table_name: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    buffer.seek(0)
    with connection.cursor() as cursor:
        cursor.copy_expert(
            f"COPY {table_name} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '')",
            buffer,
        )


def seed(url: str, studies: int, seed_value: int = 7) -> dict[str, int]:
    """Fill a migrated database with ``studies`` studies and what hangs on them."""
    import sqlalchemy as sa

    rng = random.Random(seed_value)
    engine = sa.create_engine(url)
    counts: dict[str, int] = {}
    raw = engine.raw_connection()
    try:
        when = T0.isoformat()
        _copy(
            raw,
            "model_versions",
            (
                "version",
                "architecture",
                "classes",
                "input_size",
                "artifact_path",
                "metrics",
                "status",
                "created_at",
            ),
            [
                (
                    v,
                    v.split("-")[0],
                    json.dumps(list(CLASSES)),
                    224,
                    f"/models/{v}/model.keras",
                    "{}",
                    "active" if i == len(VERSIONS) - 1 else "retired",
                    (T0 + timedelta(days=30 * i)).isoformat(),
                )
                for i, v in enumerate(VERSIONS)
            ],
        )
        patients: list[tuple] = []
        study_rows: list[tuple] = []
        while len(study_rows) < studies:
            pid = len(patients) + 1
            patients.append(
                (f"P{pid:07d}", f"Family{pid}^Given{pid % 97}", "1970-01-01", "F", when)
            )
            for _ in range(min(rng.choice((1, 1, 2, 3)), studies - len(study_rows))):
                sid = len(study_rows) + 1
                day = date(2021, 1, 1) + timedelta(days=rng.randrange(5 * 365))
                received = (T0 + timedelta(seconds=sid * 30)).isoformat()
                study_rows.append(
                    (
                        f"2.25.{10**12 + sid}",
                        pid,
                        day.isoformat(),
                        f"A{sid:08d}",
                        received,
                        received,
                    )
                )
        _copy(
            raw,
            "patients",
            ("patient_key", "patient_name", "birth_date", "sex", "created_at"),
            patients,
        )
        _copy(
            raw,
            "studies",
            (
                "study_instance_uid",
                "patient_id",
                "study_date",
                "accession_number",
                "first_received_at",
                "last_received_at",
            ),
            study_rows,
        )
        results: list[tuple] = []
        second: list[tuple] = []
        for sid in range(1, studies + 1):
            created = T0 + timedelta(seconds=sid * 30 + 60)
            results.append(_result(rng, sid, 1, VERSIONS[sid % 2], created))
            if rng.random() < 0.2:
                second.append((sid, created + timedelta(days=60)))
        # Second revisions come later (a rescore): their ids are the newest.
        results += [_result(rng, sid, 2, VERSIONS[2], at) for sid, at in second]
        _copy(
            raw,
            "study_results",
            (
                "study_id",
                "model_version",
                "rule",
                "label",
                "probability",
                "probabilities",
                "image_count",
                "revision",
                "created_at",
                "reason",
            ),
            results,
        )
        latest_ids: dict[int, int] = {}
        for result_id, row in enumerate(results, start=1):
            latest_ids[row[0]] = result_id  # the later row of a study wins
        labels = []
        for sid in range(1, studies + 1):
            if rng.random() < 0.15:
                labels.append((sid, None, rng.choice(CLASSES), "dr-bench", "web", None, when))
        for pid in range(1, len(patients) + 1, 40):
            labels.append((None, pid, rng.choice(CLASSES), "dr-bench", "cli", None, when))
        _copy(
            raw,
            "labels",
            ("study_id", "patient_id", "diagnosis", "labelled_by", "source", "note", "created_at"),
            labels,
        )
        dispatches = [
            (rid, "PACS@pacs:104", f"2.25.{2 * 10**12 + rid}", "sent", 0, when)
            for sid, rid in latest_ids.items()
            if sid % 2 == 0
        ]
        _copy(
            raw,
            "sr_dispatches",
            (
                "study_result_id",
                "destination",
                "sop_instance_uid",
                "status",
                "dimse_status",
                "sent_at",
            ),
            dispatches,
        )
        raw.commit()
        raw.driver_connection.autocommit = True  # VACUUM runs outside a transaction
        with raw.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
        counts = {
            "patients": len(patients),
            "studies": studies,
            "results": len(results),
            "labels": len(labels),
            "sr_dispatches": len(dispatches),
        }
    finally:
        raw.close()
        engine.dispose()
    return counts


def _result(rng: random.Random, sid: int, revision: int, version: str, at: datetime) -> tuple:
    if rng.random() < 0.02:
        return (
            sid,
            version,
            "mean",
            None,
            None,
            "{}",
            0,
            revision,
            at.isoformat(),
            "no usable images",
        )
    p = rng.random()
    probabilities = json.dumps({CLASSES[0]: p, CLASSES[1]: 1 - p})
    label = CLASSES[0] if p >= 0.5 else CLASSES[1]
    return (
        sid,
        version,
        "mean",
        label,
        p,
        probabilities,
        rng.randint(1, 8),
        revision,
        at.isoformat(),
        None,
    )


def timed(function: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median and p95 milliseconds of ``function`` over ``repeats`` calls after a warm-up."""
    answer = function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = function()
        samples.append((time.perf_counter() - started) * 1000)
    return median(samples), percentile(samples, 95), answer


def run(studies: int, repeats: int) -> int:
    import sqlalchemy as sa

    from thyrocad.db.engine import make_session_factory, upgrade
    from thyrocad.db.repository import worklist
    from thyrocad.web.reading import web_engine

    with postgres_database() as url:
        upgrade(url)
        started = time.perf_counter()
        counts = seed(url, studies)
        seeded_s = time.perf_counter() - started
        engine = web_engine(url)  # as the page connects
        sessions = make_session_factory(engine)
        rows: list[list[object]] = []
        try:
            with sessions() as session:
                total = worklist.worklist_count(session)
                deep_after = session.execute(
                    sa.text(
                        "SELECT id FROM study_results r WHERE NOT EXISTS (SELECT 1 FROM "
                        "study_results n WHERE n.study_id = r.study_id AND n.revision > "
                        "r.revision) ORDER BY id DESC OFFSET :skip LIMIT 1"
                    ),
                    {"skip": int(total * 0.9)},
                ).scalar_one()
                filtered = worklist.WorklistFilters(
                    date_from=date(2024, 1, 1),
                    date_to=date(2024, 12, 31),
                    finding=CLASSES[0],
                    labelled=False,
                )
                one_day = worklist.WorklistFilters(
                    date_from=date(2024, 5, 5), date_to=date(2024, 5, 5)
                )
                one_study = session.execute(sa.text("SELECT max(id) FROM studies")).scalar_one()

                def baseline() -> Any:
                    return session.execute(
                        sa.text(
                            "SELECT id, study_id, model_version, label, probability, revision, "
                            "created_at FROM study_results ORDER BY id DESC LIMIT :n"
                        ),
                        {"n": PAGE},
                    ).all()

                cases: list[tuple[str, Callable[[], Any]]] = [
                    ("baseline: SELECT … FROM study_results ORDER BY id DESC LIMIT 50", baseline),
                    ("worklist, first page", lambda: worklist.worklist_page(session, limit=PAGE)),
                    (
                        "worklist, filtered page (2024, autoimmune, unlabelled)",
                        lambda: worklist.worklist_page(session, filtered, limit=PAGE),
                    ),
                    (
                        "worklist, page 90 % down (keyset)",
                        lambda: worklist.worklist_page(session, limit=PAGE, older_than=deep_after),
                    ),
                    (
                        "worklist, the page before that one",
                        lambda: worklist.worklist_page(session, limit=PAGE, newer_than=deep_after),
                    ),
                    (
                        "worklist count as the page counts (to 1,000), no filter",
                        lambda: worklist.worklist_count(session, cap=worklist.COUNT_CAP),
                    ),
                    (
                        "worklist count as the page counts (to 1,000), filtered",
                        lambda: worklist.worklist_count(session, filtered, cap=worklist.COUNT_CAP),
                    ),
                    (
                        "worklist, one study day (page)",
                        lambda: worklist.worklist_page(session, one_day, limit=PAGE),
                    ),
                    (
                        "worklist, one study day (count)",
                        lambda: worklist.worklist_count(session, one_day, cap=worklist.COUNT_CAP),
                    ),
                    (
                        "filter by model version, first page",
                        lambda: worklist.worklist_page(
                            session, worklist.WorklistFilters(model_version=VERSIONS[0]), limit=PAGE
                        ),
                    ),
                    ("study page (one study)", lambda: worklist.study_page(session, one_study)),
                    (
                        "(not a page query) exact count, no filter",
                        lambda: worklist.worklist_count(session),
                    ),
                    (
                        "(not a page query) exact count, filtered",
                        lambda: worklist.worklist_count(session, filtered),
                    ),
                ]
                measured: dict[str, float] = {}
                for name, function in cases:
                    med, p95, answer = timed(function, repeats)
                    measured[name] = med
                    size = (
                        len(answer.rows)
                        if isinstance(answer, worklist.WorklistPage)
                        else (
                            answer
                            if isinstance(answer, int)
                            else len(answer or [])
                            if isinstance(answer, list)
                            else 1
                        )
                    )
                    verdict = (
                        "" if name.startswith("baseline") else ("yes" if p95 < TARGET_MS else "NO")
                    )
                    rows.append([name, med, p95, size, verdict])
        finally:
            engine.dispose()
    print(
        f"seeded {counts['studies']:,} studies of {counts['patients']:,} patients, "
        f"{counts['results']:,} result revisions, {counts['labels']:,} labels, "
        f"{counts['sr_dispatches']:,} SR dispatches in {seeded_s:.1f} s; {repeats} repeats each"
    )
    print(
        table(["query", "median ms", "p95 ms", "rows / count", f"p95 < {TARGET_MS:.0f} ms"], rows)
    )
    print(machine())
    base = measured[cases[0][0]]
    slowest = max((v, k) for k, v in measured.items() if not k.startswith(("baseline", "(not")))
    print(f"slowest page query: {slowest[1]} at {slowest[0]:.1f} ms median")
    print(
        f"ratio worklist first page / plain LIMIT of study_results, {studies:,} studies: "
        f"{measured[cases[1][0]] / base:.2f} x"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1,000 studies, 3 repeats")
    args = parser.parse_args()
    if args.smoke:
        return run(1_000, 3)
    return run(args.studies, args.repeats)


if __name__ == "__main__":
    raise SystemExit(main())
