"""``backdial.sdk.Service`` against a real registration peer, in one process.

The peer (``sdkpeer.FakeAcceptor``) stands in for the acceptor built in
parallel: real UNIX/TCP sockets, the exact ``backdial.wire`` registration
exchange, and real HTTP/1.1 requests written onto the registered sessions the
way the proxy does.  These tests cover registration (OK and every ERR code),
keep-alive, chunked bodies, capacity changes under load with zero failed
requests, the RETIRE race, drain, reconnect with backoff, the raw-handler
API, lifespan and the admin endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import pytest
from tests.shared.sdk.sdkpeer import FakeAcceptor, PeerResponse, build_request, run

from backdial import demo
from backdial.sdk import (
    Backoff,
    ListenServer,
    RegistrationRejected,
    Request,
    Response,
    Service,
)
from backdial.sdk.admin import admin_app

pytestmark = pytest.mark.timeout(60)


async def _peer(tcp: bool = False) -> FakeAcceptor:
    peer = FakeAcceptor(tcp=tcp)
    await peer.start()
    return peer


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_registration_ok_and_preamble(tcp: bool) -> None:
    async def main() -> None:
        peer = await _peer(tcp)
        svc = Service(
            demo.app,
            register=peer.url,
            sessions=3,
            service="shop",
            instance="pod-1",
            slice="mobile",
            token="s3cret",
        )
        await svc.start()
        async with asyncio.timeout(5):
            await svc.wait_sessions(3)
        await peer.wait_idle(3)
        assert svc.sessions == 3 and svc.target == 3 and svc.in_flight == 0
        assert {p.service for p in peer.preambles} == {"shop"}
        assert {(p.instance, p.slice, p.token) for p in peer.preambles} == {
            ("pod-1", "mobile", "s3cret")
        }
        resp = await peer.request("GET", "/")
        assert resp.status == 200 and resp.body == b"hello from backdial\n"
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


@pytest.mark.parametrize("code", ["version", "malformed", "too-long", "auth"])
def test_fatal_err_codes_stop_the_service(code: str) -> None:
    async def main() -> None:
        peer = await _peer()
        peer.refuse_always = code
        svc = Service(demo.app, register=peer.url, sessions=2)
        await svc.start()
        with pytest.raises(RegistrationRejected) as info:
            async with asyncio.timeout(5):
                await svc.wait_closed()
        assert info.value.code == code
        assert svc.fatal_error is info.value
        assert svc.sessions == 0
        await svc.drain(1)  # returns once the dialing task is gone: nothing can dial after
        assert len(peer.preambles) == 1, "a fatal refusal must not be retried"
        await peer.stop()
        peer.cleanup()

    run(main())


@pytest.mark.parametrize("code", ["limit", "draining", "timeout"])
def test_transient_err_codes_are_retried(code: str) -> None:
    # ``timeout`` included: an acceptor whose loop stalled must not make services exit.
    async def main() -> None:
        peer = await _peer()
        peer.refusals.extend([code] * 4)
        svc = Service(demo.app, register=peer.url, sessions=2, backoff=Backoff(0.01, 0.05))
        await svc.start()
        async with asyncio.timeout(5):
            await svc.wait_sessions(2)
        assert len(peer.preambles) == 6  # 4 refused + 2 accepted
        assert svc.fatal_error is None
        assert (await peer.request()).status == 200
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


def test_keep_alive_many_requests_and_chunked_bodies() -> None:
    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=2)
        await svc.start()
        await peer.wait_idle(2)
        for i in range(400):
            resp = await peer.request("GET", "/" if i % 2 else "/whoami")
            assert resp.status == 200 and not resp.closed
        body = bytes(range(256)) * 40
        resp = await peer.request(
            "POST", "/echo", {"content-type": "application/x-test"}, body, chunked=True
        )
        assert resp.status == 200 and resp.body == body
        assert resp.headers["content-type"] == "application/x-test"
        resp = await peer.request("GET", "/stream?chunks=50&size=100")
        assert resp.headers.get("transfer-encoding") == "chunked"
        assert resp.body == (b"x" * 99 + b"\n") * 50
        assert peer.session_counter == 2, "keep-alive: no session was replaced"
        assert not peer.protocol_errors
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


def test_capacity_changes_under_load_fail_nothing() -> None:
    """The peer sends requests continuously while set_sessions moves the target."""

    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=4)
        await svc.start()
        await peer.wait_idle(4)
        results: list[PeerResponse] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                target = "/delay?ms=3" if (i + n) % 3 == 0 else "/"
                i += 1
                try:
                    results.append(await peer.request("GET", target, within=10))
                except BaseException as exc:
                    failures.append(exc)
                    return

        clients = [asyncio.create_task(client(n)) for n in range(6)]
        for target in (8, 2, 6, 1, 5, 0, 3, 4):
            await svc.set_sessions(target)
            # Each capacity is reached and carries load (at 0, clients wait for the next).
            await peer.wait_for(lambda t=target: svc.sessions == t and len(peer.idle) <= t)
            served = len(results)
            if target:
                await peer.wait_for(lambda n=served: len(results) >= n + 20)
        served = len(results)
        await peer.wait_for(lambda: len(results) >= served + 50)
        stop.set()
        await asyncio.gather(*clients)
        assert not failures, failures
        assert len(results) > 100
        assert all(r.status == 200 for r in results)
        assert peer.retires > 0, "idle sessions are retired with RETIRE"
        async with asyncio.timeout(5):
            await peer.wait_for(lambda: len(peer.idle) == 4 and svc.retiring == 0)
        assert svc.sessions == 4
        assert not peer.protocol_errors
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


def test_request_racing_retire_is_answered() -> None:
    """A proxy leases a session just as the service retires it: the request still succeeds."""

    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=1)
        await svc.start()
        await peer.wait_idle(1)
        leased = await peer.lease()
        await svc.set_sessions(0)
        await peer.wait_for(lambda: leased.retired)  # RETIRE arrived on the leased session
        resp = await leased.exchange(build_request("GET", "/whoami"))
        assert resp.status == 200 and resp.saw_retire
        assert resp.closed and resp.headers["connection"] == "close"
        async with asyncio.timeout(5):
            await leased.eof.wait()  # the service closed it after answering
        await peer.wait_for(lambda: svc.retiring == 0)
        assert svc.sessions == 0
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


def test_busy_session_is_retired_by_connection_close() -> None:
    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=2)
        await svc.start()
        await peer.wait_idle(2)
        busy = await peer.lease()
        pending = asyncio.create_task(busy.exchange(build_request("GET", "/delay?ms=300")))
        await peer.wait_for(lambda: svc.in_flight == 1)
        await svc.set_sessions(1)  # idle session must go first
        await peer.wait_for(lambda: peer.retires == 1)
        assert not busy.retired
        await svc.set_sessions(0)  # now the busy one
        resp = await pending
        assert resp.status == 200 and resp.closed and not resp.saw_retire
        await peer.wait_for(lambda: svc.retiring == 0 and svc.sessions == 0)
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


def test_drain_lets_in_flight_finish() -> None:
    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=3)
        await svc.start()
        await peer.wait_idle(3)
        busy = await peer.lease()
        pending = asyncio.create_task(busy.exchange(build_request("GET", "/delay?ms=400")))
        await peer.wait_for(lambda: svc.in_flight == 1)
        clean = await svc.drain(5)
        assert clean
        resp = await pending
        assert resp.status == 200 and resp.body == b"slept 400 ms\n" and resp.closed
        assert peer.retires == 2 and svc.sessions == 0 and svc.retiring == 0
        assert not peer.connections
        await peer.stop()
        peer.cleanup()

    run(main())


def test_drain_timeout_forces_exit() -> None:
    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=1)
        await svc.start()
        await peer.wait_idle(1)
        busy = await peer.lease()
        pending = asyncio.create_task(busy.exchange(build_request("GET", "/delay?ms=5000")))
        await peer.wait_for(lambda: svc.in_flight == 1)
        assert not await svc.drain(0.3)
        with pytest.raises(ConnectionError):
            await pending
        await peer.stop()
        peer.cleanup()

    run(main())


def test_reconnects_after_acceptor_restart(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=3, backoff=Backoff(0.02, 0.2))
        await svc.start()
        await peer.wait_idle(3)
        await peer.stop()  # crash: listener gone, socket file gone, sessions reset
        await peer.wait_for(lambda: svc.sessions == 0)
        # Several failed redials (ENOENT) meanwhile, logged once.
        await peer.wait_for(lambda: svc.dial_failures >= 4)
        assert svc.sessions == 0 and svc.fatal_error is None
        await peer.start()
        async with asyncio.timeout(5):
            await svc.wait_sessions(3)
        await peer.wait_idle(3)
        assert (await peer.request()).status == 200
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    with caplog.at_level(logging.INFO, logger="backdial.sdk"):
        run(main())
    unreachable = [r for r in caplog.records if "cannot register" in r.getMessage()]
    lost = [r for r in caplog.records if "session closed by the acceptor" in r.getMessage()]
    assert len(unreachable) == 1, "an outage is logged once, not per retry"
    assert len(lost) == 1, "losing every session at once is logged once"


def test_backoff_is_capped_full_jitter() -> None:
    b = Backoff(0.05, 2.0, rng=lambda: 1.0)
    ceilings = [b.next() for _ in range(10)]
    assert ceilings[:4] == [0.05, 0.1, 0.2, 0.4]
    assert max(ceilings) == 2.0
    b.reset()
    assert b.next() == 0.05
    zero = Backoff(0.05, 2.0, rng=lambda: 0.0)
    assert zero.next() == 0.0


def test_raw_handler_api() -> None:
    seen: list[Request] = []

    async def handler(req: Request) -> Response:
        seen.append(req)
        body = f"{req.method} {req.target} {req.header('x-test')} {len(req.body)}".encode()
        return Response(201, {"content-type": "text/plain"}, body)

    async def main() -> None:
        peer = await _peer()
        svc = Service(handler, register=peer.url, sessions=1)
        await svc.start()
        await peer.wait_idle(1)
        resp = await peer.request("POST", "/a/b?x=1", {"X-Test": "yes"}, b"12345", chunked=True)
        assert resp.status == 201
        assert resp.body == b"POST /a/b?x=1 yes 5"
        assert seen[0].path == "/a/b" and seen[0].query == "x=1" and seen[0].body == b"12345"
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


def test_lifespan_runs_around_sessions() -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    events.append("startup")
                    scope["state"]["db"] = "connected"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = scope["state"]["db"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def main() -> None:
        peer = await _peer()
        svc = Service(app, register=peer.url, sessions=1)
        await svc.start()
        assert events == ["startup"]
        await peer.wait_idle(1)
        assert (await peer.request()).body == b"connected"
        await svc.drain(5)
        assert events == ["startup", "shutdown"]
        await peer.stop()
        peer.cleanup()

    run(main())


def test_admin_endpoint_reads_and_sets_target() -> None:
    async def main() -> None:
        peer = await _peer()
        svc = Service(demo.app, register=peer.url, sessions=2)
        await svc.start()
        await peer.wait_idle(2)
        admin = ListenServer(admin_app(svc), "127.0.0.1", 0, lifespan=False)
        await admin.start()
        base = f"http://127.0.0.1:{admin.bound_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            got = (await client.get("/v1/sessions")).json()
            assert got == {"target": 2, "open": 2, "in_flight": 0, "dial_failures": 0}
            put = await client.put("/v1/sessions", content=b"5")
            assert put.status_code == 200 and put.json()["target"] == 5
            await peer.wait_idle(5)
            assert (await client.get("/v1/sessions")).json()["open"] == 5
            assert (await client.put("/v1/sessions", content=b"-1")).status_code == 400
            assert (await client.put("/v1/sessions", json={"target": 1})).json()["target"] == 1
            assert (await client.delete("/v1/sessions")).status_code == 405
            # Browser-borne PUTs (DNS rebinding, cross-site) cannot change capacity.
            for headers in ({"Host": "rebind.evil.example"}, {"Origin": "http://evil.example"}):
                refused = await client.put("/v1/sessions", content=b"0", headers=headers)
                assert refused.status_code == 403
            assert (await client.get("/v1/sessions")).json()["target"] == 1
        await peer.wait_for(lambda: len(peer.idle) == 1)
        await admin.shutdown(1)
        assert await svc.drain(5)
        await peer.stop()
        peer.cleanup()

    run(main())


def test_unexpected_bytes_after_ok_are_served() -> None:
    """A request written in the same segment as the OK reply is not lost."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got_request = loop.create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"BDREG/1 OK session=1 registrant=1\r\n" + build_request("GET", "/"))
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(20)
            got_request.set_result(head + body)
            with contextlib.suppress(Exception):
                await reader.read()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        svc = Service(demo.app, register=f"tcp://127.0.0.1:{port}", sessions=1)
        await svc.start()
        raw = await got_request
        assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"hello from backdial\n")
        await svc.drain(1)
        server.close()

    run(main())
