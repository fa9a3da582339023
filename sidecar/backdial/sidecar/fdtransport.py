"""A transport over a descriptor someone else owns: an engine session lent to Python.

The native engine keeps every session's descriptor.  When a connection served by the
Python path leases one, the ``SessionConn`` reads and writes it through this
transport (``loop.add_reader`` / ``add_writer``, non-blocking ``os.read`` /
``os.write``) and ``detach`` gives it back without closing it: a uvloop transport
would own the descriptor and close it.  Flow control follows asyncio's: above
``high`` buffered bytes ``pause_writing``, below ``low`` ``resume_writing``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

READ_SIZE = 256 * 1024


class FdTransport(asyncio.Transport):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        protocol: asyncio.Protocol,
        high: int = 64 * 1024,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._buf = bytearray()
        self._high, self._low = high, high // 4
        self._reading = False
        self._writing = False
        self._paused = False  # protocol.pause_writing was called
        self._closing = False
        self.resume_reading()

    # -- reading -------------------------------------------------------------------------------
    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if data:
            self._protocol.data_received(data)
        elif not self._protocol.eof_received():
            self._lost(None)

    # -- writing -------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buf:
            try:
                n = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._lost(exc)
                return
            if n == len(data):
                return
            data = data[n:]
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        self._buf += data
        if not self._paused and len(self._buf) > self._high:
            self._paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        try:
            n = os.write(self._fd, self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._buf[:n]
        if not self._buf:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._paused and len(self._buf) <= self._low:
            self._paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._buf)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    # -- ending --------------------------------------------------------------------------------
    def detach(self) -> None:
        """Stop watching the descriptor (it is not closed: its owner keeps it)."""
        self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._buf.clear()

    def close(self) -> None:
        self.detach()

    def abort(self) -> None:
        self.detach()

    def is_closing(self) -> bool:
        return self._closing

    def _lost(self, exc: Exception | None) -> None:
        self.detach()
        self._protocol.connection_lost(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default
