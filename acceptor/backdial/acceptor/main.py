"""``backdial acceptor``: settings, config reloading and the process main.

Settings come from flags and ``BACKDIAL_*`` variables into one frozen
dataclass, validated before anything starts.  The config file is re-read when
it changes (polled) or on SIGHUP; a bad file is reported in one line and the
running policy stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from backdial.acceptor.admin import AdminAPI, apply_overlay
from backdial.acceptor.config import AcceptorSettings
from backdial.acceptor.operatorlink import OperatorLink, load_applied, merge
from backdial.acceptor.server import Acceptor
from backdial.adminhttp import start_admin
from backdial.options import load
from backdial.policy import Policy, PolicyError, load_policy
from backdial.runtime import ConfigError, fail, run, setup_logging

log = logging.getLogger("backdial.acceptor")


def settings_from(argv: list[str]) -> AcceptorSettings:
    return load(
        AcceptorSettings,
        argv,
        prog="backdial acceptor",
        description="Own registered service sessions and lease them to sidecar workers. "
        "Every option may also be given as the BACKDIAL_* variable named in its help; "
        "a flag wins over the variable.",
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
