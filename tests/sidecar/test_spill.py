"""SpillFile and SpillBudget: an ordered, bounded byte queue on an unlinked file."""

from __future__ import annotations

import os
from pathlib import Path

from backdial.sidecar.spill import SpillBudget, SpillFile


def test_bytes_come_back_in_order_and_the_file_is_reset_when_empty(tmp_path: Path) -> None:
    budget = SpillBudget(1 << 20)
    spill = SpillFile(str(tmp_path), 100, budget)
    assert os.listdir(tmp_path) == []  # unlinked at once: nothing left behind by a crash
    assert spill.write(b"abc") and spill.write(b"defgh")
    assert spill.pending == 8 and budget.used == 8 and spill.room
    assert spill.read(5) == b"abcde"
    assert spill.write(b"ij")
    assert spill.read(100) == b"fghij"
    assert spill.pending == 0 and budget.used == 0
    assert spill.read(10) == b""
    assert spill.write(b"k") and spill.read(10) == b"k"  # usable after the reset
    spill.close()


def test_limit_is_reported_and_budget_refuses(tmp_path: Path) -> None:
    budget = SpillBudget(10)
    a = SpillFile(str(tmp_path), 4, budget)
    b = SpillFile(str(tmp_path), 100, budget)
    assert a.write(b"12345")  # the per-file limit is advisory: the caller pauses its source
    assert not a.room
    assert b.write(b"12345")
    assert not b.write(b"x")  # the worker's budget is spent: refused, nothing written
    assert b.pending == 5 and budget.used == 10
    a.close()  # closing gives the unread bytes back
    assert budget.used == 5
    assert b.write(b"x")
    b.close()
    assert budget.used == 0
