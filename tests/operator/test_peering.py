"""kopf's peering rule, as the operator evaluates it, and the acting replica's pod label."""

from __future__ import annotations

import datetime

from backdial.operator.peering import default_priority, is_active
from backdial.operator.role import ACTIVE, ROLE_LABEL, role_patch

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


def peer(priority: int, seen_ago: float = 1.0, lifetime: int = 60) -> dict[str, object]:
    seen = NOW - datetime.timedelta(seconds=seen_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_highest_live_priority_acts() -> None:
    status = {"me": peer(10), "low": peer(5)}
    assert is_active(status, "me", 10, NOW)
    assert not is_active({**status, "high": peer(11)}, "me", 10, NOW)
    assert not is_active({**status, "same": peer(10)}, "me", 10, NOW)  # kopf pauses both
    assert is_active({**status, "dead": peer(99, seen_ago=61)}, "me", 10, NOW)
    assert is_active({}, "me", 0, NOW)


def test_older_processes_get_higher_priorities() -> None:
    older = default_priority(1_000.0, rng=lambda: 0.0)
    newer = default_priority(1_001.0, rng=lambda: 0.999)
    assert older > newer > 0


def test_role_label_patch_sets_or_removes_the_label() -> None:
    """The acting replica's pod carries the label the config and metrics Services select; a
    merge patch with null removes it (idempotent: no read of the pod first)."""
    assert role_patch(True) == {"metadata": {"labels": {ROLE_LABEL: ACTIVE}}}
    assert role_patch(False) == {"metadata": {"labels": {ROLE_LABEL: None}}}
