"""A short soak and fault run (bench/soak.py): nothing duplicated, nothing lost (issue 12).

The documented run is 30 minutes (docs/reliability.md); this one strikes each
fault of the cycle once (service kill -9, config reload, sidecar worker kill -9,
capacity up and down, acceptor restart, sidecar kill -9, graceful service
restart) under paced mixed load, and fails if a request was duplicated or lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(180)
def test_short_soak_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "36",
            "--fault-interval", "4", "--rate", "100", "--clients", "4",
            "--out", str(tmp_path / "soak"),
        ],
        capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    assert len(result["faults"]) == 8, result["faults"]
    assert result["duplicated"] == 0, result["duplicated_ids"]
    assert result["lost"] == 0, result["lost_detail"]
    assert result["ok"] >= 0.9 * result["sent"], result["failed"]
    assert out.returncode == 0
