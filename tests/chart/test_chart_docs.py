"""charts/backdial/README.md's values table is generated from values.yaml (scripts/chart-docs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "chart-docs"
CHART = ROOT / "charts" / "backdial"


def _check(chart: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--chart", str(chart)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_values_table_is_current() -> None:
    done = _check(CHART)
    assert done.returncode == 0, done.stderr


def _copy(tmp_path: Path) -> Path:
    chart = tmp_path / "backdial"
    chart.mkdir()
    for name in ("values.yaml", "README.md"):
        shutil.copy(CHART / name, chart / name)
    return chart


def test_a_changed_default_makes_the_table_stale(tmp_path: Path) -> None:
    chart = _copy(tmp_path)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("replicaCount: 2", "replicaCount: 3"))
    done = _check(chart)
    assert done.returncode == 1
    assert "stale" in done.stderr
    subprocess.run([sys.executable, str(SCRIPT), "--chart", str(chart)], check=True)
    assert "| `operator.replicaCount` | int | `3` |" in (chart / "README.md").read_text()
    assert _check(chart).returncode == 0


def test_an_undocumented_value_is_refused(tmp_path: Path) -> None:
    chart = _copy(tmp_path)
    values = chart / "values.yaml"
    values.write_text(values.read_text() + "newThing:\n  knob: 1\n")
    done = _check(chart)
    assert done.returncode == 1
    assert "newThing.knob" in done.stderr
