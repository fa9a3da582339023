"""SCM_RIGHTS over a SOCK_SEQPACKET UNIX socket, with a thin asyncio channel.

asyncio has no transport for SEQPACKET sockets, so :class:`Channel` drives a
non-blocking socket with ``add_reader``/``add_writer`` directly.  Records and
the descriptors attached to them are delivered together; outgoing records are
queued when the kernel buffer is full so ``send`` never blocks the loop.  That
queue is bounded (bytes and descriptors): a peer that stops reading is
disconnected rather than allowed to pile up duplicated descriptors here.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable, Sequence

from backdial import control

log = logging.getLogger("backdial.control")

_FD_SIZE = array.array("i").itemsize
_ANC_SPACE = socket.CMSG_SPACE(control.MAX_FDS * _FD_SIZE)

# Outgoing records a peer may leave unread before it is disconnected.  The kernel
# buffer absorbs normal bursts; these only bound a peer that stopped reading.
MAX_PENDING_BYTES = 16 << 20  # sixteen full-size CONFIG records
MAX_PENDING_FDS = 1024


class PeerNotReading(control.ProtocolError):
    """The peer left more than the pending-record bound unread."""


def send_record(sock: socket.socket, record: bytes, fds: Sequence[int] = ()) -> None:
    """Send one record with optional descriptors (raises BlockingIOError if full)."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([record], anc)
    else:
        sock.send(record)


def recv_record(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one record and the descriptors that came with it.

    Returns ``(b"", [])`` at end of stream.  Descriptors from a truncated
    ancillary buffer are closed, never leaked.
    """
    data, anc, flags, _ = sock.recvmsg(control.MAX_RECORD, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise control.ProtocolError("record or descriptors truncated")
    return data, fds


OnRecord = Callable[[control.Message, list[int]], None]
OnClose = Callable[[Exception | None], None]


class Channel:
    """One control connection: decoded records in, encoded records out."""

    def __init__(
        self,
        sock: socket.socket,
        on_record: OnRecord,
        on_close: OnClose,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._on_record = on_record
        self._on_close = on_close
        self._out: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._pending_bytes = 0
        self._pending_fds = 0
        self._writing = False
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, msg: control.Message, fds: Sequence[int] = ()) -> None:
        """Queue *msg*; descriptors are duplicated, so the caller keeps its own."""
        if self.closed:
            return
        record = control.encode(msg)
        if self._out and (
            self._pending_bytes + len(record) > MAX_PENDING_BYTES
            or self._pending_fds + len(fds) > MAX_PENDING_FDS
        ):
            self.close(PeerNotReading(f"peer left {len(self._out)} records unread"))
            return
        try:
            owned = [os.dup(fd) for fd in fds]
        except OSError as exc:  # EMFILE: better to lose this peer than to half-send
            self.close(exc)
            return
        self._out.append((record, owned))
        self._pending_bytes += len(record)
        self._pending_fds += len(owned)
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            record, fds = self._out[0]
            try:
                send_record(self.sock, record, fds)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError as exc:
                self.close(exc)
                return
            self._out.popleft()
            self._pending_bytes -= len(record)
            self._pending_fds -= len(fds)
            for fd in fds:
                os.close(fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        for _ in range(64):  # bounded batch so one chatty peer cannot starve the loop
            try:
                record, fds = recv_record(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, control.ProtocolError) as exc:
                self.close(exc)
                return
            if not record:
                self.close(None)
                return
            try:
                msg = control.decode(record)
            except control.ProtocolError as exc:
                for fd in fds:
                    os.close(fd)
                self.close(exc)
                return
            try:
                self._on_record(msg, fds)
            except Exception as exc:  # a handler bug: drop this peer, keep the process
                log.exception("control record %s could not be handled", type(msg).__name__)
                self.close(exc)
                return
            if self.closed:
                return

    def close(self, exc: Exception | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        fileno = self.sock.fileno()
        if fileno >= 0:
            self._loop.remove_reader(fileno)
            if self._writing:
                self._loop.remove_writer(fileno)
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        self._pending_bytes = self._pending_fds = 0
        self.sock.close()
        self._on_close(exc)
