"""spool.py: budgets, the temp-file queue and the memory-then-file spool (real files)."""

from __future__ import annotations

import os
from pathlib import Path

from backdial.sidecar.spool import Budget, Spool, SpoolFile


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_budget_books_all_or_nothing() -> None:
    b = Budget(10)
    assert b.take(6) and not b.take(5) and b.take(4)
    assert (b.used, b.refused) == (10, 1)
    b.give(10)
    assert b.used == 0


def test_spool_file_is_an_unlinked_bounded_queue(tmp_path: Path) -> None:
    disk = Budget(100)
    f = SpoolFile(disk, limit=50, directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # unlinked at once
    assert f.write(b"a" * 30) and f.write(b"b" * 20)
    assert not f.write(b"c")  # its own limit
    assert (f.pending, disk.used, f.room) == (50, 50, False)
    assert f.read(40) == b"a" * 30 + b"b" * 10
    assert f.read(100) == b"b" * 10 and f.read(1) == b""
    assert disk.used == 0  # drained: truncated, budget given back
    other = SpoolFile(disk, limit=1000, directory=str(tmp_path))
    assert other.write(b"x" * 100) and f.write(b"y") is False  # the shared disk budget
    before = _fds()
    other.close()
    f.close()
    assert disk.used == 0 and _fds() == before - 2


def test_spool_file_write_some_fills_up_to_its_limits(tmp_path: Path) -> None:
    """A response's parked bytes fill the file up to its own limit or the worker's disk
    budget, whichever is nearer; the count written says where the rest starts."""
    disk = Budget(100)
    f = SpoolFile(disk, limit=50, directory=str(tmp_path))
    assert f.write_some(b"a" * 30) == 30
    assert f.write_some(b"b" * 40) == 20  # the file's own limit: a prefix
    assert f.write_some(b"c") == 0 and disk.refused == 0  # not the budget's doing
    assert (f.pending, disk.used) == (50, 50)
    other = SpoolFile(disk, limit=1000, directory=str(tmp_path))
    assert other.write_some(b"x" * 70) == 50 and disk.refused == 1  # the budget's limit
    assert f.read(100) == b"a" * 30 + b"b" * 20
    assert other.write_some(b"y" * 10) == 10 and disk.used == 60
    assert other.read(100) == b"x" * 50 + b"y" * 10 and disk.used == 0
    assert other.write_some(b"") == 0
    other.close()
    f.close()
    assert f.write_some(b"z") == 0 and disk.used == 0  # closed: nothing taken


def test_spool_keeps_order_across_memory_and_file(tmp_path: Path) -> None:
    memory, disk = Budget(1000), Budget(1000)
    s = Spool(memory, disk, memory_limit=10, file_limit=100, directory=str(tmp_path))
    assert s.append(b"0123456789") and not s.spilled
    assert s.append(b"abc") and s.spilled  # over its memory limit: to the file
    assert (memory.used, disk.used, s.pending) == (10, 3, 13)
    assert s.read(4) == b"0123" and s.read(100) == b"456789" and s.read(100) == b"abc"
    assert (memory.used, disk.used) == (0, 0)


def test_spool_spills_when_the_worker_memory_budget_is_spent(tmp_path: Path) -> None:
    memory, disk = Budget(5), Budget(1000)
    first = Spool(memory, disk, memory_limit=100, file_limit=100, directory=str(tmp_path))
    second = Spool(memory, disk, memory_limit=100, file_limit=100, directory=str(tmp_path))
    assert first.append(b"12345") and not first.spilled
    assert second.append(b"x") and second.spilled  # nobody's own limit, the shared one
    assert first.take_memory() == [b"12345"] and memory.used == 0
    first.close()
    second.close()
    assert disk.used == 0


def test_spool_refuses_when_no_budget_is_left(tmp_path: Path) -> None:
    memory, disk = Budget(0), Budget(4)
    s = Spool(memory, disk, memory_limit=100, file_limit=100, directory=str(tmp_path))
    assert not s.append(b"12345")  # fits neither: refused, no file created
    assert not s.spilled and disk.refused == 1
    assert s.append(b"1234") and not s.append(b"5")
    s.close()
    assert (memory.used, disk.used) == (0, 0)
    no_disk = Spool(Budget(0), Budget(1000), memory_limit=100, file_limit=0)
    assert not no_disk.append(b"x")  # spooling disabled
    nowhere = Spool(Budget(0), Budget(1000), 100, 100, directory=str(tmp_path / "missing"))
    assert not nowhere.append(b"x")  # no writable directory: refused, not raised
