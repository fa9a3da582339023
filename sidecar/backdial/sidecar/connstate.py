"""Typed states of one client connection: its deadline and why reading is paused.

``proxy.ClientProtocol`` keeps one of each (and an ``http1.BodyMode`` for the
response being relayed).  Hot code binds the members it
compares to module constants once (attribute access on an enum class costs
about 0.1 us on Python 3.11; a global lookup a fifth of that).
"""

from __future__ import annotations

from enum import IntEnum


class Deadline(IntEnum):
    """Which timeout the connection's single deadline stands for."""

    NONE = 0
    IDLE = 1  # keep-alive connection between requests: client_idle_timeout
    REQUEST = 2  # receiving a request (or a streamed body): request_timeout
    UPSTREAM = 3  # waiting for (more of) the response: upstream_timeout
    SEND = 4  # client not reading while a lease streams to it: send_timeout
    TUNNEL = 5  # upgraded connection idle in both directions: client_idle_timeout


class PauseReason(IntEnum):
    """Why reading from the client is paused; a bit set, reading resumes when all clear.

    Stored as a plain ``int`` (``reasons | PauseReason.BODY``): an ``IntFlag``
    would build a new flag object on every operation.
    """

    PIPELINE = 1  # max_pipeline parsed requests wait behind the one being served
    BODY = 2  # a body over max_request_body waits for its turn to stream
    UPSTREAM = 4  # the session's write buffer is full (streamed body, tunnel)
    DEAD = 8  # nothing more is parsed (error, or bytes after an upgrade request)
    ACQUIRE = 16  # a streaming body waits for its session
