"""Command settings declared once: flags, variables, defaults, one-line errors, the docs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from backdial import options
from backdial.acceptor.config import AcceptorSettings
from backdial.operator.main import OperatorSettings
from backdial.options import group, integer, load, option, seconds, size
from backdial.routecli import RouteSettings
from backdial.runtime import ConfigError
from backdial.sdk.config import BridgeSettings, ServeSettings
from backdial.sidecar.config import ProxySettings, SidecarSettings
from backdial.up import UpSettings

ROOT = Path(__file__).resolve().parents[2]

# Every command's settings class and its section heading in docs/configuration.md.
COMMANDS: dict[str, type[object]] = {
    "backdial acceptor": AcceptorSettings,
    "backdial sidecar": SidecarSettings,
    "backdial serve": ServeSettings,
    "backdial bridge": BridgeSettings,
    "backdial up": UpSettings,
    "backdial route": RouteSettings,
    "backdial operator": OperatorSettings,
}


@dataclass(frozen=True, slots=True)
class _Inner:
    limit: int = option("--limit", parse=size, default="1k", help="a size")

    def check(self) -> None:
        if self.limit == 0:
            raise ConfigError("--limit must not be 0")


@dataclass(frozen=True, slots=True)
class _Demo:
    count: int = option("--count", parse=integer(1, 9), default="2", help="how many")
    wait: float = option("--wait", parse=seconds, default="1.5", env="DEMO_WAIT", help="pause")
    loud: bool = option("--loud", switch=True, help="shout")
    secret: str = option("--secret", default="", env=False, help="no variable")
    names: tuple[str, ...] = option("--name", many=True, env="NAMES", help="repeatable")
    inner: _Inner = group(_Inner)


def _load(argv: list[str], env: dict[str, str] | None = None) -> _Demo:
    return load(_Demo, argv, prog="demo", description="d", environ=env or {})


def test_defaults_are_the_same_for_code_and_for_users() -> None:
    assert _Demo() == _load([]) == _Demo(2, 1.5, False, "", (), _Inner(1024))


def test_flag_wins_over_variable_wins_over_default() -> None:
    env = {"BACKDIAL_COUNT": "5", "BACKDIAL_DEMO_WAIT": "250ms", "BACKDIAL_LIMIT": "2k"}
    assert _load([], env) == _Demo(5, 0.25, False, "", (), _Inner(2048))
    assert _load(["--count", "7", "--limit", "3"], env) == _Demo(7, 0.25, False, "", (), _Inner(3))
    assert _load(["--name", "a", "--name", "b"], {"BACKDIAL_NAMES": "x,y"}).names == ("a", "b")
    assert _load([], {"BACKDIAL_NAMES": "x, y,"}).names == ("x", "y")
    assert _load([], {"BACKDIAL_LOUD": "yes"}).loud and _load(["--loud"]).loud
    assert _load([], {"BACKDIAL_SECRET": "x"}).secret == ""  # this one has no variable


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--count", "x"], {}, "--count: expected an integer, got 'x'"),
        (["--count", "10"], {}, "--count: expected 1..9, got 10"),
        (["--limit", "-1"], {}, "--limit: invalid size '-1'"),
        ([], {"BACKDIAL_COUNT": "0"}, "BACKDIAL_COUNT: expected 1..9, got 0"),
        ([], {"BACKDIAL_DEMO_WAIT": "soon"}, "BACKDIAL_DEMO_WAIT: invalid duration 'soon'"),
        ([], {"BACKDIAL_LOUD": "maybe"}, "BACKDIAL_LOUD: expected 1/true/yes/on"),
        (["--limit", "1x"], {}, "--limit: invalid size '1x'"),
        (["--limit", "0"], {}, "--limit must not be 0"),
        (["--bogus"], {}, "demo: unrecognized arguments: --bogus"),
    ],
)
def test_bad_values_are_one_line_naming_the_flag_or_variable(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(argv, env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_help_names_every_variable_and_default() -> None:
    text = options.parser(_Demo, "demo", "d").format_help()
    text = re.sub(r"\s+", " ", text)
    for name, default in (("COUNT", "2"), ("DEMO_WAIT", "1.5"), ("LIMIT", "1k")):
        assert f"env BACKDIAL_{name}; default {default})" in text
    assert "(env BACKDIAL_LOUD)" in text and "BACKDIAL_SECRET" not in text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_setting_is_in_help_and_in_the_docs(command: str) -> None:
    cls = COMMANDS[command]
    help_text = re.sub(r"\s+", " ", options.parser(cls, command, "").format_help())
    for _, spec in options.specs(cls):
        if not spec.hidden:
            assert spec.flag in help_text
            assert spec.variable is None or spec.variable in help_text
    docs = (ROOT / "docs" / "configuration.md").read_text()
    section = docs.partition(f"### `{command}`\n")[2]
    expected = options.table(cls)
    assert expected in section, f"docs/configuration.md, {command}, should have:\n{expected}"


def test_every_proxy_setting_is_a_flag() -> None:
    flags = {path for path, _ in options.specs(SidecarSettings) if path.startswith("proxy.")}
    assert flags == {f"proxy.{name}" for name in ProxySettings.__dataclass_fields__}
