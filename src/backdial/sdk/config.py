"""Command-line and environment settings for ``backdial serve`` and ``bridge``.

Everything is validated once, up front, into one frozen ``Settings``; a bad
value is reported as one clear line instead of surfacing later as a dial
failure.  Flags win over the environment (``BACKDIAL_REGISTER``,
``BACKDIAL_SESSIONS``, ``BACKDIAL_SERVICE``, ``BACKDIAL_TOKEN``,
``BACKDIAL_INSTANCE``, ``BACKDIAL_SLICE``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from backdial import wire

from .registration import RegisterAddress, default_instance, sanitize_name

MAX_SESSIONS = 10_000


class ConfigError(ValueError):
    """A setting is invalid; the message is meant for the user as is."""


@dataclass(frozen=True, slots=True)
class Settings:
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "serve":
        parser = _Parser(
            prog="backdial serve",
            description="Run an ASGI app (or raw handler) over sessions dialed to a backdial "
            "acceptor (--register), or on a conventional listening socket (--listen).",
        )
        parser.add_argument("app", metavar="MODULE:APP", help="the app, e.g. backdial.demo:app")
    else:
        parser = _Parser(
            prog="backdial bridge",
            description="Register sessions and relay their requests to an unmodified "
            "HTTP/1.1 app over kept-alive connections (one per session).",
        )
        parser.add_argument(
            "--target", required=True, metavar="URL", help="the app, e.g. http://127.0.0.1:8000"
        )
    parser.epilog = (
        "signals (sessions mode): SIGUSR1 adds a session, SIGUSR2 removes one, "
        "SIGTERM/SIGINT drain gracefully (exit 0). Exit 1 on invalid settings, "
        "a failed lifespan startup or a fatal registration refusal (e.g. auth)."
    )
    parser.add_argument(
        "--register",
        metavar="URL",
        help="acceptor register URL: unix:///path/register.sock or tcp://127.0.0.1:PORT "
        "(env BACKDIAL_REGISTER)",
    )
    if command == "serve":
        parser.add_argument(
            "--listen",
            metavar="HOST:PORT",
            help="serve on a listening socket instead of dialing sessions",
        )
    parser.add_argument(
        "--sessions",
        metavar="N",
        help="sessions to keep registered = declared capacity (env BACKDIAL_SESSIONS; default 1)",
    )
    parser.add_argument(
        "--service",
        help="service name (env BACKDIAL_SERVICE; default: the app's module name, or 'default')",
    )
    parser.add_argument(
        "--instance", help="instance id (env BACKDIAL_INSTANCE; default <hostname>-<pid>)"
    )
    parser.add_argument("--slice", help="slice to register into (env BACKDIAL_SLICE)")
    parser.add_argument(
        "--token", help="registration token (env BACKDIAL_TOKEN; prefer the env var)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may take (default 30)",
    )
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="admin endpoint: GET/PUT /v1/sessions (sessions mode only)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )
    return parser


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} {value!r}: expected HOST:PORT")
    return host, int(port)


def parse_settings(command: str, argv: Sequence[str], env: Mapping[str, str]) -> Settings:
    """Parse and validate; raises ConfigError (or SystemExit for --help)."""
    if command not in ("serve", "bridge"):
        raise ConfigError(f"unknown command {command!r}")
    args = build_parser(command).parse_args(list(argv))
    listen_arg: str | None = getattr(args, "listen", None)
    register_url = args.register or (None if listen_arg else env.get("BACKDIAL_REGISTER"))
    if listen_arg and args.register:
        raise ConfigError("--listen and --register are mutually exclusive")
    if not listen_arg and not register_url:
        need = "--register URL (or BACKDIAL_REGISTER)"
        raise ConfigError(f"need {need}" + (" or --listen HOST:PORT" if command == "serve" else ""))
    try:
        register = RegisterAddress.parse(register_url) if register_url else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    listen = parse_hostport(listen_arg, "--listen") if listen_arg else None

    raw_sessions = args.sessions if args.sessions is not None else env.get("BACKDIAL_SESSIONS")
    try:
        sessions = int(raw_sessions) if raw_sessions not in (None, "") else 1
    except ValueError:
        raise ConfigError(f"sessions {raw_sessions!r}: expected an integer") from None
    if not 0 <= sessions <= MAX_SESSIONS:
        raise ConfigError(f"sessions {sessions}: expected 0..{MAX_SESSIONS}")

    app: str | None = getattr(args, "app", None)
    target: str | None = getattr(args, "target", None)
    if app is not None and (":" not in app or app.startswith(":") or app.endswith(":")):
        raise ConfigError(f"app {app!r}: expected MODULE:APP, e.g. backdial.demo:app")
    default_service = sanitize_name(app.partition(":")[0]) if app else "default"
    service = args.service or env.get("BACKDIAL_SERVICE") or default_service
    instance = args.instance or env.get("BACKDIAL_INSTANCE") or default_instance()
    slice_ = args.slice or env.get("BACKDIAL_SLICE") or None
    token = args.token or env.get("BACKDIAL_TOKEN") or None
    try:
        wire.Preamble(service, instance, slice_, token).encode()
    except ValueError as exc:
        raise ConfigError(str(exc).replace(repr(token), "<token>") if token else str(exc)) from None

    if args.drain_timeout < 0:
        raise ConfigError("--drain-timeout must be >= 0")
    admin = parse_hostport(args.admin, "--admin") if args.admin else None
    if admin is not None and register is None:
        raise ConfigError("--admin needs sessions mode (--register)")
    return Settings(
        command=command,
        app=app,
        target=target,
        register=register,
        listen=listen,
        sessions=sessions,
        service=service,
        instance=instance,
        slice=slice_,
        token=token,
        drain_timeout=args.drain_timeout,
        admin=admin,
        log_level=args.log_level,
    )
