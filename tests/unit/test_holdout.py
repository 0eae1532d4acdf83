"""The fixed patient-level hold-out and the promotion rule (pure, plus SQLite for storage)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import at, fresh_sqlite_url, instance_rec, migrated_engine, register_all
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.worker.model_selection import PromotionRule, decide, in_holdout, pseudonym
from thyrocad.worker.retraining import _decide_holdout


def test_membership_is_a_stable_hash_of_the_key() -> None:
    keys = [f"PAT-{i}" for i in range(4000)]
    first = [in_holdout(k, 0.2) for k in keys]
    assert first == [in_holdout(k, 0.2) for k in keys]  # same answer every time
    share = sum(first) / len(keys)
    assert 0.17 < share < 0.23
    # A larger fraction only adds patients, never swaps them.
    assert all(in_holdout(k, 0.5) for k, inside in zip(keys, first, strict=True) if inside)
    assert not any(in_holdout(k, 0.0) for k in keys[:100])


def test_pinned_values() -> None:
    # sha256, not hash(): the same on every machine, process and Python version.
    # A change here would silently move patients between training and hold-out.
    assert [k for k in "ABCDEFGH" if in_holdout(k, 0.3)] == ["D", "E", "H"]
    assert pseudonym("PAT-1") == "P1605afcd00b77381"
    assert pseudonym("PAT-1") != pseudonym("PAT-2")


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with migrated_engine(fresh_sqlite_url(tmp_path)) as engine:
        yield make_session_factory(engine)


def test_decision_is_stored_once_and_never_changes(sessions: sessionmaker[Session]) -> None:
    keys = [f"H{i}" for i in range(30)]
    register_all(
        sessions, [instance_rec(f"9.{i}", study=f"1.2.{i}", patient=k) for i, k in enumerate(keys)]
    )
    with sessions.begin() as session:
        held = _decide_holdout(session, keys, 0.3, at(0))
    assert held == {k for k in keys if in_holdout(k, 0.3)}
    # A later refit with another fraction keeps every decided patient where it was.
    with sessions.begin() as session:
        assert _decide_holdout(session, keys, 0.9, at(10)) == held
        assert repo.decide_holdout(session, keys[0], keys[0] not in held) == (keys[0] in held)
    # A new patient is decided with the fraction in force when it first appears.
    register_all(sessions, [instance_rec("9.99", study="1.2.99", patient="NEW")])
    with sessions.begin() as session:
        again = _decide_holdout(session, [*keys, "NEW"], 0.9, at(20))
    assert again - held == ({"NEW"} if in_holdout("NEW", 0.9) else set())


def report(auc: float, sensitivity: float) -> dict[str, Any]:
    return {"patient": {"auc": {"value": auc}, "sensitivity": {"value": sensitivity}}}


RULE = PromotionRule(auc_tolerance=0.02, min_sensitivity=0.8)


def test_promoted_when_not_worse() -> None:
    decision = decide(report(0.90, 0.85), report(0.91, 0.9), RULE)
    assert decision.promote
    assert "0.900 vs active 0.910" in decision.reason


def test_worse_auc_is_not_promoted_with_the_reason() -> None:
    decision = decide(report(0.80, 0.95), report(0.90, 0.9), RULE)
    assert not decision.promote
    assert "patient AUC 0.800 is below the active model's 0.900" in decision.reason


def test_sensitivity_floor() -> None:
    decision = decide(report(0.99, 0.5), report(0.90, 0.9), RULE)
    assert not decision.promote
    assert "sensitivity 0.500 is below the floor 0.800" in decision.reason
    both = decide(report(0.5, 0.5), report(0.9, 0.9), RULE)
    assert both.reason.count(";") == 1  # both problems named


def test_nan_never_passes_and_no_active_model() -> None:
    assert not decide(report(math.nan, 0.9), report(0.9, 0.9), RULE).promote
    assert not decide(report(0.9, math.nan), report(0.9, 0.9), RULE).promote
    assert decide(report(0.7, 0.9), None, RULE).promote
    assert decide(report(0.7, 0.9), report(math.nan, 0.9), RULE).promote
