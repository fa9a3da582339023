"""The demo app (``backdial.demo:app``) served in-process on the SDK's HTTP core."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from tests.shared.sdk.sdkpeer import run

from backdial import demo
from backdial.sdk import ListenServer

pytestmark = pytest.mark.timeout(60)


def test_demo_routes_and_max_concurrency() -> None:
    async def main() -> None:
        server = ListenServer(demo.app, "127.0.0.1", 0)
        await server.start()
        limits = httpx.Limits(max_connections=10)
        url = f"http://127.0.0.1:{server.bound_port}"
        async with httpx.AsyncClient(base_url=url, limits=limits) as client:
            assert (await client.post("/stats/reset")).json()["requests"] == 0
            slow = [
                client.get("/delay", params={"ms": 300, "group": "g" if i < 2 else ""})
                for i in range(5)
            ]
            replies = await asyncio.gather(*slow)
            assert [r.text for r in replies] == ["slept 300 ms\n"] * 5
            stats = (await client.get("/stats")).json()
            groups = {"g": {"in_flight": 0, "max_concurrency": 2}}
            assert stats == {"requests": 6, "in_flight": 1, "max_concurrency": 5, "groups": groups}
            reset = (await client.post("/stats/reset")).json()
            groups = {"g": {"in_flight": 0, "max_concurrency": 0}}
            assert reset == {"requests": 0, "in_flight": 1, "max_concurrency": 1, "groups": groups}
            for _ in range(3):
                await client.get("/")
            assert (await client.get("/stats")).json()["max_concurrency"] == 1

            assert (await client.get("/status/418")).status_code == 418
            assert (await client.get("/status/abc")).status_code == 400
            assert (await client.get("/nope")).status_code == 404
            assert (await client.get("/echo")).status_code == 405
            r = await client.get("/stream", params={"chunks": 3, "size": 4})
            assert r.content == b"xxx\n" * 3
            who = (await client.get("/whoami", headers={"x-forwarded-for": "10.0.0.7"})).json()
            assert who["headers"]["x-forwarded-for"] == "10.0.0.7"
            assert who["client"][0] == "127.0.0.1"
        await server.shutdown(2)

    run(main())
