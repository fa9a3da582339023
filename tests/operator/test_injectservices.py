"""Operator flags for injection and the metrics API; the settings file reloads safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backdial.operator.injectservices import ServicesSettings, SettingsFile
from backdial.options import load
from backdial.runtime import ConfigError


def parse(*argv: str) -> ServicesSettings:
    return load(ServicesSettings, argv, prog="t", description="", environ={})


def test_listen_flags() -> None:
    cfg = parse()
    assert cfg.webhook_listen == ("0.0.0.0", 9443)
    assert cfg.metrics_api_listen == ("0.0.0.0", 6443)
    cfg = parse("--webhook-listen", "", "--metrics-api-listen", "127.0.0.1:1")
    assert cfg.webhook_listen is None and cfg.metrics_api_listen == ("127.0.0.1", 1)
    with pytest.raises(ConfigError, match="--webhook-listen"):
        parse("--webhook-listen", "nope")


def test_bad_inject_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "inject.yaml"
    bad.write_text("sidecarWorkers: 0\n")
    with pytest.raises(ConfigError, match=r"--inject-config: .*sidecarWorkers"):
        parse("--inject-config", str(bad))


def test_settings_file_reloads_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "inject.yaml"
    path.write_text("image: ghcr.io/backdial/backdial:1\n")
    settings = SettingsFile(path)
    assert settings().image == "ghcr.io/backdial/backdial:1"
    path.write_text("image: ghcr.io/backdial/backdial:2\n")
    os.utime(path, (1, 1))  # a different stat, whatever the clock's resolution
    assert settings().image == "ghcr.io/backdial/backdial:2"
    path.write_text("image: [broken\n")
    os.utime(path, (2, 2))
    assert settings().image == "ghcr.io/backdial/backdial:2"
    assert SettingsFile(None)().image == "ghcr.io/backdial/backdial:latest"
