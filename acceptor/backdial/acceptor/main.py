"""``backdial acceptor``: settings, config reloading and the process main.

Settings come from flags and ``BACKDIAL_*`` variables into one frozen
dataclass, validated before anything starts.  The config file is re-read when
it changes (polled) or on SIGHUP; a bad file is reported in one line and the
running policy stays in force.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backdial.acceptor.admin import AdminAPI, apply_overlay
from backdial.acceptor.operatorlink import (
    LinkSettings,
    OperatorLink,
    load_applied,
    merge,
    parse_operator_url,
    parse_pod,
)
from backdial.acceptor.server import Acceptor, SocketTrust
from backdial.adminauth import AdminAccess
from backdial.adminhttp import start_admin
from backdial.policy import Policy, PolicyError, load_policy
from backdial.runtime import (
    ArgParser,
    ConfigError,
    env,
    fail,
    parse_hostport,
    run,
    setup_logging,
)
from backdial.trust import Uids

log = logging.getLogger("backdial.acceptor")


@dataclass(frozen=True, slots=True)
class AcceptorSettings:
    run_dir: Path
    config: Path | None
    admin: tuple[str, int]
    register_tcp: tuple[str, int] | None
    trust: SocketTrust
    access: AdminAccess
    reload_interval: float
    log_level: str
    operator: LinkSettings | None = None


def parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="backdial acceptor",
        description="Own registered service sessions and lease them to sidecar workers.",
    )
    p.add_argument(
        "--run-dir",
        default=env("RUN_DIR", "/var/run/backdial"),
        help="directory for register.sock, control.sock and admin.sock "
        "(env BACKDIAL_RUN_DIR; default /var/run/backdial)",
    )
    p.add_argument(
        "--config",
        default=env("CONFIG"),
        help="slices/routes/limits file, YAML or JSON (env BACKDIAL_CONFIG); "
        "without it one default slice takes every request",
    )
    p.add_argument(
        "--admin",
        default=env("ADMIN", "127.0.0.1:9901"),
        help="HOST:PORT for /metrics, /healthz, /readyz, /v1/state, /v1/routes "
        "(env BACKDIAL_ADMIN; default 127.0.0.1:9901). Read-only without credentials; "
        "route edits need the token, or the UNIX socket <run-dir>/admin.sock",
    )
    p.add_argument(
        "--admin-token-file",
        default=env("ADMIN_TOKEN_FILE"),
        help="file holding the bearer token that allows route edits over TCP, re-read on use "
        "(env BACKDIAL_ADMIN_TOKEN_FILE; without it only admin.sock may edit)",
    )
    p.add_argument(
        "--admin-hosts",
        default=env("ADMIN_HOSTS", ""),
        help="extra Host names accepted for edits over TCP, comma-separated (env "
        "BACKDIAL_ADMIN_HOSTS; IP addresses and localhost always are)",
    )
    p.add_argument(
        "--register-tcp",
        default=env("REGISTER_TCP"),
        help="also accept registrations on HOST:PORT (env BACKDIAL_REGISTER_TCP)",
    )
    p.add_argument(
        "--register-uids",
        default=env("REGISTER_UIDS", "self"),
        help="uids (or user names, comma-separated) allowed to connect to register.sock, "
        "or 'any' (env BACKDIAL_REGISTER_UIDS; default self: the acceptor's own uid). "
        "In a pod: 'any', so app containers running as other users can register",
    )
    p.add_argument(
        "--control-uids",
        default=env("CONTROL_UIDS", "self"),
        help="uids allowed on control.sock and admin.sock: they can lease every session "
        "(env BACKDIAL_CONTROL_UIDS; default self)",
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=env("RELOAD_INTERVAL", "1.0"),
        help="seconds between config file change checks; 0 disables polling "
        "(SIGHUP always reloads; env BACKDIAL_RELOAD_INTERVAL)",
    )
    p.add_argument(
        "--operator",
        default=env("OPERATOR"),
        help="https://HOST[:PORT] of the operator's config endpoint: dial it and apply the "
        "SessionSlice config it sends (env BACKDIAL_OPERATOR; docs/operator.md)",
    )
    p.add_argument(
        "--operator-ca",
        default=env("OPERATOR_CA"),
        help="CA bundle that signed the operator's certificate (env BACKDIAL_OPERATOR_CA; "
        "default: the system's)",
    )
    p.add_argument(
        "--token-file",
        default=env("TOKEN_FILE", "/var/run/secrets/backdial/token"),
        help="projected ServiceAccount token (audience backdial), re-read on every connect "
        "(env BACKDIAL_TOKEN_FILE; default /var/run/secrets/backdial/token)",
    )
    p.add_argument(
        "--pod",
        default=env("POD"),
        help="NAMESPACE/NAME of this pod, as the token must prove "
        "(env BACKDIAL_POD; default: the pod the token is bound to)",
    )
    p.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    return p


def settings_from(argv: list[str]) -> AcceptorSettings:
    ns = parser().parse_args(argv)
    if ns.reload_interval < 0:
        raise ConfigError("--reload-interval must be >= 0")
    try:
        trust = SocketTrust(
            register=Uids.parse(ns.register_uids, "--register-uids"),
            control=Uids.parse(ns.control_uids, "--control-uids"),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    link = None
    if ns.operator:
        host, port = parse_operator_url(ns.operator)
        link = LinkSettings(
            host,
            port,
            Path(ns.operator_ca) if ns.operator_ca else None,
            Path(ns.token_file),
            parse_pod(ns.pod) if ns.pod else None,
        )
    return AcceptorSettings(
        run_dir=Path(ns.run_dir),
        config=Path(ns.config) if ns.config else None,
        admin=parse_hostport(ns.admin, "--admin"),
        register_tcp=parse_hostport(ns.register_tcp, "--register-tcp") if ns.register_tcp else None,
        trust=trust,
        access=AdminAccess(
            token_file=Path(ns.admin_token_file) if ns.admin_token_file else None,
            hosts=frozenset(h.strip().lower() for h in ns.admin_hosts.split(",") if h.strip()),
        ),
        reload_interval=ns.reload_interval,
        log_level=ns.log_level,
        operator=link,
    )


class Reloader:
    """Re-reads the config file when its stat changes; keeps the old policy on error."""

    def __init__(
        self, acc: Acceptor, path: Path | None, overlay: dict[str, Any], data: dict[str, Any]
    ) -> None:
        self.acc, self.path, self.overlay = acc, path, overlay
        self.data = data  # the file's last good content (wire form)
        self.link: OperatorLink | None = None  # its config goes over the file's
        self._stamp = self._stat()

    def local(self) -> dict[str, Any]:
        """The file's config with the route edits over it (wire form)."""
        data = dict(self.data)
        apply_overlay(data, self.overlay)
        return data

    def _stat(self) -> tuple[float, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def check(self, force: bool = False) -> None:
        stamp = self._stat()
        if not force and stamp == self._stamp:
            return
        self._stamp = stamp
        if self.path is None:
            return
        try:
            data = load_policy(self.path).to_wire()
            local = dict(data)
            apply_overlay(local, self.overlay)
            part = self.link.applied.policy if self.link else None
            policy = merge(local, part, str(self.path))
        except PolicyError as exc:
            self.acc.counters.reloads["error"] += 1
            log.error("config reload rejected, previous config stays in force: %s", exc)
            return
        self.data = data
        if policy == self.acc.policy:
            return
        self.acc.set_policy(policy)
        self.acc.counters.reloads["ok"] += 1
        log.info("config reloaded (generation %d)", self.acc.generation)


async def serve(cfg: AcceptorSettings, policy: Policy, stop: asyncio.Event) -> int:
    reloader_data = policy.to_wire()
    applied = load_applied(cfg.run_dir) if cfg.operator else None
    if applied is not None and applied.policy is not None:
        try:  # the last config the operator sent survives a restart
            policy = merge(reloader_data, applied.policy, "operator-config.json")
            log.info("starting with operator config generation %d", applied.generation)
        except PolicyError as exc:
            log.error("ignoring the saved operator config: %s", exc)
    acc = Acceptor(cfg.run_dir, policy, cfg.register_tcp, cfg.trust)
    overlay: dict[str, Any] = {}
    try:
        await acc.start()
        api = AdminAPI(acc, overlay, cfg.access)
        admin = await start_admin(cfg.admin[0], cfg.admin[1], api)
        admin_unix = await start_admin(
            "unix", str(cfg.run_dir / "admin.sock"), api, cfg.trust.control
        )
    except OSError as exc:
        return fail(f"cannot start acceptor: {exc}")
    reloader = Reloader(acc, cfg.config, overlay, reloader_data)
    link_task: asyncio.Future[None] | None = None
    if cfg.operator is not None and applied is not None:
        reloader.link = OperatorLink(acc, cfg.operator, reloader.local, applied)
        link_task = asyncio.ensure_future(reloader.link.run(stop))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.check, True)
    log.info(
        "acceptor ready: run dir %s, admin http://%s:%d%s",
        cfg.run_dir,
        *cfg.admin,
        f", register tcp {cfg.register_tcp[0]}:{cfg.register_tcp[1]}" if cfg.register_tcp else "",
    )
    try:
        while not stop.is_set():
            timeout = cfg.reload_interval or None
            try:
                await asyncio.wait_for(stop.wait(), timeout)
            except TimeoutError:
                reloader.check()
    finally:
        if link_task is not None:
            link_task.cancel()
        acc.draining = True
        admin.close()
        admin_unix.close()
        acc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = settings_from(sys.argv[1:] if argv is None else argv)
        policy = load_policy(cfg.config) if cfg.config else Policy()
    except (ConfigError, PolicyError) as exc:
        return fail(str(exc))
    setup_logging(cfg.log_level)
    return run(lambda stop: serve(cfg, policy, stop))


if __name__ == "__main__":
    sys.exit(main())
