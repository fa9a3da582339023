"""Small queues end to end: ``maxWaiting`` below the number of sidecar workers.

Each worker may queue only its part of a slice's ``queue.maxWaiting`` (split exactly
between the workers, so the slice's waiters never exceed it).  With ``maxWaiting: 0``
every part is 0, and with ``maxWaiting: 1`` and two workers one part is.  A request
such a worker cannot queue and cannot serve from an idle session it holds must still
be served when a session can be had now — idle at the acceptor or idle in the other
worker — and get a fast 503 with ``Retry-After`` when none can, while the slice's
waiters stay within ``maxWaiting`` under a burst.

On the native engine such requests stay native (docs/engine.md): the engine asks and
answers them itself, so no connection is handed to the python engine
(``backdial_sidecar_engine_handovers_total`` stays 0, on the python engine trivially)
and a keep-alive connection answered ``503`` goes on being served.

Real acceptor, sidecar (``--workers 1`` and ``2``) and demo service processes on
loopback.  Requests go on fresh connections so both workers take some.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import os
import threading

import pytest

from backdial.adminhttp import admin_get
from backdial.sidecar import engine
from tests.helpers import get_json, metric, wait_for
from tests.stack.conftest import Stack

pytestmark = pytest.mark.slow

NATIVE = engine.choose(os.environ.get("BACKDIAL_ENGINE", "auto"))[0] is engine.Kind.NATIVE

SESSIONS = 2
BURST = 10
SLOW = "/delay?ms=4000"  # holds a session while the burst is answered (a bound, not a pace)


def config(max_waiting: int) -> str:
    return (
        "slices: [{name: default, share: 100,"
        f" queue: {{maxWaiting: {max_waiting}, timeout: 60s}}}}]\n"
        "limits: {retryAfter: 3}\n"
    )


def once(port: int, path: str = "/") -> tuple[int, str]:
    """One request on a fresh connection: (status, Retry-After)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("retry-after", "")
    finally:
        conn.close()


def served_by_worker(stack: Stack, workers: int) -> list[float]:
    """200s answered by each worker (its own /metrics on its UNIX admin socket)."""
    if workers == 1:
        return [
            stack.sidecar_metric("backdial_sidecar_requests_total", slice="default", code="200")
        ]
    out = []
    for i in range(workers):
        path = stack.run_dir / f"sidecar-worker-{i}.admin.sock"
        _, body = asyncio.run(admin_get(path, "/metrics"))
        out.append(
            metric(body.decode(), "backdial_sidecar_requests_total", slice="default", code="200")
        )
    return out


def handovers(stack: Stack) -> float:
    """Connections the native engine gave to the python engine (0 on the python engine)."""
    return stack.sidecar_metric("backdial_sidecar_engine_handovers_total")


def ask(conn: http.client.HTTPConnection, path: str = "/") -> tuple[int, str]:
    """One request on a kept-alive connection: (status, Retry-After)."""
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    assert not resp.will_close, "the connection must stay open"
    return resp.status, resp.getheader("retry-after", "")


def sidecar_figure(stack: Stack, name: str) -> int:
    """A worker figure (``busy``; ``waiting``/``asking`` per key) summed over workers."""
    state = get_json(stack.sidecar_url("/v1/state"))
    total = 0
    for worker in state.get("workers", [state]):
        value = worker[name]
        total += sum(value.values()) if isinstance(value, dict) else value
    return total


@pytest.mark.parametrize(
    ("max_waiting", "workers"), [(0, 1), (0, 2), (1, 2)], ids=["0-of-1", "0-of-2", "1-of-2"]
)
def test_requests_are_served_while_sessions_are_free_else_a_fast_503(
    stack: Stack, max_waiting: int, workers: int
) -> None:
    stack.start(sessions=SESSIONS, config=config(max_waiting), workers=workers)

    # 1. Sessions are free: every request is served, by every worker, although at most
    #    one worker may queue anything.  As many clients as sessions, each request on a
    #    fresh connection (so both workers take requests and the sessions move between
    #    them: a session idle in one worker serves the other's request).
    codes: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            codes.append(once(stack.port)[0])

    with concurrent.futures.ThreadPoolExecutor(SESSIONS) as pool:
        clients = [pool.submit(client) for _ in range(SESSIONS)]
        try:
            wait_for(
                lambda: min(served_by_worker(stack, workers)) >= 15 or 503 in codes,
                timeout=60,
                what="15 requests served by each worker",
            )
        finally:
            stop.set()
        for f in clients:
            f.result()
    assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    if workers == 2 and max_waiting == 0:  # sessions moved between the workers: by ASK
        assert stack.metric("backdial_acceptor_asks_total", result="granted") > 0

    # No round trip per request at steady state: a worker holding an idle session of
    # the key never asks the acceptor.
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    conn.request("GET", "/")
    assert conn.getresponse().read() and True
    asks = stack.metric("backdial_acceptor_control_records_total", type="ask")
    granted = stack.metric("backdial_acceptor_leases_granted_total")
    for _ in range(200):
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    assert stack.metric("backdial_acceptor_control_records_total", type="ask") == asks
    assert stack.metric("backdial_acceptor_leases_granted_total") == granted

    # 2. No session free: a burst gets fast 503s with Retry-After; at most maxWaiting of
    #    it waits (and is served once a session frees up).
    rejected = stack.metric(
        "backdial_requests_rejected_total", slice="default", reason="queue_full"
    )
    with concurrent.futures.ThreadPoolExecutor(SESSIONS + BURST + 1) as pool:
        slow = [pool.submit(once, stack.port, SLOW) for _ in range(SESSIONS)]
        wait_for(lambda: sidecar_figure(stack, "busy") == SESSIONS, what="every session busy")
        burst = [pool.submit(once, stack.port) for _ in range(BURST)]
        # A kept-alive connection asks too: refused (or waiting, where its worker still
        # has room), it stays open and served by the same engine.
        kept = pool.submit(ask, conn)
        # Every burst request is answered 503 or waits in a worker (asks are answered
        # at once): the slow requests still hold both sessions (4 s of service time).
        wait_for(
            lambda: (
                sum(1 for f in [*burst, kept] if f.done()) + sidecar_figure(stack, "waiting")
                == BURST + 1
                and sidecar_figure(stack, "asking") == 0
            ),
            timeout=20,
            what="the burst answered or waiting",
        )
        if max_waiting == 0:
            assert kept.result(timeout=20) == (503, "3")
        assert not any(f.done() for f in slow), "the slow requests ended too early to tell"
        assert sidecar_figure(stack, "waiting") <= max_waiting
        waiting = sidecar_figure(stack, "waiting") - (0 if kept.done() else 1)  # the burst's
        assert stack.metric("backdial_requests_waiting", service="demo", slice="default") <= (
            max_waiting
        )
        refused = [f.result() for f in burst if f.done()]
        assert refused == [(503, "3")] * (BURST - waiting)
        results = [f.result() for f in burst]
        assert [f.result()[0] for f in slow] == [200] * SESSIONS
        assert kept.result() in ((200, ""), (503, "3"))
    # The waiters were served once the slow requests ended; nothing timed out.
    assert sorted(status for status, _ in results) == [200] * waiting + [503] * (BURST - waiting)
    stack.wait_metric(
        rejected + BURST - waiting + (kept.result()[0] == 503),
        "backdial_requests_rejected_total",
        slice="default",
        reason="queue_full",
    )
    assert stack.metric("backdial_requests_rejected_total", slice="default", reason="timeout") == 0

    # 3. Free again: served again, the kept-alive connection too; on the native engine
    #    every request above (asking ones included) stayed native.
    assert [once(stack.port)[0] for _ in range(10)] == [200] * 10
    assert [ask(conn)[0] for _ in range(10)] == [200] * 10
    conn.close()
    assert handovers(stack) == 0, f"native engine: {NATIVE}"
    assert sidecar_figure(stack, "asking") == 0 and sidecar_figure(stack, "waiting") == 0
