"""Bounded buffering of bytes that wait for a peer: memory within a budget, then a temp file.

A request body must be whole before a session is leased (invariant 5), and a
response must leave its session at session speed, whatever the client's.
Both wait somewhere; this module bounds where:

``Budget``
    bytes held by every user of one worker against a limit (one for memory, one
    for disk).  ``take`` either books all of *n* or none of it.
``SpoolFile``
    an append-only byte queue in an *unlinked* temporary file (nothing to clean
    up after a crash), bounded by ``limit`` bytes not yet read and by a disk
    ``Budget``; truncated whenever it runs empty.  Reads and writes are plain
    blocking ``pread``/``pwrite``: the file lives in the page cache in the common
    case, as nginx's ``client_body_temp`` and ``proxy_temp`` files do.
``Spool``
    a byte queue that keeps data in memory while its own limit and the memory
    ``Budget`` allow, and continues in a ``SpoolFile`` beyond (order is kept:
    once it spilled, everything after goes to the file).  ``append`` returns
    False when neither budget can take the bytes: the caller answers fast (503)
    or applies back-pressure; it never buffers regardless.

Budgets are plain counters on the event loop thread: no locks, nothing per
byte beyond an add.  docs/reliability.md describes the defaults and what
happens at each limit.
"""

from __future__ import annotations

import collections
import os
import tempfile


class Budget:
    """Bytes held by every user of one worker, against ``limit``."""

    __slots__ = ("limit", "refused", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0  # takes that did not fit

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n

    def book(self, n: int) -> None:
        """Count *n* bytes held regardless of the limit (they are held already)."""
        self.used += n


class SpoolFile:
    """An append-only byte queue in an unlinked temporary file."""

    __slots__ = ("_budget", "_fd", "_read", "_written", "limit")
    open_files = 0  # descriptors held by every SpoolFile of the process (the fd guard counts them)

    def __init__(self, budget: Budget, limit: int, directory: str = "") -> None:
        fd, path = tempfile.mkstemp(prefix="backdial-spool-", dir=directory or None)
        os.unlink(path)  # gone when closed, whatever happens to this process
        SpoolFile.open_files += 1
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
        """Whether more may be written without exceeding this file's own limit."""
        return self.pending < self.limit

    def write(self, data: bytes) -> bool:
        """Append *data*; False (nothing written) when it exceeds a limit or the budget."""
        if self._fd < 0 or self.pending + len(data) > self.limit:
            return False
        if not self._budget.take(len(data)):
            return False
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, view[done:], self._written + done)
        except OSError:  # ENOSPC and friends: a full disk is a spent budget
            self._budget.give(len(data))
            return False  # a partial write is overwritten by the next one
        self._written += len(data)
        return True

    def write_some(self, data: bytes) -> int:
        """Append the longest prefix of *data* this file's limit and the budget allow; the
        count written (a response's parked bytes fill the file up to its limit, what does
        not fit waits behind it)."""
        if self._fd < 0:
            return 0
        budget = self._budget
        want = min(len(data), self.limit - self.pending)
        n = min(want, budget.limit - budget.used)
        if n < want:
            budget.refused += 1  # the worker's disk budget keeps bytes out, not the file's limit
        if n <= 0:
            return 0
        return n if self.write(data[:n] if n < len(data) else data) else 0

    def read(self, n: int) -> bytes:
        """Up to *n* of the oldest pending bytes (b"" when empty)."""
        if not self.pending:
            return b""
        data = os.pread(self._fd, min(n, self.pending), self._read)
        self._read += len(data)
        self._budget.give(len(data))
        if self._read == self._written:
            os.ftruncate(self._fd, 0)  # drained: give the disk space back, start over
            self._read = self._written = 0
        return data

    def close(self) -> None:
        if self._fd >= 0:
            self._budget.give(self.pending)
            os.close(self._fd)
            SpoolFile.open_files -= 1
            self._fd = -1
            self._read = self._written = 0


class Spool:
    """Bytes in order: in memory within limits, then in a ``SpoolFile``."""

    __slots__ = ("_chunks", "_dir", "_disk", "_file", "_file_limit", "_mem", "_mem_limit", "memory")

    def __init__(
        self,
        memory: Budget,
        disk: Budget,
        memory_limit: int,
        file_limit: int,
        directory: str = "",
    ) -> None:
        self._mem = memory
        self._disk = disk
        self._mem_limit = memory_limit
        self._file_limit = file_limit
        self._dir = directory
        self._chunks: collections.deque[bytes] = collections.deque()
        self._file: SpoolFile | None = None
        self.memory = 0  # bytes held in memory (booked in the memory budget)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    @property
    def pending(self) -> int:
        return self.memory + (self._file.pending if self._file is not None else 0)

    def append(self, data: bytes) -> bool:
        """Keep *data* after what is already here; False when no budget can take it."""
        if not data:
            return True
        if (
            self._file is None
            and self.memory + len(data) <= self._mem_limit
            and self._mem.take(len(data))
        ):
            self._chunks.append(data)
            self.memory += len(data)
            return True
        if self._file is None:
            if self._file_limit <= 0 or self._disk.used + len(data) > self._disk.limit:
                self._disk.refused += 1
                return False  # do not create a file that could not take even this
            try:
                self._file = SpoolFile(self._disk, self._file_limit, self._dir)
            except OSError:  # no writable spool directory: as if the budget were spent
                self._disk.refused += 1
                return False
        return self._file.write(data)

    def take_memory(self) -> list[bytes]:
        """Everything held in memory, in order (the caller now owns it); the budget is freed."""
        chunks = list(self._chunks)
        self._chunks.clear()
        self._mem.give(self.memory)
        self.memory = 0
        return chunks

    def read(self, n: int) -> bytes:
        """Up to *n* of the oldest bytes, memory first (b"" when empty)."""
        if self._chunks:
            data = self._chunks.popleft()
            if len(data) > n:
                self._chunks.appendleft(data[n:])
                data = data[:n]
            self.memory -= len(data)
            self._mem.give(len(data))
            return data
        return self._file.read(n) if self._file is not None else b""

    def close(self) -> None:
        """Drop whatever is left and give every byte back to its budget."""
        self.take_memory()
        if self._file is not None:
            self._file.close()
            self._file = None
