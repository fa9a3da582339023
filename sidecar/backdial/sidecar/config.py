"""The sidecar's settings: ``ProxySettings`` are one listener's limits and timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Limits and timeouts of one listener (sizes in bytes, times in seconds)."""

    max_request_body: int = 1 << 20  # buffered before a lease is taken
    max_request_body_stream: int = 64 << 20  # hard cap; between the two the body streams
    max_header_bytes: int = 64 << 10  # request head; beyond it 431
    response_buffer: int = 1 << 20  # response bytes held in memory for a slow client
    # Beyond response_buffer, response bytes go to a temporary file (spool.SpoolFile) so the
    # session is released at session speed; 0 disables it (back-pressure holds the session).
    response_spill_max: int = 1 << 30  # per connection, bytes parked and not yet sent
    response_spill_total: int = 4 << 30  # every connection of one worker together
    spill_dir: str = ""  # directory of the spill files ("": $TMPDIR, else /tmp)
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
