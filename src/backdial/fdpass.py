"""SCM_RIGHTS over a SOCK_SEQPACKET UNIX socket, with a thin asyncio channel.

asyncio has no transport for SEQPACKET sockets, so :class:`Channel` drives a
non-blocking socket with ``add_reader``/``add_writer`` directly.  Records and
the descriptors attached to them are delivered together; outgoing records are
queued when the kernel buffer is full so ``send`` never blocks the loop.
"""

from __future__ import annotations

import array
import asyncio
import collections
import os
import socket
from collections.abc import Callable, Sequence

from backdial import control

_FD_SIZE = array.array("i").itemsize
_ANC_SPACE = socket.CMSG_SPACE(control.MAX_FDS * _FD_SIZE)


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
        self._writing = False
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, msg: control.Message, fds: Sequence[int] = ()) -> None:
        """Queue *msg*; descriptors are duplicated, so the caller keeps its own."""
        if self.closed:
            return
        owned = [os.dup(fd) for fd in fds]
        self._out.append((control.encode(msg), owned))
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
            self._on_record(msg, fds)
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
        self.sock.close()
        self._on_close(exc)
