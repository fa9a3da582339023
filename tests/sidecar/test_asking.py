"""A request that may not wait, while its ASK is not answered yet (control revision 3).

With ``maxWaiting: 0`` a request the worker cannot serve from an idle session asks the
acceptor for one now.  The acceptor answers at once unless the only usable session is
held idle by another worker: then it asks that worker back first (RECALL ``now``), and
the request stays asking until the probe is answered.  Here that other worker is a raw
control peer built from docs/protocol.md, so the test decides when the answer comes.

Whatever happens to the asking request meanwhile — its client goes away (a reset), its
queue timeout passes, or the pool closes (``503`` ``draining``) — nothing leaks: the
session the answer brings is kept idle (it serves the next request with no new ASK), no
asking or waiting request is left, and the acceptor holds no ask.  Runs on the engine
under test (on the native engine the request is an asking waiter inside the engine,
its connection never handed over).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

import pytest

from backdial import control
from backdial.control import Rejection
from tests.acceptor.conftest import RawWorker
from tests.sidecar.conftest import TIMEOUT, ProxyRunner, RawClient

GET = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"


def state(proxy: ProxyRunner) -> tuple[int, int, int, int]:
    """(idle sessions, asking, waiting requests in the worker, asks at the acceptor), read
    in the proxy's loop (``wait_for`` predicates run there)."""
    pool = proxy.pool
    idle = sum(len(ring) for ring in pool.idle.values())
    asking = sum(pool.asking_counts().values())
    assert proxy.acceptor is not None
    return idle, asking, pool.waiting, len(proxy.acceptor.ledger.asks)


def ask_behind_a_probe(
    proxy: ProxyRunner, raw_client: Callable[[int], RawClient]
) -> tuple[RawWorker, int, RawClient]:
    """Another worker holds the only session idle; a request to the proxy asks, and the
    acceptor asks that worker back and waits for its answer (the test gives it).
    Returns (the other worker, the session, the asking request's client)."""
    assert proxy.wait_for(lambda: proxy.pool.acceptor_revision >= control.ASK_REVISION)
    # Another worker takes the only session and keeps it idle.
    other = RawWorker(proxy.run_dir)
    other.send(control.Hello(os.getpid(), "other", control.REVISION))
    other.recv(control.ConfigMsg)
    other.send(control.Ask("", "default", 1))
    grant, fds = other.recv(control.Grant)
    assert isinstance(grant, control.Grant) and len(fds) == 1
    os.close(fds[0])  # the acceptor keeps its own descriptor
    session = grant.leases[0].session

    # The proxy's request asks; the acceptor asks the other worker back and waits.
    client = raw_client(proxy.port)
    client.send(GET)
    probe, _ = other.recv(control.Recall)
    assert isinstance(probe, control.Recall) and probe.now
    assert proxy.wait_for(lambda: state(proxy)[1] == 1), proxy.call(lambda: state(proxy))
    return other, session, client


@pytest.mark.parametrize("ending", ["client_gone", "timeout"])
def test_an_asking_request_that_ends_before_its_answer_leaks_nothing(
    make_proxy: Callable[..., ProxyRunner],
    raw_client: Callable[[int], RawClient],
    ending: str,
) -> None:
    timeout = 30.0 if ending == "client_gone" else 0.3
    proxy = make_proxy(pool={"sessions": 1, "max_waiting": 0, "queue_timeout": timeout})

    other, session, client = ask_behind_a_probe(proxy, raw_client)

    if ending == "client_gone":
        # Reset, not a FIN: a half-closed client may still read its response.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert proxy.wait_for(lambda: state(proxy)[1] == 0), proxy.call(lambda: state(proxy))
    else:
        response = client.read_response()
        assert response.status == 503 and response.header("retry-after") is not None
        assert proxy.wait_for(lambda: proxy.stats.unavailable[Rejection.TIMEOUT] == 1)
        client.close()

    # The answer comes after all: the session is granted for the ask nobody waits for any
    # more, and stays idle in the proxy's worker; nothing else is left.
    other.send(control.Release([control.Released(session, control.ReleaseState.IDLE)], 1))
    assert proxy.wait_for(lambda: state(proxy) == (1, 0, 0, 0)), proxy.call(lambda: state(proxy))
    assert proxy.stats.unavailable[Rejection.QUEUE_FULL] == 0

    # It serves the next request at once, without asking again.
    assert proxy.acceptor is not None
    counters = proxy.acceptor.counters
    asked = dict(counters.asks)
    again = raw_client(proxy.port)
    again.send(GET)
    assert again.read_response().status == 200
    assert proxy.wait_for(lambda: state(proxy) == (1, 0, 0, 0)), proxy.call(lambda: state(proxy))
    assert dict(counters.asks) == asked == {"granted": 2}
    other.close()


def test_an_asking_request_is_refused_when_the_pool_closes(
    make_proxy: Callable[..., ProxyRunner], raw_client: Callable[[int], RawClient]
) -> None:
    proxy = make_proxy(pool={"sessions": 1, "max_waiting": 0, "queue_timeout": 30.0})
    other, session, client = ask_behind_a_probe(proxy, raw_client)

    closing = asyncio.run_coroutine_threadsafe(proxy.pool.close(5.0), proxy.loop)
    response = client.read_response()
    assert response.status == 503 and response.header("retry-after") is not None
    closing.result(TIMEOUT)
    assert proxy.stats.unavailable[Rejection.DRAINING] == 1
    assert proxy.call(lambda: state(proxy)[1:3]) == (0, 0)

    # The worker is gone: its ask goes with it, and the session answering the probe is
    # idle at the acceptor again.
    other.send(control.Release([control.Released(session, control.ReleaseState.IDLE)], 1))
    assert proxy.acceptor is not None
    ledger = proxy.acceptor.ledger
    assert proxy.wait_for(lambda: not ledger.asks and ledger.sessions[session].worker == 0)
    other.close()
