"""``backdial serve`` and ``backdial bridge`` entry points.

``serve_main``/``bridge_main`` take argv (without the sub-command) and
return an exit code; the top-level ``backdial`` script dispatches to them,
and ``python -m backdial.sdk.main serve ...`` works before it is installed.

Signals (sessions mode): SIGUSR1 adds a session, SIGUSR2 removes one,
SIGTERM/SIGINT drain gracefully and exit 0.  A fatal registration refusal
(e.g. ``auth``) or a failed lifespan startup exits 1 with one clear line.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from backdial.runtime import ConfigError, run

from .admin import admin_app
from .bridge import Bridge
from .config import Settings, parse_settings
from .lifespan import LifespanError
from .listen import ListenServer
from .registration import RegistrationRejected
from .service import Service

log = logging.getLogger("backdial.sdk")


def load_app(spec: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted); the working directory is importable."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{spec!r}: module has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"{spec!r} is not callable")
    return obj


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            stream=sys.stderr,
            format="%(asctime)s backdial %(levelname)s %(message)s",
        )
    logging.getLogger("backdial").setLevel(level.upper())


def _run(command: str, argv: Sequence[str]) -> int:
    try:
        settings = parse_settings(command, argv, os.environ)
        _setup_logging(settings.log_level)
        os.environ.setdefault("BACKDIAL_INSTANCE", settings.instance)
        if settings.command == "serve":
            assert settings.app is not None
            app: Any = load_app(settings.app)
        else:
            assert settings.target is not None
            try:
                app = Bridge(settings.target)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    except ConfigError as exc:
        message = str(exc).removeprefix(f"backdial {command}: ")  # argparse names the command
        print(f"backdial {command}: error: {message}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if settings.listen is not None:
        return run(lambda stop: _run_listen(settings, app, stop))
    return run(lambda stop: _run_sessions(settings, app, stop))


def serve_main(argv: Sequence[str]) -> int:
    """``backdial serve MODULE:APP (--register URL --sessions N | --listen HOST:PORT)``."""
    return _run("serve", argv)


def bridge_main(argv: Sequence[str]) -> int:
    """``backdial bridge --target http://127.0.0.1:PORT --register URL --sessions N``."""
    return _run("bridge", argv)


async def _run_sessions(settings: Settings, app: Any, stop: asyncio.Event) -> int:
    loop = asyncio.get_running_loop()
    assert settings.register is not None
    service = Service(
        app,
        register=settings.register.url,
        sessions=settings.sessions,
        service=settings.service,
        instance=settings.instance,
        slice=settings.slice,
        token=settings.token,
    )

    def adjust(delta: int) -> None:
        service.set_target(max(0, service.target + delta))
        log.info("target now %d sessions", service.target)

    loop.add_signal_handler(signal.SIGUSR1, adjust, 1)
    loop.add_signal_handler(signal.SIGUSR2, adjust, -1)
    try:
        await service.start()
    except LifespanError as exc:
        print(
            f"backdial {settings.command}: error: lifespan startup failed: {exc}", file=sys.stderr
        )
        return 1
    admin: ListenServer | None = None
    if settings.admin is not None:
        admin = ListenServer(admin_app(service), *settings.admin, lifespan=False)
        try:
            await admin.start()
        except OSError as exc:
            print(f"backdial {settings.command}: error: --admin: {exc}", file=sys.stderr)
            await service.drain(0)
            return 1
        log.info("admin endpoint on http://%s:%d/v1/sessions", settings.admin[0], admin.bound_port)
    log.info(
        "serving %s over %d sessions via %s",
        settings.app or settings.target,
        settings.sessions,
        settings.register.url,
    )
    stopped = loop.create_task(stop.wait())
    closed = loop.create_task(service.wait_closed())
    await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if closed.done() and isinstance(closed.exception(), RegistrationRejected):
        print(f"backdial {settings.command}: error: {closed.exception()}", file=sys.stderr)
        code = 1
    stopped.cancel()
    clean = await service.drain(settings.drain_timeout)
    if not closed.done():
        closed.cancel()
    if admin is not None:
        await admin.shutdown(1.0)
    if code == 0:
        log.info("drained %s", "cleanly" if clean else "after timeout")
    return code


async def _run_listen(settings: Settings, app: Any, stop: asyncio.Event) -> int:
    assert settings.listen is not None
    server = ListenServer(app, *settings.listen)
    try:
        await server.start()
    except LifespanError as exc:
        print(f"backdial serve: error: lifespan startup failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"backdial serve: error: --listen {settings.listen}: {exc}", file=sys.stderr)
        return 1
    log.info("listening on http://%s:%d", settings.listen[0], server.bound_port)
    await stop.wait()
    clean = await server.shutdown(settings.drain_timeout)
    log.info("stopped %s", "cleanly" if clean else "after timeout")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        return serve_main(args[1:])
    if args and args[0] == "bridge":
        return bridge_main(args[1:])
    print("usage: python -m backdial.sdk.main {serve|bridge} ...", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
