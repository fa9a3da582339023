"""``backdial serve`` and ``backdial bridge`` settings: every one a flag and a variable.

Declared with ``backdial.options`` (the same machinery as the acceptor and the
sidecar): ``--help`` and ``docs/configuration.md`` list every setting with its
``BACKDIAL_*`` variable and default, and a bad value is one line and exit 1
instead of surfacing later as a dial failure.  ``parse_settings`` returns the
flat ``Settings`` the rest of the SDK uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from backdial import wire
from backdial.options import (
    group,
    integer,
    load,
    log_level,
    option,
    optional_hostport,
    optional_text,
    seconds,
)
from backdial.runtime import ConfigError

from .registration import RegisterAddress, default_instance, sanitize_name

MAX_SESSIONS = 10_000

_EPILOG = (
    "signals (sessions mode): SIGUSR1 adds a session, SIGUSR2 removes one, "
    "SIGTERM/SIGINT drain gracefully (exit 0). Exit 1 on invalid settings, "
    "a failed lifespan startup or a fatal registration refusal (e.g. auth). "
    "Every option may also be given as the BACKDIAL_* variable named in its help; "
    "a flag wins over the variable."
)


def app_spec(raw: str) -> str:
    if ":" not in raw or raw.startswith(":") or raw.endswith(":"):
        raise ValueError(f"expected MODULE:APP, e.g. backdial.demo:app, got {raw!r}")
    return raw


def register_address(raw: str) -> RegisterAddress | None:
    return RegisterAddress.parse(raw) if raw.strip() else None


@dataclass(frozen=True, slots=True)
class DialSettings:
    """How a service registers its sessions (shared by ``serve`` and ``bridge``)."""

    register: RegisterAddress | None = option(
        "--register",
        parse=register_address,
        metavar="URL",
        help="acceptor register URL: unix:///path/register.sock or tcp://127.0.0.1:PORT",
    )
    sessions: int = option(
        "--sessions",
        parse=integer(0, MAX_SESSIONS),
        default="1",
        metavar="N",
        help="sessions to keep registered = declared capacity",
    )
    service: str | None = option(
        "--service",
        parse=optional_text,
        help="service name (default: the app's module name, or 'default')",
    )
    instance: str | None = option(
        "--instance", parse=optional_text, help="instance id (default <hostname>-<pid>)"
    )
    slice: str | None = option(
        "--slice", parse=optional_text, help="slice hint sent with the registration"
    )
    token: str | None = option(
        "--token",
        parse=optional_text,
        help="registration token (prefer the variable: flags are visible in the process list)",
    )
    drain_timeout: float = option(
        "--drain-timeout",
        parse=seconds,
        default="30",
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may take",
    )
    admin: tuple[str, int] | None = option(
        "--admin",
        parse=optional_hostport,
        env="SESSIONS_ADMIN",
        metavar="HOST:PORT",
        help="admin endpoint: GET/PUT /v1/sessions (sessions mode only)",
    )
    log_level: str = log_level()


@dataclass(frozen=True, slots=True)
class ServeSettings:
    app: str = option("MODULE:APP", parse=app_spec, help="the app, e.g. backdial.demo:app")
    listen: tuple[str, int] | None = option(
        "--listen",
        parse=optional_hostport,
        env="SERVE_LISTEN",
        metavar="HOST:PORT",
        help="serve on a listening socket instead of dialing sessions",
    )
    dial: DialSettings = group(DialSettings)


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    target: str = option(
        "--target",
        default="",
        env="BRIDGE_TARGET",
        metavar="URL",
        help="the app, e.g. http://127.0.0.1:8000 (required)",
    )
    dial: DialSettings = group(DialSettings)


@dataclass(frozen=True, slots=True)
class Settings:
    """What a ``serve`` or ``bridge`` process runs with, validated and defaults resolved."""

    command: str  # "serve" or "bridge"
    app: str | None  # MODULE:APP (serve)
    target: str | None  # http://HOST:PORT (bridge)
    register: RegisterAddress | None
    listen: tuple[str, int] | None
    sessions: int
    service: str
    instance: str
    slice: str | None
    token: str | None
    drain_timeout: float
    admin: tuple[str, int] | None
    log_level: str


def parse_settings(command: str, argv: Sequence[str], env: Mapping[str, str]) -> Settings:
    """Parse and validate; raises ConfigError (or SystemExit for --help)."""
    app: str | None = None
    target: str | None = None
    listen: tuple[str, int] | None = None
    if command == "serve":
        serve = load(
            ServeSettings,
            argv,
            prog="backdial serve",
            description="Run an ASGI app (or raw handler) over sessions dialed to a backdial "
            "acceptor (--register), or on a conventional listening socket (--listen).",
            epilog=_EPILOG,
            environ=env,
        )
        app, listen, dial = serve.app, serve.listen, serve.dial
    elif command == "bridge":
        bridge = load(
            BridgeSettings,
            argv,
            prog="backdial bridge",
            description="Register sessions and relay their requests to an unmodified "
            "HTTP/1.1 app over kept-alive connections (one per session).",
            epilog=_EPILOG,
            environ=env,
        )
        if not bridge.target:
            raise ConfigError("--target is required (or BACKDIAL_BRIDGE_TARGET)")
        target, dial = bridge.target, bridge.dial
    else:
        raise ConfigError(f"unknown command {command!r}")
    register = dial.register
    if listen is not None:
        if "--register" in argv or any(a.startswith("--register=") for a in argv):
            raise ConfigError("--listen and --register are mutually exclusive")
        register = None  # a BACKDIAL_REGISTER in the environment is for sessions mode
    elif register is None:
        need = "--register URL (or BACKDIAL_REGISTER)"
        raise ConfigError(f"need {need}" + (" or --listen HOST:PORT" if command == "serve" else ""))
    default_service = sanitize_name(app.partition(":")[0]) if app else "default"
    service = dial.service or default_service
    instance = dial.instance or default_instance()
    try:
        wire.Preamble(service, instance, dial.slice, dial.token).encode()
    except ValueError as exc:
        text = str(exc)
        raise ConfigError(
            text.replace(repr(dial.token), "<token>") if dial.token else text
        ) from None
    if dial.admin is not None and register is None:
        raise ConfigError("--admin needs sessions mode (--register)")
    return Settings(
        command=command,
        app=app,
        target=target,
        register=register,
        listen=listen,
        sessions=dial.sessions,
        service=service,
        instance=instance,
        slice=dial.slice,
        token=dial.token,
        drain_timeout=dial.drain_timeout,
        admin=dial.admin,
        log_level=dial.log_level,
    )
