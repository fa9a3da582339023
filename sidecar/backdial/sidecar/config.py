"""The sidecar's settings: ``ProxySettings`` are one listener's limits and timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Limits and timeouts of one listener (sizes in bytes, times in seconds)."""

    max_request_body: int = 1 << 20  # per request, kept in memory before a lease is taken
    max_request_body_stream: int = 64 << 20  # hard cap; between the two: spooled (or streamed)
    # Request bodies held by all connections of one worker (spool.py): in memory up to
    # request_memory_total, then in temp files up to request_spool_total; beyond both a
    # fast 503.  request_spool_total = 0 turns spooling off: bodies over max_request_body
    # then stream under a lease, as the session's back-pressure allows.
    request_memory_total: int = 64 << 20
    request_spool_total: int = 1 << 30
    # A body must keep arriving at body_min_rate bytes/s, measured over each
    # body_rate_window once request_timeout has passed (like mod_reqtimeout MinRate); else 408.
    body_min_rate: int = 1024
    body_rate_window: float = 10.0
    # Descriptors kept free for sessions, the control connection, spool files and admin:
    # client connections beyond the process limit minus this get a fast 503 (liveness.py).
    fd_reserve: int = 128
    max_header_bytes: int = 64 << 10  # request head; beyond it 431
    response_buffer: int = 1 << 20  # response bytes held in memory for a slow client
    # Beyond response_buffer, response bytes go to a temporary file (spool.SpoolFile) so the
    # session is released at session speed; 0 disables it (back-pressure holds the session).
    response_spill_max: int = 1 << 30  # per connection, bytes parked and not yet sent
    response_spill_total: int = 4 << 30  # every connection of one worker together
    spill_dir: str = ""  # spill and spool files: responses and request bodies ("": $TMPDIR)
    upstream_timeout: float = 60.0  # response must start (and keep flowing) within this; else 504
    client_idle_timeout: float = 75.0  # idle keep-alive client connection
    drain_idle_grace: float = 1.0  # on graceful stop, idle connections may send one more request
    request_timeout: float = 30.0  # receiving one request (head + buffered body); else 408
    send_timeout: float = 60.0  # a client that reads nothing while a lease streams to it
    proxy_protocol: bool = False  # expect a PROXY v1/v2 header on every connection
    # CIDRs whose PROXY header address and X-Forwarded-For/Forwarded/X-Real-IP are believed;
    # from anyone else those are replaced by the connecting address (realip.py).
    trusted_proxies: tuple[str, ...] = ()
    via: str = "backdial"  # pseudonym in "Via: 1.1 <via>"
    forwarded_proto: str = "http"  # X-Forwarded-Proto / Forwarded proto=
    max_retries: int = 2  # idempotent requests whose session failed before any response byte
    max_pipeline: int = 16  # parsed requests queued per connection before reading pauses
    tick: float = 0.25  # timeout sweep granularity
