"""Drain for Kubernetes with real processes: what the injected preStop hook relies on.

``GET /v1/drain`` on the sidecar's admin port (the app container's preStop)
must: fail readiness at once, keep serving through the quiet period (answers
carry ``Connection: close``), then stop accepting (new connections refused,
not left in a backlog), finish every in-flight and queued request, and only
then answer.  Only the holder of the pod's drain token may start it.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import urllib.request

import pytest

from tests.helpers import http_get, wait_for
from tests.stack.conftest import Stack, metric
from tests.stack.test_stack import Load, request

pytestmark = pytest.mark.slow

TOKEN = "s3cret-drain-token"
# Queued requests must not time out while they wait their turn behind slow ones.
CONFIG = "slices: [{name: default, share: 100, queue: {maxWaiting: 100, timeout: 20s}}]\n"


def drain(stack: Stack, token: str | None = TOKEN, timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(stack.sidecar_url("/v1/drain"))
    if token is not None:
        req.add_header("X-Backdial-Drain-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start(stack: Stack, sessions: int, quiet: float, workers: int = 1) -> None:
    stack.start(sessions=0, config=CONFIG)
    stack.sidecar.stop()
    stack.restart_sidecar(
        workers=workers,
        wait=False,
        extra=("--drain-quiet-period", str(quiet)),
        env={"BACKDIAL_DRAIN_TOKEN": TOKEN},
    )
    stack.service("main", sessions)
    wait_for(lambda: stack.registered() == sessions, what=f"{sessions} sessions")
    stack.wait_ready()


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


def test_drain_finishes_in_flight_and_queued_requests_then_refuses(stack: Stack) -> None:
    start(stack, sessions=2, quiet=0.2)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(request, stack.port, "/delay?ms=800") for _ in range(6)]
        wait_for(
            lambda: stack.metric("backdial_requests_waiting", service="demo", slice="default") == 4,
            what="4 queued",
        )  # 2 on sessions, 4 queued
        status, body = drain(stack)
        # When the hook answers, every request has been answered and every connection closed
        # (the rest still had most of 800 ms to go if it answered early).
        text = http_get(stack.sidecar_url("/metrics"))[1].decode()
        codes = [f.result()[0] for f in futures]
    assert status == 200, body
    assert json.loads(body)["aborted"] == 0
    assert metric(text, "backdial_sidecar_client_connections") == 0
    assert metric(text, "backdial_sidecar_requests_total", slice="default", code="200") == 6
    assert codes == [200] * 6
    assert refused(stack.port)
    assert http_get(stack.sidecar_url("/readyz"))[0] == 503
    # The app then stops cleanly: its sessions are idle.
    assert stack.services[0].stop(timeout=10) == 0


def test_quiet_period_keeps_serving_while_not_ready(stack: Stack) -> None:
    start(stack, sessions=2, quiet=3.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hook = pool.submit(drain, stack)
        wait_for(lambda: http_get(stack.sidecar_url("/readyz"))[0] == 503, what="not ready")
        # New connections are still accepted and answered, and told to go away.
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"hello from backdial\n"
        assert resp.getheader("connection", "").lower() == "close"
        conn.close()
        assert not hook.done()
        state = json.loads(http_get(stack.sidecar_url("/v1/state"))[1])
        assert state["drain"] == "quiet"
        status, _ = hook.result(timeout=30)
    assert status == 200
    assert refused(stack.port)


def test_scale_down_style_drain_under_load_fails_nothing(stack: Stack) -> None:
    """Clients stop using the pod once it is not ready (as endpoints would): zero failures."""
    start(stack, sessions=2, quiet=0.5)
    with Load(stack.port, "/delay?ms=20", clients=6) as load:
        wait_for(lambda: load.total > 20, what="load flowing")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hook = pool.submit(drain, stack)
            wait_for(lambda: http_get(stack.sidecar_url("/readyz"))[0] == 503, what="not ready")
            load.__exit__()  # the endpoint is gone: clients finish what they sent
            status, body = hook.result(timeout=30)
    assert status == 200 and json.loads(body)["aborted"] == 0
    assert load.failures() == {} and load.total > 20


def test_drain_needs_the_pods_token(stack: Stack) -> None:
    start(stack, sessions=1, quiet=0.0)
    assert drain(stack, token=None)[0] == 403
    assert drain(stack, token="wrong")[0] == 403
    assert http_get(stack.sidecar_url("/readyz"))[0] == 200
    assert request(stack.port, "/")[0] == 200
    assert drain(stack)[0] == 200
    assert drain(stack)[0] == 200  # idempotent: a second hook just sees it done


def test_drain_with_two_workers(stack: Stack) -> None:
    start(stack, sessions=4, quiet=0.2, workers=2)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, stack.port, "/delay?ms=500") for _ in range(4)]
        wait_for(
            lambda: stack.metric("backdial_sessions_leased", service="demo", slice="default") >= 1,
            what="requests in flight",
        )
        status, body = drain(stack)
        assert [f.result()[0] for f in futures] == [200] * 4
    assert status == 200
    assert json.loads(body) == {"drained": True, "workers": 2, "aborted": 0}
    assert refused(stack.port)
