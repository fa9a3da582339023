"""Response spill: bytes a slow client has not taken yet, in a bounded temporary file.

A response larger than ``response_buffer`` used to keep its session leased
until the client had read all but the last buffer-full, so slow readers of
large responses could hold every session (invariant 5).  Like nginx's
``proxy_temp``, the proxy now keeps draining the session at session speed and
parks what the client transport cannot take in an unlinked temporary file,
which the connection feeds to the client as it reads; the session is released
as soon as the response is complete.

``SpillFile`` is the IO-free-of-policy part: an append-only byte queue on a
file, bounded by ``limit`` bytes not yet read (beyond it the caller applies
back-pressure to the session, as before), truncated whenever it runs empty.
``SpillBudget`` bounds the bytes parked by all connections of one worker.
Reads and writes are plain blocking file calls: the file lives in the page
cache in the common case, as nginx's temp files do.
"""

from __future__ import annotations

import os
import tempfile


class SpillBudget:
    """Bytes parked in spill files by every connection of one worker, against a limit."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class SpillFile:
    """An append-only byte queue in an unlinked temporary file."""

    __slots__ = ("_budget", "_fd", "_read", "_written", "limit")

    def __init__(self, directory: str | None, limit: int, budget: SpillBudget) -> None:
        fd, path = tempfile.mkstemp(prefix="backdial-spill-", dir=directory or None)
        os.unlink(path)  # nothing to clean up after a crash; gone when closed
        self._fd = fd
        self._read = 0
        self._written = 0
        self._budget = budget
        self.limit = limit

    @property
    def pending(self) -> int:
        """Bytes written and not read yet."""
        return self._written - self._read

    @property
    def room(self) -> bool:
        """Whether more may be written without exceeding this file's limit."""
        return self.pending < self.limit

    def write(self, data: bytes) -> bool:
        """Append *data*; False (nothing written) when the worker's budget is exhausted."""
        if not self._budget.take(len(data)):
            return False
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self._written)
            self._written += n
            view = view[n:]
        return True

    def read(self, n: int) -> bytes:
        """Up to *n* of the oldest pending bytes (b"" when empty)."""
        data = os.pread(self._fd, min(n, self.pending), self._read) if self.pending else b""
        self._read += len(data)
        self._budget.give(len(data))
        if self._read == self._written and self._written:
            os.ftruncate(self._fd, 0)  # drained: give the disk space back, start over
            self._read = self._written = 0
        return data

    def close(self) -> None:
        if self._fd >= 0:
            self._budget.give(self.pending)
            os.close(self._fd)
            self._fd = -1
            self._read = self._written = 0
