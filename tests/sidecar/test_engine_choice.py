"""Which engine a worker runs: auto, native, python, and the error when native is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backdial.runtime import ConfigError
from backdial.sidecar import engine


def test_python_is_always_available() -> None:
    assert engine.choose("python") == (engine.Kind.PYTHON, "--engine python")


def test_auto_is_native_when_installed_else_python(monkeypatch: pytest.MonkeyPatch) -> None:
    kind, why = engine.choose("auto")
    if engine.native_module() is None:
        assert kind is engine.Kind.PYTHON and "not installed" in why
    else:
        assert kind is engine.Kind.NATIVE and why.startswith("backdial_engine ")
    monkeypatch.setattr(engine, "native_module", lambda: None)
    assert engine.choose("auto") == (engine.Kind.PYTHON, "backdial_engine not installed")
    with pytest.raises(ConfigError, match="--engine native: the backdial_engine package"):
        engine.choose("native")


def test_native_without_the_package_is_one_line_and_exit_1(tmp_path: object) -> None:
    code = (
        "import sys; sys.modules['backdial_engine'] = None; "  # makes the import fail
        "from backdial.cli import main; "
        f"sys.exit(main(['sidecar', '--engine', 'native', '--run-dir', '{tmp_path}', "
        "'--admin', '127.0.0.1:0']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--engine native" in lines[0], proc.stderr


def test_a_bad_engine_name_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "backdial.cli", "sidecar", "--engine", "fast"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "--engine" in proc.stderr
