"""Command settings declared once: flag, environment variable, parser, default and help.

A command's settings are a frozen dataclass whose fields are declared with
:func:`option` (in the manner of uvicorn's ``Config``).  :func:`load` builds the
argparse parser from those fields, takes each value from its flag, else from its
``BACKDIAL_*`` variable, else from the default, turns it into the field's type
with the field's parser, and lets the class check the whole (``check``).  The
facts come from one place, so ``--help`` names every option's variable and
default and :func:`table` renders the same facts for ``docs/configuration.md``
(a test keeps the document in step).  A bad flag or variable is one line naming
it (``ConfigError``) and the command exits 1.

A field whose type is itself such a dataclass (``group()``) contributes that
class's options, so ``ProxySettings`` are flags of ``backdial sidecar``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from backdial.policy import parse_duration
from backdial.runtime import ArgParser, ConfigError

ENV_PREFIX = "BACKDIAL_"
_SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True}
_SWITCH_VALUES |= {"0": False, "false": False, "no": False, "off": False, "": False}

Parse = Callable[[str], Any]


@dataclass(frozen=True, slots=True)
class Spec:
    """How one setting is given: the facts behind its flag, variable and help."""

    flag: str  # "--run-dir", or a metavar like "MODULE:APP" for a positional
    parse: Parse
    default: str | None  # as typed by a user; None: not set
    help: str
    env: str | None  # without the prefix; None: a flag only
    switch: bool  # a flag without value (store_true)
    many: bool  # repeatable flag; the variable is comma-separated; the value a tuple
    positional: bool
    hidden: bool  # internal: not in --help nor in the documentation
    metavar: str | None

    @property
    def variable(self) -> str | None:
        return ENV_PREFIX + self.env if self.env else None


def option(
    flag: str,
    *,
    help: str,
    parse: Parse = str,
    default: str | None = None,
    env: str | bool | None = True,
    switch: bool = False,
    many: bool = False,
    metavar: str | None = None,
    hidden: bool = False,
) -> Any:
    """A dataclass field that is a command option.

    ``env=True`` derives the variable from the flag (``--max-retries`` ->
    ``BACKDIAL_MAX_RETRIES``); a string names it; ``False`` gives none.  The field's
    own default is ``parse(default)``, so code that builds the dataclass directly
    gets the same value a user who sets nothing gets.
    """
    positional = not flag.startswith("--")
    if env is True:
        env = None if positional else flag.removeprefix("--").upper().replace("-", "_")
    elif env is False:
        env = None
    spec = Spec(flag, parse, default, help, env, switch, many, positional, hidden, metavar)
    if switch:
        value: Any = parse_switch(default or "")
    elif many:
        value = tuple(parse(item) for item in words(default or ""))
    else:
        value = parse(default) if default is not None else None
    if isinstance(value, list | dict | set):
        raise TypeError(f"{flag}: defaults must be immutable (use a tuple)")
    return dataclasses.field(default=value, metadata={"option": spec})


def log_level() -> Any:
    """The ``--log-level`` option every long-running command has."""
    return option(
        "--log-level",
        parse=choice("debug", "info", "warning", "error"),
        default="info",
        help="debug, info, warning or error",
    )


def group(cls: type[Any]) -> Any:
    """A field holding a nested settings dataclass *cls* whose options join the command's."""
    return dataclasses.field(default_factory=cls, metadata={"group": cls})


S = TypeVar("S")


def specs(cls: type[Any]) -> Iterator[tuple[str, Spec]]:
    """(attribute path, spec) of every option of *cls*, groups included, in order."""
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            for path, spec in specs(f.metadata["group"]):
                yield f"{f.name}.{path}", spec
        elif "option" in f.metadata:
            yield f.name, f.metadata["option"]


def parser(
    cls: type[Any], prog: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The argparse parser of *cls*; each help line ends with its variable and default."""
    p = ArgParser(prog=prog, description=description, epilog=epilog)
    for path, spec in specs(cls):
        help_text = argparse.SUPPRESS if spec.hidden else _help(spec)
        dest = path.replace(".", "__")
        if spec.positional:
            p.add_argument(dest, metavar=spec.flag, help=help_text)
        elif spec.switch:
            p.add_argument(spec.flag, dest=dest, action="store_const", const="1", help=help_text)
        elif spec.many:
            metavar = spec.metavar or spec.flag.removeprefix("--").upper().replace("-", "_")
            p.add_argument(spec.flag, dest=dest, action="append", metavar=metavar, help=help_text)
        else:
            metavar = spec.metavar or spec.flag.removeprefix("--").upper().replace("-", "_")
            p.add_argument(spec.flag, dest=dest, metavar=metavar, help=help_text)
    return p


def _help(spec: Spec) -> str:
    extra = []
    if spec.variable:
        extra.append(f"env {spec.variable}" + (", comma-separated" if spec.many else ""))
    if spec.default not in (None, "") and not spec.switch:
        extra.append(f"default {spec.default}")
    return spec.help + (f" ({'; '.join(extra)})" if extra else "")


def load(
    cls: type[S],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    epilog: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Settings of *cls* from *argv* and the environment; ConfigError names a bad one."""
    ns = parser(cls, prog, description, epilog).parse_args(list(argv))
    return from_namespace(cls, vars(ns), environ)


def from_namespace(
    cls: type[S], given: dict[str, Any], environ: Mapping[str, str] | None = None
) -> S:
    """Settings of *cls* from an argparse namespace made with :func:`parser` (for commands
    that add subcommands to that parser) and the environment."""
    return _build(cls, given, os.environ if environ is None else environ, prefix="")


def _build(cls: type[S], given: dict[str, Any], environ: Mapping[str, str], prefix: str) -> S:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if "group" in f.metadata:
            values[f.name] = _build(
                f.metadata["group"], given, environ, prefix=f"{prefix}{f.name}__"
            )
            continue
        spec: Spec | None = f.metadata.get("option")
        if spec is None:
            continue  # derived by the command
        raw = given.get(prefix + f.name)
        where = spec.flag
        if raw is None and spec.variable and spec.variable in environ:
            raw, where = environ[spec.variable], spec.variable
        if raw is None:
            values[f.name] = f.default
            continue
        values[f.name] = convert(spec, raw, where)
    settings = cls(**values)
    check = getattr(settings, "check", None)
    if check is not None:
        check()
    return settings


def convert(spec: Spec, raw: str | list[str], where: str) -> Any:
    try:
        if spec.many:
            items = raw if isinstance(raw, list) else list(words(raw))
            return tuple(spec.parse(item) for item in items)
        assert isinstance(raw, str)
        return parse_switch(raw) if spec.switch else spec.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def table(cls: type[Any]) -> str:
    """A Markdown table of *cls*'s options: flag, variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for _, spec in specs(cls):
        if spec.hidden:
            continue
        flag = spec.flag if spec.positional else f"`{spec.flag}`"
        variable = f"`{spec.variable}`" if spec.variable else "-"
        default = f"`{spec.default}`" if spec.default not in (None, "") else "-"
        meaning = spec.help.replace("|", "\\|")
        rows.append(f"| {flag} | {variable} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


# -- parsers: str -> value, ValueError with a message for the user ------------------------------
def parse_switch(raw: str) -> bool:
    value = _SWITCH_VALUES.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"expected 1/true/yes/on or 0/false/no/off, got {raw!r}")
    return value


def size(raw: str) -> int:
    """Bytes: ``1048576``, ``512k``, ``1m``, ``2g`` (also ``KiB``-style suffixes)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = raw.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    if not number.isdigit():
        raise ValueError(f"invalid size {raw!r}; use e.g. 1048576, 512k, 1m")
    return int(number) * scale


def seconds(raw: str) -> float:
    """A duration: seconds as a number, or ``500ms``, ``2s``, ``1m``."""
    return parse_duration(raw.strip())


def integer(low: int | None = None, high: int | None = None) -> Parse:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if low is not None and high is not None and not low <= value <= high:
            raise ValueError(f"expected {low}..{high}, got {value}")
        if low is not None and value < low:
            raise ValueError(f"expected at least {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"expected at most {high}, got {value}")
        return value

    return parse


def choice(*values: str) -> Parse:
    def parse(raw: str) -> str:
        if raw not in values:
            raise ValueError(f"expected one of {', '.join(values)}, got {raw!r}")
        return raw

    return parse


def hostport(raw: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too); an empty host means 127.0.0.1."""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {raw!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def optional_hostport(raw: str) -> tuple[str, int] | None:
    return hostport(raw) if raw.strip() else None


def path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("expected a path")
    return Path(raw)


def optional_path(raw: str) -> Path | None:
    return Path(raw) if raw.strip() else None


def words(raw: str) -> tuple[str, ...]:
    """A comma-separated list (empty items dropped)."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def optional_text(raw: str) -> str | None:
    return raw if raw else None
