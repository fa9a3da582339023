"""Shared fixtures: a temporary run directory and process management."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Proc, processes


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # UNIX socket paths are limited to ~100 bytes, so not under pytest's deep tmp_path.
    path = Path(tempfile.mkdtemp(prefix="bd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    with processes(tmp_path) as start:
        yield start
