"""Shared fixtures: a temporary run directory and process management."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

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


# Property-based fuzzing (tests/*/test_fuzz_*.py).  CI runs a few hundred examples per
# target, a few seconds each; the longer run is documented in docs/reliability.md:
#   HYPOTHESIS_PROFILE=long python -m pytest -q -k fuzz -p no:randomly
settings.register_profile("ci", max_examples=300, deadline=None, print_blob=True)
settings.register_profile(
    "long",
    max_examples=50_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
