"""Instances by processing state, and C-STORE refusals by reason."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from thyrocad.db.schema import INSTANCE_STATES, Instance, Rejection


def instance_counts(session: Session) -> dict[str, int]:
    """Number of instances in each state; every state is present, zero or not."""
    counts = dict.fromkeys(INSTANCE_STATES, 0)
    for state, count in session.execute(
        select(Instance.state, func.count()).group_by(Instance.state)
    ).all():
        counts[state] = count
    return counts


def rejection_counts(session: Session) -> dict[str, int]:
    """Number of instances refused at C-STORE, by reason."""
    query = select(Rejection.reason, func.count()).group_by(Rejection.reason)
    return {reason: int(count) for reason, count in session.execute(query).tuples()}
