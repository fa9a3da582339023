"""Two replicas with kopf peering: only one acts; the other takes over when it stops.
Both are ready, so both serve the webhook (the chart's Services route config streams and
the metrics API by the acting replica's pod label; tests/k8s/test_e2e_install.py)."""

from __future__ import annotations

import pytest

from tests.helpers import free_port, wait_for
from tests.k8s.operator.opstack import Operator, OperatorEnv, sessionslice, token_request
from tests.k8s.operator.test_stream_auth import open_stream

pytestmark = pytest.mark.k8s


def test_only_one_replica_acts_and_the_other_takes_over(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    first = ops.operator  # the session's replica: the older one
    second = Operator(ops, "replica-2", "--peering-lifetime", "10", config_port=free_port())
    (pod,) = ops.create_pods(ns, ["web-0"], {"app": "web"})
    token = token_request(ops.cluster, ns, "default", pod=pod)
    try:
        second.start(wait_acting=False)
        wait_for(lambda: second.state()["peering_checked"], what="second replica up")
        # The younger replica is a standby: ready (for the webhook), not acting, and it
        # refuses config streams.
        assert second.state()["priority"] < first.state()["priority"]
        wait_for(second.ready, what="the standby ready")
        assert not second.state()["acting"] and first.state()["acting"]
        assert first.ready()
        ops.cluster.apply(
            sessionslice(
                "web",
                ns,
                {"selector": {"matchLabels": {"app": "web"}}, "capacity": {"sessionsPerPod": 2}},
            )
        )
        wait_for(lambda: first.state()["sessionslices"].get(f"{ns}/web") is not None)
        assert second.state()["sessionslices"] == {} and second.state()["status_writes"] == 0
        status, message = open_stream(ops, ns, "web-0", token, port=second.config_port)
        assert status == 503 and "standby" in message
        assert open_stream(ops, ns, "web-0", token)[0] == 101  # the active one serves it

        # The active replica stops (cleanly: its peering keepalive goes with it).
        first.stop()
        second.wait_acting(timeout=30)
        wait_for(lambda: second.state()["sessionslices"].get(f"{ns}/web") is not None)
        assert open_stream(ops, ns, "web-0", token, port=second.config_port)[0] == 101
    finally:
        # Hand back to the session's replica for the other tests.
        if not first.alive():
            first.start(wait_acting=False)
        second.stop()
        first.wait_acting(timeout=60)
