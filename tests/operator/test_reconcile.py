"""Reconcile decisions and status aggregation, without IO."""

from __future__ import annotations

from typing import Any

import pytest

from backdial.operator.fleet import Fleet, slice_status, stamp_conditions
from backdial.operator.models import LabelSelector
from backdial.operator.reconcile import (
    PodInfo,
    SliceInfo,
    SpecError,
    config_version,
    parse_spec,
    plan,
    selector_matches,
    split_budget,
)
from backdial.policy import Policy

NS = "shop"


def spec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "web"}},
        "capacity": {"sessionsPerPod": 3},
        "slices": [
            {"name": "mobile", "match": {"userAgent": "(?i)android"}, "share": 34},
            {"name": "default", "share": 66},
        ],
    }
    base.update(over)
    return base


def sl(name: str = "web", created: str = "2026-01-01T00:00:00Z", **over: Any) -> SliceInfo:
    return SliceInfo(NS, name, uid=f"uid-{name}", generation=3, created=created, spec=spec(**over))


def pod(name: str, ready: bool = True, app: str = "web", **kw: Any) -> PodInfo:
    return PodInfo(NS, name, uid=f"uid-{name}", labels={"app": app}, ready=ready, **kw)


def test_every_selected_pod_gets_the_cap_and_the_slices() -> None:
    pods = [pod("a"), pod("b"), pod("c", app="other"), pod("d", terminating=True)]
    result = plan(sl(), pods, [sl()])
    assert result.valid and [p.name for p in result.owned] == ["a", "b"]
    cfg = result.configs["a"]
    assert cfg is result.configs["b"]  # one config object per distinct cap
    assert cfg.cap == 3 and cfg.policy["limits"]["maxSessions"] == 3
    assert [(s["name"], s["share"]) for s in cfg.policy["slices"]] == [
        ("mobile", 34),
        ("default", 66),
    ]
    # The delivered document is exactly what the acceptor's own model accepts.
    assert Policy.model_validate(cfg.policy).limits.max_sessions == 3
    assert cfg.version == config_version(cfg.policy)


def test_shares_below_100_go_to_the_default_slice_or_a_new_one() -> None:
    two = spec(slices=[{"name": "m", "match": {"pathPrefixes": ["/m"]}, "share": 30}])
    result = plan(SliceInfo(NS, "x", spec=two), [pod("a")], [])
    assert [(s["name"], s["share"]) for s in result.configs["a"].policy["slices"]] == [
        ("m", 30),
        ("default", 70),
    ]
    with_default = spec(slices=[{"name": "rest", "share": 50}])
    result = plan(SliceInfo(NS, "x", spec=with_default), [pod("a")], [])
    assert result.configs["a"].policy["slices"][0]["share"] == 100


def test_total_sessions_split_by_largest_remainder() -> None:
    total = spec(capacity={"sessionsPerPod": 10, "totalSessions": 12})
    three = [pod("a"), pod("b"), pod("c")]
    caps = {n: c.cap for n, c in plan(SliceInfo(NS, "x", spec=total), three, []).configs.items()}
    assert caps == {"a": 4, "b": 4, "c": 4}
    four = [*three, pod("d")]
    caps = {n: c.cap for n, c in plan(SliceInfo(NS, "x", spec=total), four, []).configs.items()}
    assert caps == {"a": 3, "b": 3, "c": 3, "d": 3}
    # A pod still starting gets one session (to turn ready); the rest is split.
    starting = [*three, pod("d", ready=False)]
    caps = {n: c.cap for n, c in plan(SliceInfo(NS, "x", spec=total), starting, []).configs.items()}
    assert caps == {"a": 4, "b": 4, "c": 3, "d": 1} and sum(caps.values()) == 12


def test_split_budget_bounds() -> None:
    assert split_budget(7, 10, ["c", "a", "b"], []) == ({"a": 3, "b": 2, "c": 2}, 0)
    assert split_budget(100, 5, ["a", "b"], []) == ({"a": 5, "b": 5}, 0)  # per-pod cap wins
    caps, short = split_budget(2, 5, ["a", "b", "c"], [])
    assert caps == {"a": 1, "b": 1, "c": 1} and short == 1


def test_budget_too_small_is_degraded() -> None:
    total = spec(capacity={"sessionsPerPod": 3, "totalSessions": 2})
    result = plan(SliceInfo(NS, "x", generation=1, spec=total), [pod("a"), pod("b"), pod("c")], [])
    degraded = slice_status(result, Fleet())["conditions"][2]
    assert degraded["status"] == "True" and degraded["reason"] == "BudgetTooSmall"


def test_conflict_oldest_wins_and_both_know() -> None:
    old = sl("old", created="2026-01-01T00:00:00Z")
    new = sl("new", created="2026-02-01T00:00:00Z", selector={"matchLabels": {}})
    pods = [pod("a"), pod("z", app="other")]
    p_old, p_new = plan(old, pods, [old, new]), plan(new, pods, [old, new])
    assert [p.name for p in p_old.owned] == ["a"] and p_old.contested == {"a": [f"{NS}/new"]}
    assert [p.name for p in p_new.owned] == ["z"] and p_new.lost == {"a": f"{NS}/old"}
    assert p_old.conflicts == [f"{NS}/new"] and p_new.conflicts == [f"{NS}/old"]
    for p in (p_old, p_new):
        degraded = slice_status(p, Fleet())["conditions"][2]
        assert degraded["type"] == "Degraded" and degraded["status"] == "True"
        assert degraded["reason"] == "Conflict"
    # Same creation time: the name decides, the same way for both.
    a, b = sl("a"), sl("b")
    assert plan(a, pods, [a, b]).owned and not plan(b, pods, [a, b]).owned


def test_invalid_slice_claims_no_pod() -> None:
    bad = sl("bad", created="2000-01-01T00:00:00Z", capacity={"sessionsPerPod": 0})
    good = sl("good")
    assert [p.name for p in plan(good, [pod("a")], [bad, good]).owned] == ["a"]


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"capacity": {"sessionsPerPod": 0}}, "spec.capacity.sessionsPerPod"),
        ({"slices": [{"name": "d", "share": 100, "match": {"cidrs": ["nope"]}}]}, "cidrs"),
        ({"slices": [{"name": "d", "share": 100, "match": {"userAgent": "("}}]}, "userAgent"),
        ({"limits": {"maxSessions": 5}}, "spec.limits.maxSessions"),
        ({"slices": [{"name": "a", "share": 60}, {"name": "b", "share": 60}]}, "spec"),
        (
            {"slices": [{"name": "default", "share": 50, "match": {"pathPrefixes": ["/x"]}}]},
            "spec.slices",
        ),
    ],
)
def test_invalid_spec_is_a_permanent_error_naming_the_field(
    over: dict[str, Any], field: str
) -> None:
    result = plan(sl(**over), [pod("a")], [])
    assert not result.valid and field in result.error and not result.configs
    status = slice_status(result, Fleet())
    assert {c["reason"] for c in status["conditions"]} == {"InvalidSpec"}
    assert status["conditions"][2]["status"] == "True"


def test_parse_spec_refuses_unknown_fields() -> None:
    with pytest.raises(SpecError, match=r"spec\.capacity\.bogus"):
        parse_spec(spec(capacity={"sessionsPerPod": 1, "bogus": 1}))


def test_selector_semantics() -> None:
    sel = LabelSelector.model_validate(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "NotIn", "values": ["x"]},
                {"key": "team", "operator": "Exists"},
            ],
        }
    )
    ok = {"app": "web", "tier": "a", "team": "t"}
    assert selector_matches(sel, ok)
    assert not selector_matches(sel, {**ok, "canary": "1"})
    assert not selector_matches(sel, {**ok, "zone": "x"})
    assert not selector_matches(sel, {**ok, "tier": "c"})
    assert not selector_matches(sel, {k: v for k, v in ok.items() if k != "team"})
    assert selector_matches(LabelSelector(), {})


def test_status_sums_reports_and_config_applied_needs_every_ready_pod() -> None:
    pods = [pod("a"), pod("b"), pod("c", ready=False)]
    info = sl()
    result = plan(info, pods, [info])
    fleet = Fleet()
    version = result.configs["a"].version
    for name, registered in (("a", 3), ("b", 2), ("c", 1)):
        state = fleet.connect(NS, name, f"uid-{name}")
        fleet.report(
            state,
            {
                "registered": registered,
                "leased": 1,
                "waiting": 2,
                "slices": {"mobile": {"leased": 1, "waiting": 2}},
            },
        )
        if name == "a":
            fleet.applied(state, info.generation, version, info.key)
    status = slice_status(result, fleet)
    assert (status["selectedPods"], status["readyPods"], status["configuredPods"]) == (3, 2, 1)
    assert (status["registeredSessions"], status["leasedSessions"]) == (6, 3)
    assert status["requestsWaiting"] == 6 and status["perPodSessions"] == 3
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["ConfigApplied"]["status"] == "False" and "b" in conds["ConfigApplied"]["message"]
    assert conds["Ready"]["status"] == "False"
    fleet.applied(fleet.pods[(NS, "b")], info.generation, version, info.key)
    conds = {c["type"]: c for c in slice_status(result, fleet)["conditions"]}
    assert conds["ConfigApplied"]["status"] == "True"  # pod c is not ready: not waited for
    assert conds["Ready"]["status"] == "True" and conds["Degraded"]["status"] == "False"
    # An older generation's ack does not count, nor does a pod replaced under the same name.
    fleet.applied(fleet.pods[(NS, "b")], info.generation - 1, version, info.key)
    assert slice_status(result, fleet)["configuredPods"] == 1
    fleet.disconnect(fleet.pods[(NS, "a")])
    assert slice_status(result, fleet)["registeredSessions"] == 3


def test_condition_transition_times_only_move_on_change() -> None:
    first = stamp_conditions(
        [{"type": "Ready", "status": "False"}, {"type": "Degraded", "status": "False"}], [], "t1"
    )
    second = stamp_conditions(
        [{"type": "Ready", "status": "True"}, {"type": "Degraded", "status": "False"}], first, "t2"
    )
    assert [c["lastTransitionTime"] for c in second] == ["t2", "t1"]


def test_fleet_tells_which_namespace_changed() -> None:
    seen: list[str] = []
    fleet = Fleet(seen.append)
    state = fleet.connect("ns1", "p", "u")
    fleet.report(state, {"registered": 4, "leased": 1})
    assert state.utilization == 25.0
    stale = fleet.connect("ns1", "p", "u2")  # a reconnect replaces the entry
    fleet.disconnect(state)  # the old stream ending later must not drop the new one
    assert fleet.get("ns1", "p") is stale
    assert seen == ["ns1"] * 3
