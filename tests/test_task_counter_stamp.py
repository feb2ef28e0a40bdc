"""Stored task counters are served as long as they were counted under the rules in force
(``counters_stamp``): a change to what ``counters_for`` gives that forgets to bump
``COUNTERS_RULES`` would leave every stored number counted the old way, served, until each
person's next change. This pins what the rules give, over every combination of status, role,
deadline, view and comments, to the stamp."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest

from server.tasks import rules
from server.tasks.rules import (
    EXPIRING_WINDOW,
    Counter,
    Role,
    Status,
    TaskFacts,
    TaskForUser,
    counters_for,
    counters_stamp,
)

# What ``counters_for`` gives over ``_cases()``, for each ``counters_stamp()`` (the rules'
# version and the expiring window) it was recorded under. A change of the rules bumps
# ``COUNTERS_RULES`` and records the new fingerprint here (the assertion's message gives it).
FINGERPRINTS = {
    "1|86400": "0b55ff0d0815ced69b1b45c9105e9f98c71d5f6e12576367fdbd4415c9d145c7",
}

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
ME, OTHER = "me", "other"


def _cases() -> list[tuple[str, TaskForUser]]:
    created = NOW - timedelta(days=3)
    deadlines = [
        None,
        NOW - timedelta(hours=1),  # passed
        NOW + timedelta(hours=2),  # within the expiring window
        NOW + EXPIRING_WINDOW + timedelta(hours=1),  # beyond it
    ]
    # me as: responsible, participant, observer, author of someone else's task, author and
    # responsible at once, and on nothing
    roles = [
        dict(author_id=OTHER, responsible_id=ME),
        dict(author_id=OTHER, responsible_id=OTHER, participant_ids=frozenset({ME})),
        dict(author_id=OTHER, responsible_id=OTHER, observer_ids=frozenset({ME})),
        dict(author_id=ME, responsible_id=OTHER),
        dict(author_id=ME, responsible_id=ME),
        dict(author_id=OTHER, responsible_id=OTHER),
    ]
    views = [None, created - timedelta(hours=1), NOW - timedelta(hours=1)]
    cases = []
    for number, (status, role, deadline, viewed, comments) in enumerate(
        itertools.product(Status, roles, deadlines, views, (0, 2))
    ):
        task = TaskFacts(id=f"t{number}", status=status, deadline=deadline, **role)  # type: ignore[arg-type]
        cases.append((task.id, TaskForUser(task, created, viewed, comments)))
    return cases


def _fingerprint() -> str:
    per_task = {
        task_id: dataclasses.asdict(counters_for(ME, [item], NOW)) for task_id, item in _cases()
    }
    together = dataclasses.asdict(counters_for(ME, [item for _, item in _cases()], NOW))
    text = json.dumps({"each": per_task, "all": together}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_counting_rules_change_only_with_their_stamp() -> None:
    stamp = counters_stamp()
    fingerprint = _fingerprint()
    assert FINGERPRINTS.get(stamp) == fingerprint, (
        f"counters_for gives other numbers than under stamp {stamp}: bump COUNTERS_RULES in "
        f"server/tasks/rules.py and record {{'<new stamp>': '{fingerprint}'}} here"
    )


def test_the_fingerprint_sees_a_change_of_one_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cases reach every counter, and a rule that counts one of them differently in one
    role (here, ``in_progress`` no longer for the author) changes the fingerprint."""
    counted = counters_for(ME, [item for _, item in _cases()], NOW)
    assert all(value > 0 for value in dataclasses.asdict(counted.total).values()), counted
    before = _fingerprint()
    by_role = dict(rules.COUNTERS_BY_ROLE)
    by_role[Role.AUTHOR] = by_role[Role.AUTHOR] - {Counter.IN_PROGRESS}
    monkeypatch.setattr(rules, "COUNTERS_BY_ROLE", by_role)
    assert _fingerprint() != before
