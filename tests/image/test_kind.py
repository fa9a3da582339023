"""``e2e/kind/run``: the helm-install e2e scenario on a kind cluster.

Where kind can work (a Docker engine, a pullable ``kindest/node`` image, kind, kubectl, helm)
this runs the whole scenario; elsewhere it is skipped with the reason ``e2e/kind/run --check``
gives, which the test summary shows (on CI machines: no node image can be pulled).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.kind, pytest.mark.image]

RUN = ROOT / "e2e" / "kind" / "run"


@pytest.mark.timeout(3600)
def test_kind_e2e(image: str) -> None:
    check = subprocess.run([str(RUN), "--check"], capture_output=True, text=True, timeout=600)
    if check.returncode == 3:
        pytest.skip(f"e2e/kind/run cannot run here: {check.stdout.strip()}")
    assert check.returncode == 0, check.stdout + check.stderr
    done = subprocess.run([str(RUN)], capture_output=True, text=True, timeout=3500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
