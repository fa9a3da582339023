"""The native engine decides what the Python path decides, on the same bytes.

The engine serves only a strict subset of requests itself (``head.rs``) and hands the
rest to the Python path.  These properties keep that subset honest against the
installed llhttp and ``request.py``, on the fuzzing grammar of ``test_fuzz_http.py``:

* a head the engine takes is one strict llhttp parses and ``Request.check_head``
  accepts, and the engine writes exactly the upstream head ``Request.build_head`` would
  (keep-alive and routing host alike);
* a response the engine relays is the response ``SessionConn`` reads: same status,
  reason, fields and body for the client, and the session goes back in the same state;
  a response it refuses, ``SessionConn`` does not take as valid either, except the
  documented stricter cases (a transfer coding other than ``chunked``, a status outside
  100-599);
* routes and slices are the ``Classifier``'s, regular expressions included.
"""

from __future__ import annotations

import re
import socket
from typing import Any

import httptools
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from backdial.control import ReleaseState
from backdial.policy import policy_from_data
from backdial.sidecar.classify import Classifier, parse_ip
from backdial.sidecar.lease import Lease
from backdial.sidecar.request import HttpError, Request
from backdial.sidecar.sessionconn import SessionConn
from tests.sidecar.test_fuzz_http import _RESPONSES, _request, _Transport
from tests.sidecar.test_request import _Collect as _RequestCollect

engine = pytest.importorskip("backdial_engine", reason="the native engine is not installed")

FWD = b"Via: 1.1 backdial\r\nX-Forwarded-Proto: http\r\nForwarded: for=10.1.2.3;proto=http\r\n"
XFF = b"X-Forwarded-For: 10.1.2.3\r\n"


# -- requests ------------------------------------------------------------------------------
class _Collect(_RequestCollect):
    """``test_request``'s collector, with the body counted as ``ClientProtocol`` counts it."""

    def __init__(self) -> None:
        super().__init__(max_body=1 << 26)
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.r.body_len += len(body)

    def on_message_complete(self) -> None:
        self.done = True


def _python(raw: bytes) -> tuple[bytes, bytes, bool] | None:
    """(upstream head, routing host, keep-alive) as the Python path has them; None: refused."""
    c = _Collect()
    try:
        c.parser.feed_data(raw)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if not c.done:
        return None
    return c.r.build_head(FWD, XFF, "10.1.2.3"), c.host, c.r.keep_alive


def _check_request(raw: bytes) -> None:
    got = engine.recognise(raw, FWD, XFF)
    if got is None:
        return  # handed to the Python path: always allowed
    length, wire, host, keep = got
    body = 0
    for line in raw[:length].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            body = int(line.split(b":", 1)[1])
    if len(raw) < length + body:
        return  # the body is not all here: the engine hands the request over
    try:
        python = _python(raw[: length + body])
    except HttpError:
        python = None
    assert python is not None, f"the engine took a head the Python path refuses: {raw!r}"
    assert (wire, host, keep) == python, raw


COMMON = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a/b?c=d HTTP/1.1\r\nHost: Example.COM:8080\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"PUT /x HTTP/1.1\r\nHost: [::1]:80\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"DELETE /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\r\n",
]


@pytest.mark.parametrize("raw", COMMON)
def test_common_requests_are_served_natively_as_python_forwards_them(raw: bytes) -> None:
    assert engine.recognise(raw, FWD, XFF) is not None
    _check_request(raw)


@given(_request())
@settings(max_examples=400)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX: a  \r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\nabcdefg")
def test_a_head_the_engine_takes_is_one_python_accepts_and_forwards_alike(raw: bytes) -> None:
    _check_request(raw)


@given(st.binary(max_size=120))
def test_random_bytes_are_never_taken_unless_valid(raw: bytes) -> None:
    _check_request(b"GET / HTTP/1.1\r\nHost: a\r\n" + raw)


# -- responses -----------------------------------------------------------------------------
class _Sink:
    def __init__(self) -> None:
        self.head: tuple[int, bytes, list[bytes]] | None = None
        self.body = b""
        self.end = ""

    def resp_head(self, status: int, reason: bytes, lines: list[bytes], *_: Any) -> None:
        self.head = (status, reason, list(lines))  # later trailer fields are not sent

    def resp_interim(self, *args: Any) -> None:
        return None

    def resp_body(self, data: bytes) -> None:
        self.body += data

    def resp_flush(self) -> None:
        return None

    def resp_done(self, state: ReleaseState) -> None:
        self.end = state.value

    def resp_failed(self, started: bool) -> None:
        self.end = "fail"

    def upstream_writable(self, writable: bool) -> None:
        return None


def _session(reads: list[bytes], head_only: bool) -> _Sink:
    a, b = socket.socketpair()
    b.close()
    pool = type("P", (), {"lost": lambda self, conn, state: None})()
    conn = SessionConn(Lease(1, "s", "default", 1, a), pool)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    a.close()
    sink = _Sink()
    assert conn.start(b"GET / HTTP/1.1\r\n\r\n", sink, head_only, False)  # type: ignore[arg-type]
    for piece in reads:
        if piece and not sink.end:
            conn.data_received(piece)
    if not sink.end:
        conn.eof_received()
    return sink


class _Client:
    """The client's view of what the engine wrote: the final response."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_message_begin(self) -> None:
        self.fields, self.body, self.reason = [], b"", b""

    def on_body(self, body: bytes) -> None:
        self.body += body


def _client_view(out: bytes, head_only: bool) -> tuple[int, bytes, list[bytes], bytes]:
    c = _Client()
    p = httptools.HttpResponseParser(c)
    if head_only:  # no body follows a HEAD answer, whatever its length says
        out = out[: out.rindex(b"\r\n\r\n") + 4] if b"\r\n\r\n" in out else out
        p.feed_data(out)
    else:
        p.feed_data(out)
    framing = (b"transfer-encoding", b"connection")
    lines = [b"%s: %s\r\n" % (n, v) for n, v in c.fields if n.lower() not in framing]
    return p.get_status_code(), c.reason, lines, c.body


def _stricter(raw: bytes) -> bool:
    """Responses llhttp takes and the engine refuses on purpose (docs/engine.md)."""
    statuses = re.findall(rb"HTTP/1\.[01] (\d{3})", raw)
    return any(not 100 <= int(code) <= 599 for code in statuses) or bool(
        re.search(rb"(?i)transfer-encoding:[ \t]*(?!chunked[ \t]*\r)", raw)
    )


def _check_response(reads: list[bytes], head_only: bool) -> None:
    out, outcome = engine.relay_response(reads, head_only, False, True, True)
    python = _session(reads, head_only)
    raw = b"".join(reads)
    if outcome == "fail":
        assert python.end in ("fail", "broken") or _stricter(raw), raw
        return
    assert python.end != "fail", raw
    if head_only and outcome.split("+")[0] != python.end and b"\r\n\r\n" in raw:
        # After the answer to HEAD, SessionConn judges what follows by the last four
        # bytes of the read that ended the head, the engine by the bytes themselves: they
        # differ when a body follows or the blank line is split over reads.
        rest = raw.split(b"\r\n\r\n", 1)[1]
        retire = b"BDREG/1 RETIRE\r\n"
        closing = raw.startswith((b"HTTP/1.0", b"BDREG")) or b"onnection: close" in raw
        if rest == retire or (closing and rest == b""):
            truth = "retired"
        elif not closing and retire.startswith(rest):
            truth = "idle"
        else:
            truth = "broken"
        assert outcome.split("+")[0] == truth, raw
        return
    if not (outcome == "broken" and python.end in ("idle", "retired") and b"B" in raw):
        # (SessionConn takes what follows a response for a RETIRE prefix from the read's
        # last "B" on, which may lie in the body; the engine looks at the bytes after it.)
        assert outcome.split("+")[0] == python.end, raw
    assert python.head is not None
    status, reason, lines, body = _client_view(out, head_only)
    assert (status, reason, lines, body) == (*python.head, python.body), raw


VALID = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"6;x=y\r\nhello \r\n5\r\nworld\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\nBDREG/1 RETIRE\r\n",
    b"BDREG/1 RETIRE\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
]


@pytest.mark.parametrize("raw", VALID)
@pytest.mark.parametrize("head_only", [False, True])
def test_common_responses_are_relayed_as_sessionconn_reads_them(
    raw: bytes, head_only: bool
) -> None:
    for cut in range(0, len(raw), 7):
        _, outcome = engine.relay_response([raw[:cut], raw[cut:]], head_only, False, True, True)
        assert outcome != "fail", (raw, cut)
        _check_response([raw[:cut], raw[cut:]], head_only)


@given(_RESPONSES, st.integers(0, 300), st.booleans())
@settings(max_examples=300)
def test_a_response_the_engine_relays_is_the_one_sessionconn_reads(
    raw: bytes, cut: int, head_only: bool
) -> None:
    _check_response([raw[:cut], raw[cut:]], head_only)


# -- classification ----------------------------------------------------------------------------
POLICY = policy_from_data(
    {
        "routes": [
            {"name": "api", "service": "api", "host": "API.example.com", "pathPrefix": "/v1"},
            {"name": "any", "service": "web", "pathPrefix": "/"},
            {"name": "deep", "service": "deep", "pathPrefix": "/v1/deep"},
        ],
        "defaultService": "fallback",
        "slices": [
            {"name": "mobile", "share": 20, "match": {"userAgent": "(?i)android|iphone"}},
            {
                "name": "lan",
                "share": 20,
                "match": [{"cidrs": ["10.0.0.0/8", "fd00::/8"]}, {"pathPrefixes": ["/lan"]}],
            },
            {"name": "tagged", "share": 20, "match": {"headers": {"X-Tier": r"^gold\d*$"}}},
            {"name": "empty", "share": 20, "match": {"headers": {"X-None": "^$"}}},
            {"name": "default", "share": 20},
        ],
    },
    "parity policy",
)


@pytest.fixture(scope="module")
def configured() -> Any:
    from backdial.sidecar.config import ProxySettings
    from backdial.sidecar.nativepool import configure_engine
    from backdial.sidecar.nativeproxy import engine_settings

    e = engine.Engine(engine_settings(ProxySettings()))
    queues = {s.name: (s, 10) for s in POLICY.slices}
    assert configure_engine(e, POLICY, queues)
    return e


@given(
    host=st.sampled_from([b"api.example.com", b"API.EXAMPLE.COM:443", b"web", b"other"]),
    path=st.sampled_from([b"/", b"/v1", b"/v1/deep/x", b"/lan/1", b"/v10?q"]),
    ua=st.sampled_from([None, b"Mozilla (iPhone)", b"ANDROID", b"curl"]),
    tier=st.sampled_from([None, b"gold", b"gold42", b"silver", b"gold x"]),
    peer=st.sampled_from(["10.1.2.3", "192.168.1.1", "::ffff:10.9.9.9", "fd00::5", "::1"]),
    none=st.sampled_from([None, b"", b"x"]),
)
def test_routes_and_slices_are_the_classifiers(
    configured: Any,
    host: bytes,
    path: bytes,
    ua: bytes | None,
    tier: bytes | None,
    peer: str,
    none: bytes | None,
) -> None:
    head = b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
    for name, value in ((b"User-Agent", ua), (b"X-Tier", tier), (b"X-None", none)):
        if value is not None:
            head += name + b": " + value + b"\r\n"
    head += b"\r\n"
    got = configured.classify(head, peer)
    c = _Collect()
    c.r = Request(Classifier(POLICY).wanted, 65536)
    c.parser.feed_data(head)
    cls = Classifier(POLICY)
    route_path = c.r.url.split(b"?")[0]
    expected = (
        cls.service(c.host, route_path),
        cls.slice(parse_ip(peer), c.r.hv, route_path),
    )
    assert got == expected
