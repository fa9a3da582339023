"""A service killed mid-request: the sidecar answers, and the client's connection lives on.

The 30-minute soak run (docs/reliability.md) had client timeouts right after
service kills: each was the request *after* a 502, on the same keep-alive
connection.  The 502 was for a large POST whose spooled body was being written
to the killed service's session; that full session had paused reading the
client, and nothing resumed it.  Here the real ``backdial serve`` demo app is
killed with ``SIGKILL`` while one request's body is still being fed to it (the
app does not read it, so the session's buffers fill up) and another is written
whole and waiting for its answer.  Both must be answered ``502`` (POST: never
retried, invariant 4) within the sidecar's own timeouts, and both connections
must serve their next request.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import signal

import pytest

from tests.helpers import get_json, wait_for
from tests.stack.conftest import Stack

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT = 20.0  # far below upstream_timeout (60 s): a hang fails here


def _post(conn: http.client.HTTPConnection, body: bytes) -> int:
    # /delay sleeps without reading the body: the service stops reading its session.
    conn.request("POST", "/delay?ms=60000", body=body)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_service_killed_mid_request_answers_and_keeps_the_connection(stack: Stack) -> None:
    stack.start(sessions=2)
    feeding = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=CLIENT_TIMEOUT)
    waiting = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=CLIENT_TIMEOUT)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            big = pool.submit(_post, feeding, b"f" * (8 << 20))  # spooled: over 1 MiB
            small = pool.submit(_post, waiting, b"small body")
            # Both are on the service's sessions, and the big body is not all written:
            # part of it is still in the sidecar's spool file.
            wait_for(
                lambda: (
                    get_json(stack.sidecar_url("/v1/state"))["busy"] == 2
                    and stack.sidecar_metric("backdial_sidecar_request_spooled_bytes") > 0
                ),
                what="both requests on sessions, the big body still being fed",
            )
            # A second instance takes over, then the first one dies with both requests.
            stack.service("b", 2)
            wait_for(lambda: stack.registered() == 4, what="4 sessions")
            stack.services[0].stop(sig=signal.SIGKILL)
            assert big.result() == 502
            assert small.result() == 502
        # The connections are still good: the next request on each is served.
        for conn in (feeding, waiting):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"hello from backdial\n")
    finally:
        feeding.close()
        waiting.close()
    assert stack.sidecar_metric("backdial_sidecar_request_spooled_bytes") == 0
