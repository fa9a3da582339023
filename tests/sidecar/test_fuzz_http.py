"""Fuzzing the proxy's HTTP head and chunk parsing, and the session's response parsing.

The client side runs the real ``ClientProtocol`` (httptools + ``request.py``)
on an event loop; only the transport is a recorder and the lease pool refuses
every request, so what is fuzzed is exactly what a client's bytes reach.
Requests are generated from a grammar of the fields that matter for framing
(and their malformed variants: huge and negative lengths, chunk sizes such as
``7FFFFFFFFFFFFFFF``, bare LF, obs-fold, NUL, conflicting framing, pipelining)
and delivered in random splits.  Properties:

* nothing escapes ``data_received``;
* every request the proxy would write to a session is one strictly valid
  HTTP/1.1 request with exactly one ``Host``, no ``Transfer-Encoding`` and a
  ``Content-Length`` equal to its body (no smuggling downstream);
* every byte the client gets back is a sequence of valid HTTP/1.1 responses;
* after the connection, every budget and gauge is back to zero.

The session side runs ``SessionConn`` on random response bytes: it either
delivers one response or fails the request, never raises.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httptools
from hypothesis import example, given
from hypothesis import strategies as st

from backdial.control import Rejection
from backdial.policy import Policy
from backdial.sidecar.config import ProxySettings
from backdial.sidecar.lease import Lease, Ticket
from backdial.sidecar.proxy import make_protocol_factory
from backdial.sidecar.sessionconn import SessionConn
from backdial.sidecar.stats import ProxyStats

LOOP = asyncio.new_event_loop()


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closing = True

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0  # takes everything at once

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class _RefusingPool:
    """Every request waits, then is refused: the proxy's output towards sessions is kept."""

    def __init__(self) -> None:
        self.policy = Policy()
        self.wires: list[bytes] = []

    def try_acquire(self, service: str, slice_name: str) -> None:
        return None

    def wait(self, service: str, slice_name: str, waiter: Any) -> Ticket:
        r = waiter._active
        self.wires.append(r.wire)
        LOOP.call_soon(waiter.lease_refused, Rejection.QUEUE_FULL, 1)
        return Ticket(waiter, (service, slice_name), 0.0, 0.0)

    def cancel(self, ticket: Ticket) -> None:
        ticket.active = False

    def release(self, conn: Any, state: Any) -> None:
        return None

    def lost(self, conn: Any, state: Any) -> None:
        return None


class _Message:
    """httptools callbacks collecting messages (requests or responses) in order."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.cur: dict[str, Any] = {}

    def on_message_begin(self) -> None:
        self.cur = {"headers": [], "body": b"", "done": False}
        self.messages.append(self.cur)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur["headers"].append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.cur["body"] += body

    def on_message_complete(self) -> None:
        self.cur["done"] = True


def _strict_requests(raw: bytes) -> list[dict[str, Any]]:
    sink = _Message()
    try:
        httptools.HttpRequestParser(sink).feed_data(raw)  # raises on anything not strict
    except httptools.HttpParserUpgrade as exc:  # a tunnelled upgrade: the head must be all
        assert int(exc.args[0]) == len(raw)
    return sink.messages


async def _drive(chunks: list[bytes], settings: ProxySettings) -> tuple[_RefusingPool, bytes]:
    pool = _RefusingPool()
    stats = ProxyStats()
    factory, state = make_protocol_factory(pool, settings, stats)  # type: ignore[arg-type]
    proto = factory()
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        if transport.closing or transport.paused:
            break  # a real transport stops delivering: the rest is never read
        proto.data_received(chunk)
        for _ in range(3):
            await asyncio.sleep(0)  # refusals, hand-offs
    for _ in range(3):
        await asyncio.sleep(0)
    proto.connection_lost(None)
    await state.shutdown(0)
    assert stats.request_memory.used == 0 and stats.request_disk.used == 0
    assert stats.response_memory.used == 0
    assert stats.connections_active == 0 and stats.requests_active == 0
    return pool, bytes(transport.out)


# -- the request grammar ------------------------------------------------------------------
# Mostly well-formed, so requests get through to the pool; each rarer variant is one of
# the malformations that smuggling and framing attacks are made of.
def _mostly(good: list[bytes], bad: list[bytes], weight: int = 12) -> st.SearchStrategy[bytes]:
    return st.sampled_from(good * weight + bad)


_METHODS = _mostly([b"GET", b"POST", b"PUT", b"HEAD"], [b"OPTIONS", b"CONNECT", b"G T", b""], 8)
_TARGETS = _mostly([b"/", b"/a?b=c"], [b"*", b"http://h.example/x", b"//x", b"/%00", b""], 20)
_VERSIONS = _mostly([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 "], 20)
_EOL = _mostly([b"\r\n"], [b"\n", b"\r", b"\r\r\n"], 150)
_SEP = _mostly([b": "], [b":", b" : ", b":\t"], 40)
_FOLD = _mostly([b""], [b"\r\n x"], 100)
_NUMBERS = _mostly(
    [b"0", b"1", b"5", b"42"], [b"-1", b"1, 1", b" 3", b"0x10", b"99999999999999999999", b"+4"], 3
)
_CHUNK_SIZES = _mostly(
    [b"1", b"5", b"a", b"1f"],
    [b"7FFFFFFFFFFFFFFF", b"FFFFFFFFFFFFFFFFF", b"-1", b"1;ext=1", b" 1", b"g", b"0"],
    2,
)
_HOSTS = _mostly([b"a", b"a:80", b"[::1]"], [b"", b"a b", b"a@b"], 6)
_HEADERS = st.one_of(
    st.tuples(st.just(b"Host"), _HOSTS),
    st.tuples(st.just(b"Content-Length"), _NUMBERS),
    st.tuples(
        st.just(b"Transfer-Encoding"),
        _mostly([b"chunked"], [b"gzip, chunked", b"chunked, gzip", b"Chunked", b"identity"], 4),
    ),
    st.tuples(st.just(b"Connection"), st.sampled_from([b"close", b"keep-alive", b"upgrade, x"])),
    st.tuples(st.just(b"Expect"), st.sampled_from([b"100-continue", b"nope"])),
    st.tuples(st.just(b"Upgrade"), st.sampled_from([b"websocket", b"h2c"])),
    st.tuples(
        st.sampled_from([b"X-Forwarded-For", b"Forwarded", b"X-Real-IP", b"X-Tier"]),
        st.sampled_from([b"10.0.0.1", b"for=1.2.3.4", b"x"]),
    ),
    st.tuples(st.binary(min_size=1, max_size=6), st.binary(max_size=8)),
)


@st.composite
def _chunked(draw: Any) -> bytes:
    out = b""
    for size in draw(st.lists(_CHUNK_SIZES, max_size=4)):
        try:
            n = int(size.split(b";")[0], 16)
        except ValueError:
            n = 3
        n = min(max(n, 0), 40)
        out += size + draw(_EOL) + b"x" * n + draw(_EOL)
    out += b"0" + draw(_EOL)
    if draw(st.booleans()):
        out += b"X-Trailer: t" + draw(_EOL)
    return out + draw(_EOL)


@st.composite
def _request(draw: Any) -> bytes:
    line = draw(_METHODS) + b" " + draw(_TARGETS) + b" " + draw(_VERSIONS) + draw(_EOL)
    fields = draw(st.lists(_HEADERS, max_size=3))
    if draw(st.integers(0, 9)):  # usually exactly one Host, first
        fields.insert(0, (b"Host", draw(_HOSTS)))
    # Usually coherent framing (so bodies get through), sometimes anything at all.
    framing = draw(st.sampled_from(["none", "length", "chunked", "chunked", "raw"]))
    if framing == "length":
        body = draw(st.binary(max_size=60))
        fields.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        body = draw(_chunked())
        fields.append((b"Transfer-Encoding", b"chunked"))
    else:
        body = draw(st.binary(max_size=60)) if framing == "raw" else b""
    head = line
    for name, value in draw(st.permutations(fields)):
        head += name + draw(_SEP) + value + draw(_FOLD) + draw(_EOL)
    return head + draw(_EOL) + body


@st.composite
def _stream(draw: Any) -> list[bytes]:
    data = b"".join(draw(st.lists(_request(), min_size=1, max_size=3)))
    return _split(data, draw(st.lists(st.integers(0, len(data)), max_size=4)))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    """*data* as reads cut at *cuts*."""
    pieces, last = [], 0
    for cut in [*sorted(cuts), len(data)]:
        if cut > last:
            pieces.append(data[last:cut])
            last = cut
    return pieces


def _check(chunks: list[bytes]) -> None:
    pool, out = LOOP.run_until_complete(_drive(chunks, ProxySettings(tick=3600)))
    for wire in pool.wires:
        messages = _strict_requests(wire)
        assert len(messages) == 1 and messages[0]["done"], wire
        headers = messages[0]["headers"]
        names = [n for n, _ in headers]
        assert names.count(b"host") == 1, wire
        assert b"transfer-encoding" not in names, wire
        lengths = [int(v) for n, v in headers if n == b"content-length"]
        assert lengths in ([], [len(messages[0]["body"])]), wire
        assert not lengths or lengths[0] > 0 or messages[0]["body"] == b""
    if out and b"HEAD" not in b"".join(chunks):  # a HEAD answer's length is not its body
        responses = _Message()
        parser = httptools.HttpResponseParser(responses)
        parser.feed_data(out)  # every byte the client got is valid HTTP/1.1
        assert all(m["done"] for m in responses.messages[:-1])


H2C = b"GET / HTTP/1.0\r\nConnection: upgrade, x\r\nUpgrade: h2c\r\n\r\n"


@given(_stream())
@example([b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n7FFFFFFFFFFFFFFF\r\nx"])
@example([b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"])
@example([b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"])
@example([b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n", b"Host: b\r\n\r\n"])
@example([b"GET / HTTP/1.1\r\nHost: a\r\n\r\nHEAD / HTTP/1.1\r\nHost: a\r\n\r\n"])
# found: a request after an h2c upgrade made data_received raise
@example(
    [b"GET / HTTP/1.0\r\nConnection: upgrade, x\r\nUpgrade: h2c\r\n\r\nGET / HTTP/1.1\r\n\r\n"]
)
@example([b"GET / HTTP/1.0\r\nConnection: upgrade, x\r\nUpgrade: websocket\r\n\r\n"])
def test_client_bytes_from_a_grammar(chunks: list[bytes]) -> None:
    _check(chunks)


@given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=4))
def test_client_bytes_at_random(chunks: list[bytes]) -> None:
    _check(chunks)


# -- the session side: responses ---------------------------------------------------------------
class _Sink:
    def __init__(self) -> None:
        self.events: list[str] = []

    def resp_head(self, *args: Any) -> None:
        self.events.append("head")

    def resp_interim(self, *args: Any) -> None:
        self.events.append("interim")

    def resp_body(self, data: bytes) -> None:
        self.events.append("body")

    def resp_flush(self) -> None:
        return None

    def resp_done(self, state: Any) -> None:
        self.events.append("done")

    def resp_failed(self, started: bool) -> None:
        self.events.append("failed")

    def upstream_writable(self, writable: bool) -> None:
        return None


_RESPONSES = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda status, headers, body: b"HTTP/1.1 " + status + b"\r\n" + headers + b"\r\n" + body,
        st.sampled_from([b"200 OK", b"204 X", b"101 S", b"103 E", b"999 Z", b"2000 X", b"OK"]),
        st.sampled_from([b"Content-Length: 2\r\n", b"Transfer-Encoding: chunked\r\n", b"",
                         b"Content-Length: 7FFFFFFFFFFFFFFF\r\n", b"Connection: close\r\n"]),
        st.sampled_from([b"ok", b"2\r\nok\r\n0\r\n\r\n", b"7FFFFFFFFFFFFFFF\r\nx", b"",
                         b"BDREG/1 RETIRE\r\n"]),
    ),
)  # fmt: skip


@given(_RESPONSES, st.integers(0, 300), st.booleans())
def test_session_response_bytes(raw: bytes, cut: int, head_only: bool) -> None:
    a, b = socket.socketpair()
    b.close()
    pool = type("P", (), {"lost": lambda self, conn, state: None})()
    conn = SessionConn(Lease(1, "s", "default", 1, a), pool, max_head=256)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    a.close()
    sink = _Sink()
    assert conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, head_only, False)  # type: ignore[arg-type]
    for piece in (raw[:cut], raw[cut:]):
        if piece:
            conn.data_received(piece)
    conn.eof_received()
    ends = [e for e in sink.events if e in ("done", "failed")]
    assert len(ends) <= 1  # a request ends once, either way
    assert "head" not in sink.events[sink.events.index(ends[0]) + 1 :] if ends else True


@st.composite
def _valid_chunked(draw: Any) -> tuple[list[bytes], bytes]:
    parts = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5))
    body = b"".join(
        b"%x%s\r\n%s\r\n" % (len(p), draw(st.sampled_from([b"", b";a=b", b";x"])), p) for p in parts
    )
    body += b"0\r\n" + draw(st.sampled_from([b"", b"T: 1\r\n"])) + b"\r\n"
    data = (
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    return _split(data, draw(st.lists(st.integers(0, len(data)), max_size=6))), b"".join(parts)


@given(_valid_chunked())
def test_valid_chunked_bodies_are_never_refused_whatever_the_splits(
    case: tuple[list[bytes], bytes],
) -> None:
    """The chunk-size scan (chunkscan.py) follows llhttp exactly on what llhttp accepts."""
    chunks, body = case
    pool, _ = LOOP.run_until_complete(_drive(chunks, ProxySettings(tick=3600)))
    assert len(pool.wires) == 2  # both requests reached the pool: no false 413
    assert _strict_requests(pool.wires[0])[0]["body"] == body
