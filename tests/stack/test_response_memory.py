"""Many slow readers of large responses: the sidecar's memory stays within its budget (issue 12).

Each client connection may buffer ``--response-buffer`` (1 MiB) of response for
its client, so without a worker-wide budget N slow readers cost N MiB of RSS.
With ``--response-memory-total`` the bytes beyond it go to spill files while
the sessions keep being read at their own speed: every response still leaves
its session before any client reads (the sessions are free), the sidecar's
RSS grows by about the budget, and every client gets its whole response.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.stack.conftest import Stack

pytestmark = pytest.mark.slow

READERS = 16
CHUNKS, CHUNK = 96, 65536  # 6 MiB each: more than the kernel's socket buffers take
BUDGET = 2 << 20
FLOOR = 16 << 10  # clientout.MEMORY_FLOOR: a connection's share whatever the budget
_BLOCK = b"x" * (CHUNK - 1) + b"\n"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _expected(offset: int, n: int) -> bytes:
    """Bytes offset..offset+n of the demo's stream: each chunk is x...x followed by a newline."""
    start = offset % CHUNK
    return (_BLOCK * ((start + n) // CHUNK + 1))[start : start + n]


def _read_body(sock: socket.socket) -> int:
    """Read one chunked response to its end, checking every byte; the number of body bytes."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1 << 20)
        assert data, "closed before the head"
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    buf, total = bytearray(rest), 0
    while True:
        while b"\r\n" not in buf:
            data = sock.recv(1 << 20)
            assert data, f"truncated after {total} bytes"
            buf += data
        line, _, rest = bytes(buf).partition(b"\r\n")
        size = int(line, 16)
        buf = bytearray(rest)
        while len(buf) < size + 2:
            data = sock.recv(1 << 20)
            assert data, f"truncated after {total} bytes"
            buf += data
        assert bytes(buf[:size]) == _expected(total, size) and buf[size : size + 2] == b"\r\n"
        total += size
        del buf[: size + 2]
        if size == 0:
            return total


def test_slow_readers_of_large_responses_stay_within_the_memory_budget(stack: Stack) -> None:
    # 16 requests share 2 sessions: they queue (for as long as the machine needs).
    stack.config_path.write_text("slices: [{name: default, share: 100, queue: {timeout: 60s}}]\n")
    stack.restart_acceptor()
    stack.service("main", 2)
    wait_for(lambda: stack.registered() == 2, what="2 sessions")
    stack.restart_sidecar(extra=("--response-memory-total", str(BUDGET)))
    pid = stack.sidecar.pid
    before = _rss(pid)
    readers = []
    try:
        for _ in range(READERS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.connect(("127.0.0.1", stack.port))
            sock.settimeout(30)
            sock.sendall(
                b"GET /stream?chunks=%d&size=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (CHUNKS, CHUNK)
            )
            readers.append(sock)
        # Nobody reads, yet every response leaves its session (2 sessions, 16 requests):
        # the slow readers hold no session.
        wait_for(
            lambda: (
                stack.sidecar_metric("backdial_sidecar_requests_total", slice="default", code="200")
                == READERS
            ),
            timeout=60,
            what="every response drained from its session",
        )
        assert stack.sidecar_metric("backdial_sidecar_leases_busy") == 0
        buffered = stack.sidecar_metric("backdial_sidecar_response_buffered_bytes")
        assert buffered <= BUDGET + READERS * FLOOR
        assert stack.sidecar_metric("backdial_sidecar_response_spilled_bytes") > 0
        assert stack.sidecar_metric("backdial_sidecar_response_memory_full_total") > 0
        # Without the budget each connection keeps up to 1 MiB: 16 MiB here.
        assert _rss(pid) - before < 8 << 20
        for sock in readers:
            assert _read_body(sock) == CHUNKS * CHUNK
    finally:
        for sock in readers:
            sock.close()
    wait_for(
        lambda: stack.sidecar_metric("backdial_sidecar_response_buffered_bytes") == 0,
        what="response memory given back",
    )
    assert stack.sidecar_metric("backdial_sidecar_response_spilled_bytes") == 0
