"""The command line in-process (typer's runner) on an embedded SQLite database:
``--version``, help texts, ``results`` for a radiologist, read commands that create nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.db_fixtures import at, instance_rec, model_rec
from thyrocad.cli import app
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_engine, make_session_factory, upgrade

# DICOM UIDs are at most 64 characters: the reader must see all of them.
STUDY_A = "1.2.826.0.1.3680043.8.498.10203040506070809010203040506070809011"
STUDY_B = "1.2.826.0.1.3680043.8.498.99887766554433221100998877665544332211"
assert len(STUDY_A) == len(STUDY_B) == 64


def run(*args: str, data_dir: Path, **env: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(
        app,
        list(args),
        env={"THYROCAD_DATA_DIR": str(data_dir), "DATABASE_URL": "", **env},
        catch_exceptions=False,
    )
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def results_db(tmp_path: Path) -> Path:
    """A data folder whose SQLite database holds one patient with two study results."""
    url = f"sqlite:///{tmp_path / 'thyrocad.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        repo.upsert_model_version(session, model_rec("vgg19-20250301-1"))
        for n, (study, accession) in enumerate(((STUDY_A, "ACC-7781"), (STUDY_B, ""))):
            repo.register_instance(
                session,
                instance_rec(f"{study[:50]}.{n}", study=study, accession_number=accession or None),
                now=at(n),
            )
    from sqlalchemy import select

    from thyrocad.db.schema import Patient, Study

    with sessions.begin() as session:
        ids = dict(session.execute(select(Study.study_instance_uid, Study.id)).all())
        for uid, p_normal in ((STUDY_A, 0.18), (STUDY_B, 0.61)):
            label = "normal" if p_normal >= 0.5 else "thyroiditis"
            repo.save_study_result(
                session,
                study_id=ids[uid],
                model_version="vgg19-20250301-1",
                rule="mean",
                label=label,
                probability=1 - p_normal,
                probabilities={"normal": p_normal, "thyroiditis": 1 - p_normal},
                image_count=5,
                now=at(10),
            )
        patient_id = session.execute(select(Patient.id)).scalar_one()
        repo.save_patient_result(
            session,
            patient_id=patient_id,
            model_version="vgg19-20250301-1",
            rule="mean",
            label="thyroiditis",
            probability=0.715,
            probabilities={"normal": 0.285, "thyroiditis": 0.715},
            image_count=10,
            study_count=2,
            now=at(11),
        )
    engine.dispose()
    return tmp_path


CLASSES = {"THYROCAD_CLASSES": "normal,thyroiditis", "THYROCAD_POSITIVE_CLASS": "thyroiditis"}


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    code, out, _ = run("--version", data_dir=tmp_path)
    assert code == 0 and out.strip() == f"thyrocad {version('thyrocad')}"


def test_results_fit_100_columns_with_whole_uids_and_the_shown_class_probability(
    results_db: Path,
) -> None:
    code, out, err = run("results", data_dir=results_db, COLUMNS="80", **CLASSES)
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100, out
    assert any(line.strip() == STUDY_A for line in lines), out  # whole, on its own line
    assert any(line.strip() == STUDY_B for line in lines), out
    assert "study 2025-02-28, acc ACC-7781" in out and "no accession" in out
    # The probability shown is that of the diagnosis shown, not of the positive class.
    assert re.search(r"patient PAT-1\s+thyroiditis\s+0\.715\s+10", out), out
    assert re.search(r"normal\s+0\.610\s+5", out), out
    assert re.search(r"thyroiditis\s+0\.820\s+5", out), out
    assert f"database: {results_db / 'thyrocad.sqlite'}" in err


def test_results_wide_and_json_show_every_class(results_db: Path) -> None:
    code, out, _ = run("results", "--wide", data_dir=results_db, **CLASSES)
    assert code == 0
    assert "P(normal)" in out and "P(thyroiditis)" in out and "vgg19-20250301-1" in out
    assert STUDY_A in out and "ACC-7781" in out
    code, out, err = run("results", "--json", data_dir=results_db, **CLASSES)
    data = json.loads(out)
    study = next(r for r in data if r["key"] == STUDY_A)
    assert study["accession_number"] == "ACC-7781" and study["study_date"] == "2025-02-28"
    assert study["probabilities"] == pytest.approx({"normal": 0.18, "thyroiditis": 0.82})
    assert "database:" in err  # on stderr: stdout stays plain JSON


def test_results_say_when_there_are_none(tmp_path: Path) -> None:
    upgrade(f"sqlite:///{tmp_path / 'thyrocad.sqlite'}")
    code, out, _ = run("results", data_dir=tmp_path)
    assert code == 0 and out.strip() == "no results yet"
    code, out, _ = run("results", "--study", "1.2.3", data_dir=tmp_path)
    assert out.strip() == "no results yet for that patient or study"


@pytest.mark.parametrize(
    "args",
    [["results"], ["status"], ["label", "history"], ["training-runs"], ["models", "list"]],
)
def test_read_commands_create_no_database(tmp_path: Path, args: list[str]) -> None:
    data_dir = tmp_path / "nothing-here"
    code, out, err = run(*args, data_dir=data_dir)
    assert code == 1 and not out
    assert err.startswith("error: no ") and str(data_dir) in err and len(err.splitlines()) == 1
    assert ("thyrocad db upgrade" in err) or ("thyrocad train" in err)
    assert not data_dir.exists()


def test_read_commands_say_which_database_they_read(tmp_path: Path) -> None:
    upgrade(f"sqlite:///{tmp_path / 'thyrocad.sqlite'}")
    for args in (["status"], ["label", "history"], ["training-runs"]):
        code, _, err = run(*args, data_dir=tmp_path)
        assert code == 0 and f"database: {tmp_path / 'thyrocad.sqlite'}" in err, (args, err)
    code, out, _ = run("status", "--json", data_dir=tmp_path)
    assert str(tmp_path / "thyrocad.sqlite") in json.loads(out)["database"]


def test_help_texts(tmp_path: Path) -> None:
    _, out, _ = run("models", "--help", data_dir=tmp_path)
    assert "rollback" in out.split("Commands")[0]  # the group's own help names it
    _, out, _ = run("serve", "--help", data_dir=tmp_path)
    assert "--host" in out and "--port" in out and "THYROCAD_PORT" in out
    for command in (["serve"], ["retrain"], ["results"], ["rescore"]):
        _, out, _ = run(*command, "--help", data_dir=tmp_path)
        assert "<bool>" not in out and "BOOLEAN" not in out, (command, out)
    _, out, _ = run("label", "import", "--help", data_dir=tmp_path)
    assert "see below" not in out and "diagnosis" in out
