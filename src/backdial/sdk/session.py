"""A dialed session: registration handshake, then the HTTP/1.1 server core.

The protocol writes the preamble as soon as the connection exists and reads
exactly one reply line.  Bytes after that line already belong to HTTP (a
proxy may write a request the moment the acceptor says OK), so they are fed
to the parser rather than dropped.

Retiring obeys the invariant that no in-flight or just-leased request fails:

* idle session: write ``RETIRE_LINE`` and keep reading; a request that still
  arrives (leased just before the acceptor saw the line) is answered with
  ``Connection: close``; the session ends when the acceptor closes it (EOF).
* busy session: its response goes out with ``Connection: close`` and the
  socket closes after it.  If the response head had already left with
  keep-alive, the session is retired by the line once it is idle again.

The acceptor may also retire an idle session (its cap shrank): it writes the
same line and closes; the session closes without treating it as a request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from backdial import wire

from .connection import HttpProtocol, ServerState
from .registration import (
    FATAL_CODES,
    RegistrationError,
    RegistrationRefused,
    RegistrationRejected,
)

# An idle session's first bytes are a request line, which never starts like this.
_ACCEPTOR_RETIRE = wire.RETIRE_LINE[:8]


class SessionOwner(Protocol):
    """What a session reports to (implemented by ``Service``)."""

    def session_registered(self, session: SessionProtocol) -> None: ...

    def session_closed(self, session: SessionProtocol) -> None: ...


class SessionProtocol(HttpProtocol):
    def __init__(
        self,
        state: ServerState,
        owner: SessionOwner,
        preamble: bytes,
        reply_timeout: float,
    ) -> None:
        super().__init__(state)
        self.owner = owner
        self._preamble = preamble
        self._reply_timeout = reply_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._reply_buf = b""
        # Resolves once the acceptor answered: None on OK, an exception otherwise.
        self.outcome: asyncio.Future[None] = self.loop.create_future()
        # The dialer may have given up waiting (drain); never warn about an unseen error.
        self.outcome.add_done_callback(_mark_retrieved)
        self.registered = False
        self.session_id = 0
        self.registrant = 0
        self.registered_at = 0.0
        self.retiring = False
        self.retire_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self._preamble)
        self._timer = self.loop.call_later(self._reply_timeout, self._reply_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.registered:
            if self.idle and data.startswith(_ACCEPTOR_RETIRE):
                self._retired_by_acceptor()
                return
            HttpProtocol.data_received(self, data)
            return
        if self.outcome.done():
            return  # refused; closing
        buf = self._reply_buf + data
        try:
            end = wire.find_line(buf)
        except wire.PreambleError as exc:
            self._fail(RegistrationRejected(None, f"bad reply from acceptor: {exc}"))
            return
        if end < 0:
            self._reply_buf = buf
            return
        self._reply_buf = b""
        try:
            reply = wire.parse_reply(buf[:end])
        except ValueError as exc:
            self._fail(RegistrationRejected(None, str(exc)))
            return
        if not reply.ok:
            error: RegistrationError
            if reply.code is not None and reply.code in FATAL_CODES:
                error = RegistrationRejected(reply.code, reply.message)
            else:
                error = RegistrationRefused(reply.code, reply.message)
            self._fail(error)
            return
        self._cancel_timer()
        self.registered = True
        self.session_id = reply.session
        self.registrant = reply.registrant
        self.registered_at = time.monotonic()
        rest = buf[end:]
        if rest:
            HttpProtocol.data_received(self, rest)
        self.outcome.set_result(None)
        self.owner.session_registered(self)
        if self.retiring and not self.retire_sent and self.idle:
            self._send_retire()

    def _fail(self, error: Exception) -> None:
        self._cancel_timer()
        if not self.outcome.done():
            self.outcome.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def _reply_timed_out(self) -> None:
        self._timer = None
        if not self.outcome.done():
            self.outcome.set_exception(
                RegistrationError(f"no reply from acceptor within {self._reply_timeout:g}s")
            )
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)
        if not self.outcome.done():
            self.outcome.set_exception(
                RegistrationError("acceptor closed the connection before replying")
            )
        if self.registered:
            self.owner.session_closed(self)

    # --- retiring ---------------------------------------------------------------

    def retire(self) -> None:
        """Give this session back without failing any request (see module docstring)."""
        if self.retiring or self.closed:
            return
        self.retiring = True
        self.close_after_response = True
        if self.registered and self.idle:
            self._send_retire()

    def _retired_by_acceptor(self) -> None:
        """The acceptor took this idle session back (its cap shrank): no request is on it,
        so close; the service dials a replacement, which the acceptor admits (or refuses
        with ``ERR limit``) by its cap."""
        self.retiring = self.retire_sent = True
        if self.transport is not None:
            self.transport.close()

    def _send_retire(self) -> None:
        self.retire_sent = True
        if self.transport is not None:
            self.transport.write(wire.RETIRE_LINE)

    def _idle(self) -> None:
        if not self.retiring:
            return  # an idle session simply waits; there is no idle timeout
        if not self.retire_sent:
            self._send_retire()
        # after RETIRE: wait for the acceptor's EOF, never close on our own


def _mark_retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
