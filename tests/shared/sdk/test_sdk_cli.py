"""``backdial serve`` / ``backdial bridge`` as real child processes.

Each test starts ``python -m backdial.sdk.main ...`` (the console script may
not be installed yet) against ``sdkpeer.FakeAcceptor``, which stands in for
the acceptor built in parallel: a real listening socket answering the
registration per ``backdial.wire`` and then writing real HTTP requests onto
the sessions, as the proxy will.  Every child is killed at teardown.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from tests.shared.sdk.sdkpeer import (
    ROOT,
    Child,
    FakeAcceptor,
    Procs,
    build_request,
    procs,
    run,
)

__all__ = ["procs"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.timeout(90)


async def _peer() -> FakeAcceptor:
    peer = FakeAcceptor()
    await peer.start()
    return peer


async def _admin(child: Child) -> str:
    """The base URL of a child's ``--admin 127.0.0.1:0`` endpoint, once it is up."""
    line = await child.wait_line("admin endpoint on")
    match = re.search(r"http://[\d.]+:\d+", line)
    assert match is not None
    return match.group(0)


async def _wait_snapshot(url: str, predicate: Callable[[dict[str, int]], bool]) -> None:
    """Wait until the child's session counters (``GET /v1/sessions``) satisfy *predicate*."""
    async with httpx.AsyncClient(base_url=url) as client, asyncio.timeout(10):
        while not predicate((await client.get("/v1/sessions")).json()):
            pass


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BACKDIAL_")}
    full_env["PYTHONPATH"] = str(ROOT / "src")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "backdial.sdk.main", *args],
        cwd=str(ROOT),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_over_sessions_with_defaults(procs: Procs) -> None:
    async def main() -> None:
        peer = await _peer()
        child = procs.start("serve", "backdial.demo:app", "--register", peer.url, "--sessions", "3")
        await peer.wait_idle(3)
        pre = peer.preambles[0]
        assert pre.service == "backdial.demo"
        assert pre.instance == f"{socket.gethostname()}-{child.pid}"
        who = json.loads((await peer.request("GET", "/whoami")).body)
        assert who["instance"] == pre.instance and who["client"] is None
        for _ in range(50):
            assert (await peer.request()).status == 200
        child.signal(signal.SIGTERM)
        assert await child.wait_exit() == 0
        assert peer.session_counter == 3 and peer.retires == 3
        await peer.stop()
        peer.cleanup()

    run(main())


def test_env_settings_and_flags_win(procs: Procs) -> None:
    async def main() -> None:
        peer = await _peer()
        env = {
            "BACKDIAL_REGISTER": peer.url,
            "BACKDIAL_SESSIONS": "2",
            "BACKDIAL_SERVICE": "from-env",
            "BACKDIAL_TOKEN": "tok-env",
        }
        child = procs.start("serve", "backdial.demo:app", "--service", "from-flag", env=env)
        await peer.wait_idle(2)
        assert {(p.service, p.token) for p in peer.preambles} == {("from-flag", "tok-env")}
        child.signal(signal.SIGINT)
        assert await child.wait_exit() == 0
        await peer.stop()
        peer.cleanup()

    run(main())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "backdial.demo:app"], "need --register"),
        (["serve", "backdial.demo:app", "--register", "http://x"], "scheme must be"),
        (["serve", "backdial.demo:app", "--register", "unix:///x", "--sessions", "x"], "integer"),
        (["serve", "backdial.demo:app", "--register", "unix:///x", "--sessions", "-2"], "0.."),
        (["serve", "backdial.demo", "--listen", "127.0.0.1:1"], "MODULE:APP"),
        (["serve", "no.such.module:app", "--listen", "127.0.0.1:1"], "cannot import"),
        (["serve", "tests.shared.sdk.sdkapps:not_callable", "--listen", "127.0.0.1:1"], "callable"),
        (["serve", "backdial.demo:app", "--listen", "nohostport"], "HOST:PORT"),
        (
            ["serve", "backdial.demo:app", "--listen", "127.0.0.1:1", "--register", "unix:///x"],
            "mutually exclusive",
        ),
        (["serve", "backdial.demo:app", "--register", "unix:///x", "--service", "a b"], "invalid"),
        (["bridge", "--target", "ftp://x", "--register", "unix:///x"], "http://HOST:PORT"),
        (["bridge", "--register", "unix:///x"], "--target"),
    ],
)
def test_config_errors_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    result = _cli(*args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"backdial {args[0]}: error:") and message in lines[0]


def test_help_is_accurate() -> None:
    for command in ("serve", "bridge"):
        result = _cli(command, "--help")
        assert result.returncode == 0
        for flag in ("--register", "--sessions", "--service", "--instance", "--token"):
            assert flag in result.stdout
    assert "--listen" in _cli("serve", "--help").stdout
    assert "--target" in _cli("bridge", "--help").stdout


def test_auth_refusal_exits_1_with_clear_error(procs: Procs) -> None:
    async def main() -> None:
        peer = await _peer()
        peer.refuse_always = "auth"
        child = procs.start("serve", "backdial.demo:app", "--register", peer.url, "--token", "bad")
        assert await child.wait_exit() == 1
        assert "error: acceptor refused registration: auth" in child.stderr
        assert len(peer.preambles) == 1
        await peer.stop()
        peer.cleanup()

    run(main())


def test_lifespan_startup_failure_exits_1(procs: Procs) -> None:
    async def main() -> None:
        child = procs.start(
            "serve", "tests.shared.sdk.sdkapps:failing_startup", "--listen", "127.0.0.1:0"
        )
        assert await child.wait_exit() == 1
        assert "lifespan startup failed: database unreachable" in child.stderr

    run(main())


def test_sigterm_drain_finishes_in_flight_request(procs: Procs) -> None:
    async def main() -> None:
        peer = await _peer()
        child = procs.start(
            "serve", "backdial.demo:app", "--register", peer.url, "--sessions", "3",
            "--drain-timeout", "10",
        )  # fmt: skip
        await peer.wait_idle(3)
        leased = await peer.lease()
        started = time.monotonic()
        pending = asyncio.create_task(leased.exchange(build_request("GET", "/delay?ms=800")))
        # The request is in the app (the demo's own count; /stats counts itself too).
        async with asyncio.timeout(10):
            while json.loads((await peer.request("GET", "/stats")).body)["in_flight"] < 2:
                pass
        child.signal(signal.SIGTERM)
        resp = await pending
        assert resp.status == 200 and resp.body == b"slept 800 ms\n"
        assert resp.closed, "the drained session answers with Connection: close"
        assert await child.wait_exit() == 0
        assert time.monotonic() - started < 5
        assert peer.retires == 2  # the two idle sessions
        await peer.stop()
        peer.cleanup()

    run(main())


def test_signals_change_capacity(procs: Procs) -> None:
    async def main() -> None:
        peer = await _peer()
        child = procs.start(
            "serve", "backdial.demo:app", "--register", peer.url, "--sessions", "2",
            "--admin", "127.0.0.1:0",
        )  # fmt: skip
        admin = await _admin(child)
        await peer.wait_idle(2)
        child.signal(signal.SIGUSR1)
        await peer.wait_idle(3)
        child.signal(signal.SIGUSR1)
        await peer.wait_idle(4)
        child.signal(signal.SIGUSR2)
        await peer.wait_for(lambda: peer.retires == 1 and len(peer.idle) == 3)
        # The service itself is at 3 of 3: it will not dial a replacement for the retired one.
        await _wait_snapshot(admin, lambda s: s["target"] == 3 and s["open"] == 3)
        assert len(peer.idle) == 3 and peer.session_counter == 4
        child.signal(signal.SIGTERM)
        assert await child.wait_exit() == 0
        await peer.stop()
        peer.cleanup()

    run(main())


def test_reconnects_after_acceptor_restart(procs: Procs) -> None:
    async def main() -> None:
        peer = await _peer()
        child = procs.start(
            "serve", "backdial.demo:app", "--register", peer.url, "--sessions", "4",
            "--admin", "127.0.0.1:0",
        )  # fmt: skip
        admin = await _admin(child)
        await peer.wait_idle(4)
        await peer.stop()
        # Several redials fail with ENOENT meanwhile, with backoff (logged once).
        await _wait_snapshot(admin, lambda s: s["dial_failures"] >= 4)
        await peer.start()
        await peer.wait_idle(4, within=10)
        assert (await peer.request()).status == 200
        assert child.stderr.count("cannot register") == 1, child.stderr
        child.signal(signal.SIGTERM)
        assert await child.wait_exit() == 0
        await peer.stop()
        peer.cleanup()

    run(main())


def test_listen_mode_with_httpx(procs: Procs) -> None:
    async def main() -> None:
        child = procs.start("serve", "backdial.demo:app", "--listen", "127.0.0.1:0")
        line = await child.wait_line("listening on http://")
        url = re.search(r"http://[\d.]+:\d+", line)
        assert url is not None
        async with httpx.AsyncClient(base_url=url.group(0)) as client:
            r = await client.get("/")
            assert r.status_code == 200 and r.text == "hello from backdial\n"
            r = await client.post("/echo", content=b"abc", headers={"content-type": "t/x"})
            assert r.content == b"abc" and r.headers["content-type"] == "t/x"
        child.signal(signal.SIGTERM)
        assert await child.wait_exit() == 0

    run(main())


def test_admin_flag(procs: Procs) -> None:
    async def main() -> None:
        peer = await _peer()
        child = procs.start(
            "serve", "backdial.demo:app", "--register", peer.url, "--sessions", "1",
            "--admin", "127.0.0.1:0",
        )  # fmt: skip
        admin = await _admin(child)
        await peer.wait_idle(1)
        async with httpx.AsyncClient(base_url=admin) as client:
            assert (await client.get("/v1/sessions")).json()["open"] == 1
            assert (await client.put("/v1/sessions", content=b"3")).status_code == 200
            await peer.wait_idle(3)
            assert (await client.get("/v1/sessions")).json() == {
                "target": 3,
                "open": 3,
                "in_flight": 0,
                "dial_failures": 0,
            }
        child.signal(signal.SIGTERM)
        assert await child.wait_exit() == 0
        await peer.stop()
        peer.cleanup()

    run(main())


def test_demo_max_concurrency_equals_sessions(procs: Procs) -> None:
    """Six concurrent slow requests over four sessions: the app never sees more than four."""

    async def main() -> None:
        peer = await _peer()
        child = procs.start("serve", "backdial.demo:app", "--register", peer.url, "--sessions", "4")
        await peer.wait_idle(4)
        assert (await peer.request("POST", "/stats/reset")).status == 200
        delays = [peer.request("GET", "/delay?ms=250") for _ in range(6)]
        assert all(r.status == 200 for r in await asyncio.gather(*delays))
        stats = json.loads((await peer.request("GET", "/stats")).body)
        assert stats["max_concurrency"] == 4
        assert stats["requests"] == 7 and stats["in_flight"] == 1
        child.signal(signal.SIGTERM)
        assert await child.wait_exit() == 0
        await peer.stop()
        peer.cleanup()

    run(main())


def test_bridge_relays_to_a_plain_http_server(procs: Procs) -> None:
    async def main() -> None:
        upstream = procs.start("serve", "backdial.demo:app", "--listen", "127.0.0.1:0")
        line = await upstream.wait_line("listening on http://")
        target = re.search(r"http://[\d.]+:\d+", line)
        assert target is not None
        peer = await _peer()
        bridge = procs.start(
            "bridge", "--target", target.group(0), "--register", peer.url, "--sessions", "2"
        )
        await peer.wait_idle(2)
        assert peer.preambles[0].service == "default"
        resp = await peer.request("GET", "/")
        assert resp.status == 200 and resp.body == b"hello from backdial\n"
        body = os.urandom(200_000)
        resp = await peer.request("POST", "/echo", {"content-type": "app/bin"}, body)
        assert resp.status == 200 and resp.body == body
        assert resp.headers["content-type"] == "app/bin"
        resp = await peer.request("POST", "/echo", {}, b"chunked request body", chunked=True)
        assert resp.body == b"chunked request body"
        resp = await peer.request("GET", "/stream?chunks=100&size=1000")
        assert len(resp.body) == 100_000
        assert (await peer.request("GET", "/status/404")).status == 404
        assert (await peer.request("GET", "/status/204")).status == 204
        clients = set()
        for _ in range(20):
            who = json.loads((await peer.request("GET", "/whoami", {"x-trace": "t1"})).body)
            assert who["headers"]["x-trace"] == "t1"
            assert who["headers"]["host"] == "backdial.test"
            clients.add(tuple(who["client"]))
        assert len(clients) <= 2, "one kept-alive upstream connection per session"
        bridge.signal(signal.SIGTERM)
        assert await bridge.wait_exit() == 0
        upstream.signal(signal.SIGTERM)
        assert await upstream.wait_exit() == 0
        await peer.stop()
        peer.cleanup()

    run(main())


def test_bridge_answers_502_when_upstream_is_down(procs: Procs) -> None:
    async def main() -> None:
        with socket.socket() as s:  # a port with nothing listening
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        peer = await _peer()
        bridge = procs.start(
            "bridge", "--target", f"http://127.0.0.1:{port}", "--register", peer.url
        )
        await peer.wait_idle(1)
        resp = await peer.request("GET", "/")
        assert resp.status == 502 and not resp.closed
        assert (await peer.request("GET", "/")).status == 502
        assert peer.session_counter == 1, "a 502 does not cost the session"
        bridge.signal(signal.SIGTERM)
        assert await bridge.wait_exit() == 0
        await peer.stop()
        peer.cleanup()

    run(main())
