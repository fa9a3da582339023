"""The proxy on the real lease pool and an acceptor *process* (the other tests run it
in-process).

Sessions are registered over ``register.sock`` with the BDREG/1 preamble and
then served by the recording ``Backend`` (without replacements, so the
acceptor's count shows what the proxy gave back); the worker's ``LeasePool``
leases them over ``control.sock`` (SCM_RIGHTS).  These tests check the seams
across the process boundary: sticky leases, release states, idle RETIRE
reported with ``pool.lost``, and the pool's rejections mapped to 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backdial.policy import Policy
from backdial.sidecar.config import ProxySettings
from backdial.wire import Preamble, parse_reply
from tests.helpers import Proc, free_port, get_json, http_get, register, wait_for
from tests.sidecar.conftest import Backend, ProxyRunner, RawClient

Raw = Callable[[int], RawClient]

CONFIG = """
slices:
  - name: default
    share: 100
    queue: {maxWaiting: %(max_waiting)d, timeout: 300ms}
limits: {retryAfter: 2, leasePrefetch: 0}
"""


class Acceptor:
    def __init__(self, procs: Callable[..., Proc], run_dir: Path, max_waiting: int) -> None:
        self.run_dir = run_dir
        self.admin = f"127.0.0.1:{free_port()}"
        config = run_dir / "config.yaml"
        config.write_text(CONFIG % {"max_waiting": max_waiting})
        self.proc = procs(
            "acceptor", "--run-dir", str(run_dir), "--admin", self.admin,
            "--config", str(config), name="acceptor",
        )  # fmt: skip
        wait_for(lambda: http_get(f"http://{self.admin}/healthz")[0] == 200, what="acceptor")

    def register(self, backend: Backend, n: int, instance: str = "i1") -> list[int]:
        ids = []
        for _ in range(n):
            line = Preamble(service="svc", instance=instance).encode()
            sock, reply_line = register(self.run_dir / "register.sock", line)
            reply = parse_reply(reply_line)
            assert reply.ok, reply
            backend.attach(sock, reply.session)
            ids.append(reply.session)
        wait_for(lambda: self.registered() == n + 0, what="registered sessions")
        return ids

    def state(self) -> Any:
        return get_json(f"http://{self.admin}/v1/state")

    def registered(self) -> int:
        return int(sum(s["registered"] for s in self.state()["services"].values()))


@pytest.fixture
def real(procs: Callable[..., Proc], run_dir: Path) -> Iterator[Callable[..., Any]]:
    runners: list[ProxyRunner] = []

    def make(sessions: int = 2, max_waiting: int = 10, **settings: Any) -> Any:
        acceptor = Acceptor(procs, run_dir, max_waiting)
        backend = Backend()
        acceptor.register(backend, sessions)

        settings.setdefault("tick", 0.05)
        runner = ProxyRunner(ProxySettings(**settings), Policy(), run_dir=run_dir, backend=backend)
        runners.append(runner)
        return runner, acceptor

    yield make
    for runner in runners:
        runner.stop()


def test_requests_over_real_leases(real: Callable[..., Any]) -> None:
    proxy, acceptor = real(sessions=2)
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for i in range(20):
            r = client.post(f"/echo?i={i}", content=b"x" * i)
            assert r.status_code == 200 and r.json()["body"] == "x" * i
    assert len(proxy.backend.requests) == 20
    # Sticky leases: the worker kept what it was granted, nothing broke or retired.
    held = proxy.call(lambda: len(proxy.pool.held))
    assert 1 <= held <= 2
    assert acceptor.registered() == 2


def test_idle_retire_reaches_the_acceptor(real: Callable[..., Any], raw_client: Raw) -> None:
    proxy, acceptor = real(sessions=2)
    c = raw_client(proxy.port)
    c.send(b"GET /retire-idle HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200
    # The worker saw RETIRE on an idle held session, called pool.lost, told the acceptor.
    wait_for(lambda: acceptor.registered() == 1, what="retired session gone")
    c.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200


def test_retire_before_response_is_served(real: Callable[..., Any], raw_client: Raw) -> None:
    proxy, acceptor = real(sessions=2)
    c = raw_client(proxy.port)
    c.send(b"GET /retire-before HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.read_response()
    assert r.status == 200 and r.body == b"after retire"
    wait_for(lambda: acceptor.registered() == 1, what="retired session gone")


def test_dead_session_502_then_service_continues(real: Callable[..., Any], raw_client: Raw) -> None:
    proxy, acceptor = real(sessions=2)
    c = raw_client(proxy.port)
    c.send(b"POST /die HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert c.read_response().status == 502
    wait_for(lambda: acceptor.registered() == 1, what="broken session dropped")
    c.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    assert c.read_response().status == 200


def test_pool_rejections_are_503(real: Callable[..., Any], raw_client: Raw) -> None:
    proxy, _ = real(sessions=1, max_waiting=1)
    proxy.backend.gate.clear()
    holder = raw_client(proxy.port)
    holder.send(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)
    waiter = raw_client(proxy.port)
    started = time.monotonic()
    waiter.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: proxy.pool.waiting == 1)
    full = raw_client(proxy.port)
    full.send(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
    r = full.read_response()
    assert r.status == 503 and r.header("retry-after") == "2"  # queue_full
    r = waiter.read_response()
    assert r.status == 503 and time.monotonic() - started >= 0.25  # queue timeout
    proxy.backend.gate.set()
    assert holder.read_response().status == 200
    assert proxy.stats.unavailable == {"queue_full": 1, "timeout": 1, "draining": 0}


def test_client_leaving_the_queue_frees_its_place(
    real: Callable[..., Any], raw_client: Raw
) -> None:
    proxy, _ = real(sessions=1, max_waiting=1)
    proxy.backend.gate.clear()
    holder = raw_client(proxy.port)
    holder.send(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: len(proxy.pool.busy) == 1)
    waiter = raw_client(proxy.port)
    waiter.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert proxy.wait_for(lambda: proxy.pool.waiting == 1)
    waiter.close()
    assert proxy.wait_for(lambda: proxy.pool.waiting == 0)
    proxy.backend.gate.set()
    assert holder.read_response().status == 200
    assert len(proxy.backend.requests) == 1  # the abandoned request never reached the service
