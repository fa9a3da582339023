"""Typed states of one client connection: its deadline and why reading is paused.

``proxy.ClientProtocol`` keeps one of each (and an ``http1.BodyMode`` for the
response being relayed).  Hot code compares members bound to module constants
once, at the end of this module (attribute access on an enum class costs
about 0.1 us on Python 3.11; a global lookup a fifth of that): the client
protocol's modules import them by name, so each stays one global lookup.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from backdial.control import ReleaseState
from backdial.http1 import BodyMode, ConnMode


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


# Members bound once; compared per read and per request (see the module docstring).
T_NONE: Final = Deadline.NONE
T_IDLE: Final = Deadline.IDLE
T_REQUEST: Final = Deadline.REQUEST
T_UPSTREAM: Final = Deadline.UPSTREAM
T_SEND: Final = Deadline.SEND
T_TUNNEL: Final = Deadline.TUNNEL
P_PIPELINE: Final = PauseReason.PIPELINE
P_BODY: Final = PauseReason.BODY
P_UPSTREAM: Final = PauseReason.UPSTREAM
P_DEAD: Final = PauseReason.DEAD
P_ACQUIRE: Final = PauseReason.ACQUIRE
M_LENGTH: Final = BodyMode.LENGTH
M_CHUNK: Final = BodyMode.CHUNK
M_EOF: Final = BodyMode.EOF
M_NONE: Final = BodyMode.NONE
M_TUNNEL: Final = BodyMode.TUNNEL
C_KEEP: Final = ConnMode.KEEP
C_CLOSE: Final = ConnMode.CLOSE
C_KEEP_10: Final = ConnMode.KEEP_10
R_IDLE: Final = ReleaseState.IDLE
R_BROKEN: Final = ReleaseState.BROKEN
