"""``/v1/app-probe`` with real processes: the rewritten app probes test the app itself."""

from __future__ import annotations

import concurrent.futures
from urllib.parse import quote

import pytest

from tests.helpers import get_json, http_get, wait_for
from tests.stack.conftest import Stack
from tests.stack.test_stack import request

pytestmark = pytest.mark.slow


def probe(stack: Stack, query: str) -> tuple[int, str]:
    status, body, _ = http_get(stack.sidecar_url(f"/v1/app-probe?{query}"))
    return status, body.decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_app_probe_answers_for_the_app(stack: Stack, workers: int) -> None:
    stack.start(sessions=0, workers=workers)
    wait_for(lambda: http_get(stack.sidecar_url("/healthz"))[0] == 200, what="sidecar admin")
    assert probe(stack, "path=%2F") == (503, "no session registered\n")
    assert probe(stack, "tcp=1")[0] == 503
    stack.service("main", 2)
    wait_for(lambda: probe(stack, "tcp=1")[0] == 200, what="sessions registered")
    assert probe(stack, "path=" + quote("/", safe="")) == (200, "app answered 200\n")
    # The probe's path reaches the app: its status decides.
    assert probe(stack, "path=" + quote("/status/500", safe="")) == (503, "app answered 500\n")
    assert probe(stack, "path=" + quote("/status/302", safe=""))[0] == 200
    assert probe(stack, "path=" + quote("/x y", safe=""))[0] == 503
    stack.services[0].stop()
    wait_for(lambda: probe(stack, "tcp=1")[0] == 503, what="app gone")


def test_app_probe_does_not_queue_behind_clients(stack: Stack) -> None:
    stack.start(sessions=1, config="slices: [{name: default, share: 100, queue: {timeout: 10s}}]\n")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(request, stack.port, "/delay?ms=1500") for _ in range(2)]
        # One request served (its session busy) and one queued: the acceptor's waiting
        # count alone is also 1 while the first request still waits for its grant.
        wait_for(
            lambda: (
                stack.metric("backdial_requests_waiting", service="demo", slice="default") == 1
                and get_json(stack.sidecar_url("/v1/state"))["busy"] == 1
            ),
            what="one request served and one queued",
        )
        status, text = probe(stack, "path=%2F")
        assert (status, text) == (200, "all 1 held sessions busy serving\n")
        assert [f.result()[0] for f in slow] == [200, 200]
