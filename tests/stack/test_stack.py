"""The whole data plane as real processes: acceptor, sidecar, `backdial serve`.

Every request goes from a real HTTP client through the sidecar, over a leased
session, to the demo app.  These tests prove the design's invariants end to
end: capacity, bounded waiting, FIFO, fairness, lossless reconfiguration,
reclaim, restart and exact cross-process metrics.
"""

from __future__ import annotations

import collections
import concurrent.futures
import http.client
import itertools
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from tests.helpers import free_port, get_json, http_get, metric, wait_for
from tests.stack.conftest import Stack

pytestmark = pytest.mark.slow


def request(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


class Load:
    """Closed-loop load from threads with keep-alive connections; counts every outcome.

    With *hosts*, each request goes to the next of the hosts it returns at that moment
    (round robin, one kept-alive connection per host), as a load balancer would.
    """

    def __init__(
        self,
        port: int,
        path: str = "/",
        clients: int = 4,
        host: str = "127.0.0.1",
        hosts: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.port, self.path, self.clients = port, path, clients
        self.hosts = hosts or (lambda: (host,))
        self.codes: collections.Counter[int | str] = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def _run(self, index: int) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        turn = itertools.count(index)
        while not self._stop.is_set():
            hosts = self.hosts()
            if not hosts:
                time.sleep(0.05)
                continue
            host = hosts[next(turn) % len(hosts)]
            conn = conns.pop(host, None)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, self.port, timeout=30)
                conn.request("GET", self.path)
                resp = conn.getresponse()
                resp.read()
                code: int | str = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                else:
                    conns[host] = conn
            except (OSError, http.client.HTTPException) as exc:
                code = type(exc).__name__
                if conn is not None:
                    conn.close()
            with self._lock:
                self.codes[code] += 1
        for conn in conns.values():
            conn.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.codes.values())

    def wait_more(self, n: int, timeout: float = 30.0) -> None:
        """Wait until *n* more requests were answered (any outcome) than now."""
        goal = self.total + n
        wait_for(lambda: self.total >= goal, timeout=timeout, what=f"{n} more requests")

    def failures(self) -> dict[int | str, int]:
        return {k: v for k, v in self.codes.items() if k != 200}


def test_proxy_answers_through_leased_sessions(stack: Stack) -> None:
    stack.start(sessions=4)
    status, body, _ = request(stack.port, "/")
    assert status == 200 and body == b"hello from backdial\n"
    state = get_json(stack.acceptor_url("/v1/state"))
    assert state["services"]["demo"]["registered"] == 4
    assert http_get(stack.sidecar_url("/readyz"))[0] == 200


def test_capacity_holds_under_a_burst_of_ten_times_the_sessions(stack: Stack) -> None:
    stack.start(
        sessions=4,
        config="slices: [{name: default, share: 100, queue: {maxWaiting: 100, timeout: 20s}}]\n",
    )
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda _: request(stack.port, "/delay?ms=100")[0], range(40)))
    assert results == [200] * 40
    stats = json.loads(request(stack.port, "/stats")[1])
    assert stats["max_concurrency"] <= 4
    assert stats["max_concurrency"] == 4  # and the capacity was really used


def test_fifo_order_and_503_with_retry_after(stack: Stack) -> None:
    stack.start(
        sessions=1,
        config="slices: [{name: default, share: 100, "
        "queue: {maxWaiting: 5, timeout: 6s}}]\nlimits: {retryAfter: 7}\n",
    )
    done: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> int:
        status = request(stack.port, f"/delay?ms=400&i={i}")[0]
        with lock:
            done.append(i)
        return status

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(call, 0)]
        wait_for(lambda: stack.leased() == 1, what="the first request on the session")
        for i in range(1, 6):
            # Arrival order is the index: each one is queued before the next is sent.
            futures.append(pool.submit(call, i))
            wait_for(lambda i=i: stack.waiting_in_sidecar() == i, what=f"{i} waiting")
        # 1 running + 5 waiting: the queue is full now, a 7th is refused (queue_full).
        status, _, headers = request(stack.port, "/")
        assert status == 503 and headers["retry-after"] == "7"
        assert [f.result() for f in futures] == [200] * 6
    assert done == sorted(done)
    metrics = http_get(stack.acceptor_url("/metrics"))[1].decode()
    stack.wait_metric(
        1,
        "backdial_requests_rejected_total",
        slice="default",
        reason="queue_full",
    )
    assert "backdial_queue_wait_seconds_count" in metrics


def test_queue_timeout_gives_503(stack: Stack) -> None:
    stack.start(
        sessions=1,
        config="slices: [{name: default, share: 100, queue: {maxWaiting: 5, timeout: 300ms}}]\n",
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(request, stack.port, "/delay?ms=1500")
        wait_for(lambda: stack.leased() == 1, what="the slow request on the session")
        status, _, headers = request(stack.port, "/")
        assert status == 503 and "retry-after" in headers
        assert slow.result()[0] == 200
    stack.wait_metric(
        1,
        "backdial_requests_rejected_total",
        slice="default",
        reason="timeout",
    )
    # The queue's own clock: the refused request waited its whole 300 ms, so at least one
    # of the two waits (the first request waited for its grant) lies above 250 ms.
    stack.wait_metric(2, "backdial_queue_wait_seconds_count", slice="default")
    waits = stack.metric("backdial_queue_wait_seconds_count", slice="default")
    short = stack.metric("backdial_queue_wait_seconds_bucket", slice="default", le="0.25")
    assert waits - short >= 1


def test_waiting_count_includes_requests_inside_workers(stack: Stack) -> None:
    stack.start(
        sessions=1,
        config="slices: [{name: default, share: 100, queue: {maxWaiting: 10, timeout: 10s}}]\n",
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, stack.port, "/delay?ms=1500")]
        wait_for(lambda: stack.leased() == 1, what="the first request on the session")
        futures += [pool.submit(request, stack.port, "/delay?ms=10") for _ in range(3)]
        stack.wait_metric(
            3,
            "backdial_requests_waiting",
            service="demo",
            slice="default",
        )
        assert [f.result()[0] for f in futures] == [200] * 4
    stack.wait_metric(
        0,
        "backdial_requests_waiting",
        service="demo",
        slice="default",
    )


def test_no_control_traffic_at_steady_state(stack: Stack) -> None:
    stack.start(sessions=4)
    for _ in range(50):  # warm up: the worker takes its sticky leases
        assert request(stack.port, "/")[0] == 200
    before = http_get(stack.acceptor_url("/metrics"))[1].decode()
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    for _ in range(500):
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()
    after = http_get(stack.acceptor_url("/metrics"))[1].decode()
    for kind in ("want", "release", "hello", "listen"):
        assert metric(after, "backdial_acceptor_control_records_total", type=kind) == metric(
            before, "backdial_acceptor_control_records_total", type=kind
        ), kind
    assert metric(after, "backdial_acceptor_leases_granted_total") == metric(
        before, "backdial_acceptor_leases_granted_total"
    )


def test_fairness_between_two_registrants(stack: Stack) -> None:
    stack.start(sessions=0)
    stack.service("a", sessions=4)
    stack.service("b", sessions=4)
    wait_for(
        lambda: get_json(stack.acceptor_url("/v1/state"))["services"]["demo"]["registered"] == 8,
        what="8 sessions",
    )
    stack.wait_ready()
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
        for _ in range(n):
            # A fixed service time: fairness is about turns, not about which
            # instance the CPU scheduler happens to favour on a loaded machine.
            conn.request("GET", "/whoami?ms=5")
            resp = conn.getresponse()
            who = json.loads(resp.read())["instance"]
            with lock:
                seen[who] += 1
        conn.close()

    for clients in (1, 6):  # low load (sticky rotation) and high load (the ring)
        seen.clear()
        threads = [threading.Thread(target=worker, args=(600 // clients,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        total = sum(seen.values())
        assert total == 600
        held = get_json(stack.sidecar_url("/v1/state"))["held_by_registrant"]
        for instance in ("a", "b"):
            assert abs(seen[instance] / total - 0.5) <= 0.05, (clients, dict(seen), held)


def test_slice_quota_without_borrowing_is_never_exceeded(stack: Stack) -> None:
    stack.start(
        sessions=4,
        config=(
            "slices:\n"
            "- {name: mobile, share: 50, borrow: false, match: {userAgent: iPhone},"
            " queue: {maxWaiting: 50, timeout: 20s}}\n"
            "- {name: default, share: 50, queue: {maxWaiting: 50, timeout: 20s}}\n"
        ),
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            state = get_json(stack.acceptor_url("/v1/state"))
            peak = max(peak, state["services"]["demo"]["slices"]["mobile"]["leased"])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            codes = list(
                pool.map(
                    lambda _: request(stack.port, "/delay?ms=200", {"User-Agent": "iPhone"})[0],
                    range(10),
                )
            )
    finally:
        stop.set()
        sampler.join()
    assert codes == [200] * 10
    assert peak == 2


def test_config_reload_under_load_fails_nothing(stack: Stack) -> None:
    stack.start(sessions=4)
    configs = [
        "slices: [{name: mobile, share: 30, match: {userAgent: x}}, {name: default, share: 70}]\n",
        "slices: [{name: default, share: 100, queue: {maxWaiting: 500, timeout: 5s}}]\n",
        "slices: [{name: a, share: 50, match: {pathPrefixes: [/a]}}, {name: default, share: 50}]\n",
    ]
    with Load(stack.port, "/delay?ms=5", clients=8) as load:
        for i in range(9):
            load.wait_more(20)  # requests in flight across every reload
            before = stack.generation()
            stack.config_path.write_text(configs[i % 3])
            wait_for(lambda before=before: stack.generation() > before, what="reload applied")
        load.wait_more(20)
    assert stack.generation() >= 10
    assert load.failures() == {} and load.total > 100


def test_capacity_lowered_and_raised_under_load_fails_nothing(stack: Stack) -> None:
    stack.start(sessions=0)
    admin = f"127.0.0.1:{free_port()}"
    stack.service("a", sessions=6, admin=admin)
    wait_for(lambda: stack.registered() == 6, what="6 sessions")
    stack.wait_ready()
    stack.wait_ready()

    def set_sessions(n: int) -> None:
        conn = http.client.HTTPConnection(*admin.split(":"), timeout=5)  # type: ignore[arg-type]
        conn.request("PUT", "/v1/sessions", body=str(n))
        assert conn.getresponse().status == 200
        conn.close()

    with Load(stack.port, "/delay?ms=20", clients=6) as load:
        for n in (2, 8, 1, 5, 3, 6):
            load.wait_more(20)
            set_sessions(n)
            wait_for(lambda n=n: stack.registered() == n, timeout=10, what=f"{n} sessions")
        load.wait_more(20)
    assert load.failures() == {} and load.total > 100


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_acceptor_restart_then_automatic_reregistration(stack: Stack, sig: int) -> None:
    stack.start(sessions=4)
    assert request(stack.port, "/")[0] == 200
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(request, stack.port, "/delay?ms=1000&group=held")

        def in_app() -> bool:
            groups = json.loads(request(stack.port, "/stats")[1])["groups"]
            return bool(groups.get("held", {}).get("in_flight"))

        # The app serves it, so it is on a leased session. (The acceptor's leased count
        # proves nothing here: the warm-up request's session stays leased to the worker,
        # so a slow client thread could still be on its way; a request that reaches the
        # sidecar after the acceptor stopped waits for a session and gets 503 when its
        # queue timeout passes, as invariant 3 says.)
        wait_for(in_app, what="the request served by the app")
        stack.acceptor.stop(sig=sig)
        # A request already on a leased session finishes: leases outlive the acceptor.
        assert running.result()[0] == 200
    stack.restart_acceptor()
    wait_for(lambda: stack.registered() == 4, timeout=20, what="re-registration")
    wait_for(
        lambda: request(stack.port, "/", timeout=5)[0] == 200, timeout=20, what="proxying again"
    )
    codes = [request(stack.port, "/")[0] for _ in range(20)]
    assert codes == [200] * 20
    # The new acceptor got the listening socket back from the surviving sidecar,
    # so a sidecar replacement still works after the acceptor restart.
    old = stack.sidecar
    stack.restart_sidecar(keep_old=True)
    old.stop()
    codes = [request(stack.port, "/")[0] for _ in range(10)]
    assert codes == [200] * 10


def test_killed_sidecar_leases_are_reclaimed_and_capacity_recovers(stack: Stack) -> None:
    stack.start(sessions=4)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, stack.port, "/delay?ms=2000") for _ in range(3)]
        wait_for(
            lambda: get_json(stack.acceptor_url("/v1/state"))["services"]["demo"]["leased"] >= 3,
            what="leases",
        )
        stack.sidecar.stop(sig=signal.SIGKILL)
        for f in futures:
            with pytest.raises((OSError, http.client.HTTPException)):
                f.result()
    # The service lost the reclaimed sessions and dials replacements.
    wait_for(lambda: stack.registered() == 4, timeout=20, what="capacity back to 4")
    stack.restart_sidecar()
    codes = [request(stack.port, "/")[0] for _ in range(10)]
    assert codes == [200] * 10


def test_sidecar_replaced_under_load_fails_nothing(stack: Stack) -> None:
    stack.start(sessions=8)
    with Load(stack.port, "/delay?ms=5", clients=8) as load:
        load.wait_more(50)
        old = stack.sidecar
        stack.restart_sidecar(keep_old=True)
        load.wait_more(50)  # both sidecars accept from the one listening socket
        old.stop()  # SIGTERM: stop accepting, drain, give leases back
        load.wait_more(50)  # the new one alone
    assert load.failures() == {} and load.total > 100


def test_two_workers_share_the_listener_and_metrics_are_summed(stack: Stack) -> None:
    stack.start(sessions=6, workers=2)
    state = get_json(stack.acceptor_url("/v1/state"))
    assert len(state["workers"]) == 2
    with Load(stack.port, "/delay?ms=2", clients=8) as load:
        load.wait_more(200)
    assert load.failures() == {}
    text = http_get(stack.sidecar_url("/metrics"))[1].decode()
    served = metric(text, "backdial_sidecar_requests_total", slice="default", code="200")
    assert served == load.total
    # Both workers served: each one's own share shows in the merged state.
    workers = get_json(stack.sidecar_url("/v1/state"))["workers"]
    assert len(workers) == 2
    stack.sidecar.stop()
    assert not any((stack.run_dir / f"sidecar-worker-{i}.admin.sock").exists() for i in range(2))


def test_slow_reader_does_not_hold_the_only_session(stack: Stack) -> None:
    """Invariant 5 end to end: the response is drained from the session into the
    sidecar's buffer, so a client that reads nothing does not keep the session."""
    stack.start(sessions=1)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", stack.port))
    try:
        # 512 KiB: far more than the client's socket buffer, less than the sidecar's.
        slow.sendall(b"GET /stream?chunks=64&size=8192 HTTP/1.1\r\nHost: t\r\n\r\n")
        # The client reads nothing, yet the sidecar finished the request (all of it is in
        # its buffer) and the session is idle again.
        wait_for(
            lambda: (
                stack.sidecar_metric("backdial_sidecar_requests_total", slice="default", code="200")
                == 1
            ),
            what="the response drained into the sidecar",
        )
        wait_for(lambda: get_json(stack.sidecar_url("/v1/state"))["busy"] == 0, what="idle")
        # The only session serves the next request (else it would wait and get 503).
        status, _, _ = request(stack.port, "/", timeout=5)
        assert status == 200
        # ... and the slow client still gets every byte when it finally reads.
        slow.settimeout(10)
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = slow.recv(65536)
            assert chunk, "connection closed early"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert len(body) > 64 * 8192
    finally:
        slow.close()
