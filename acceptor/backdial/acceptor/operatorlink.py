"""The acceptor's link to the operator: dial out, hold the config stream, apply, report.

With ``--operator URL`` the acceptor dials the operator over TLS (``configstream``),
authenticates with its projected ServiceAccount token (re-read on every connect, since the
kubelet rotates it) for the pod it is, and holds the stream:

* HELLO says which config it has applied; a CONFIG whose slices and limits differ is merged
  over the local config (the ``--config`` file and route edits: routes, tokens and the
  default service stay pod-local), applied like a reload, written to
  ``<run-dir>/operator-config.json`` and acknowledged; a CONFIG with no policy (the
  SessionSlice was deleted) goes back to the local config;
* REPORTs carry the figures (registered, leased, waiting; per slice) every second while
  they change, at least every ``KEEPALIVE`` seconds;
* a lost or refused stream is redialled with capped, jittered backoff.  Nothing is
  unconfigured meanwhile: the acceptor keeps serving with the last applied config, which
  also survives its own restart (the file is loaded at start-up).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from backdial import configstream as cs
from backdial.acceptor.server import Acceptor
from backdial.policy import Policy, PolicyError, policy_from_data
from backdial.sdk.backoff import Backoff

log = logging.getLogger("backdial.acceptor.operator")
STATE_FILE = "operator-config.json"
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class LinkSettings:
    host: str
    port: int
    ca: Path | None
    token_file: Path
    pod: tuple[str, str] | None  # (namespace, name); None: from the token's claims


def parse_operator_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError:
        port = -1
    if parts.scheme != "https" or not parts.hostname or port < 0 or parts.path not in ("", "/"):
        raise ValueError(f"expected https://HOST[:PORT], got {url!r}")
    return parts.hostname, port


def parse_pod(value: str) -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"expected NAMESPACE/NAME, got {value!r}")
    return namespace, name


def token_claims(token: str) -> tuple[str, str] | None:
    """(namespace, pod) named by a pod-bound ServiceAccount token (not verified here: the
    operator verifies the token; this only says which pod we claim to be)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        k8s = payload["kubernetes.io"]
        return str(k8s["namespace"]), str(k8s["pod"]["name"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class Applied:
    """The operator's config in force (what HELLO reports and the file keeps)."""

    generation: int = 0
    version: str = ""
    owner: str = ""
    policy: dict[str, Any] | None = None  # partial: "slices" and "limits"

    def to_json(self) -> str:
        body = {
            "generation": self.generation,
            "version": self.version,
            "owner": self.owner,
            "policy": self.policy,
        }
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def load_applied(run_dir: Path) -> Applied:
    """The persisted config, or nothing (a bad file is reported and ignored)."""
    path = run_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        applied = Applied(
            int(data["generation"]), str(data["version"]), str(data["owner"]), data["policy"]
        )
        if not isinstance(applied.policy, dict):
            raise TypeError("policy is not an object")
        return applied
    except FileNotFoundError:
        return Applied()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("ignoring %s: %s", path, exc)
        return Applied()


def merge(base: dict[str, Any], part: dict[str, Any] | None, source: str) -> Policy:
    """The local config (wire form) with the operator's slices and limits over it."""
    data = dict(base)
    if part is not None:
        data["slices"] = part["slices"]
        # Limits the SessionSlice sets win; the others stay as the local file says.
        data["limits"] = {**(base.get("limits") or {}), **part["limits"]}
    return policy_from_data(data, source)


def figures(acc: Acceptor) -> cs.Report:
    """What the acceptor reports upstream, from its books."""
    ledger = acc.ledger
    leased = {s.name: 0 for s in acc.policy.slices}
    waiting = dict(leased)
    total_leased = 0
    for book in ledger.services.values():
        total_leased += book.total - book.idle_count
        for name, n in book.leased.items():
            leased[name] = leased.get(name, 0) + n
    for (_, name), n in ledger.waiting().items():
        waiting[name] = waiting.get(name, 0) + n
    return cs.Report(
        registered=len(ledger.sessions),
        leased=total_leased,
        waiting=sum(waiting.values()),
        cap=acc.policy.limits.max_sessions,
        slices={n: {"leased": leased[n], "waiting": waiting.get(n, 0)} for n in leased},
    )


class OperatorLink:
    """Holds the stream; ``base`` gives the local config (wire form) to merge over."""

    def __init__(
        self,
        acc: Acceptor,
        settings: LinkSettings,
        base: Callable[[], dict[str, Any]],
        applied: Applied,
    ) -> None:
        self.acc, self.settings, self.base = acc, settings, base
        self.applied = applied
        self.connected = False
        self.error = ""
        self.connects = 0
        self._backoff = Backoff(base=0.5, cap=5.0)
        self._ssl = ssl.create_default_context(
            cafile=str(settings.ca) if settings.ca is not None else None
        )
        self._publish()

    def policy(self) -> Policy:
        """The local config with the applied operator config over it."""
        return merge(self.base(), self.applied.policy, "operator config")

    def _publish(self) -> None:
        self.acc.operator = {
            "connected": self.connected,
            "generation": self.applied.generation,
            "version": self.applied.version,
            "owner": self.applied.owner,
            "cap": self.acc.policy.limits.max_sessions,
            "connects": self.connects,
            "error": self.error,
        }

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self._session(stop)
            except (OSError, ssl.SSLError, TimeoutError, cs.StreamError, EOFError) as exc:
                self._fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            except _Refused as exc:
                self._fail(str(exc))
            finally:
                if self.connected:
                    self.connected = False
                    self._publish()
            if time.monotonic() - started > cs.DEAD_AFTER:
                self._backoff.reset()  # the stream was fine for a while: redial quickly
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._backoff.next())

    def _fail(self, message: str) -> None:
        if message != self.error:
            log.warning(
                "operator link: %s (keeping generation %d)", message, self.applied.generation
            )
        self.error = message
        self._publish()

    async def _session(self, stop: asyncio.Event) -> None:
        s = self.settings
        token = s.token_file.read_text().strip()
        pod = s.pod or token_claims(token)
        if pod is None:
            raise _Refused(f"{s.token_file}: not a pod-bound token; pass --pod NAMESPACE/NAME")
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                s.host, s.port, ssl=self._ssl, server_hostname=s.host, limit=cs.MAX_LINE
            )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                writer.write(cs.encode_request(f"{s.host}:{s.port}", *pod, token))
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers = cs.parse_response(head)
                if status != 101:
                    length = int(headers.get("content-length", "0") or 0)
                    body = await reader.readexactly(min(length, 4096))
                    raise _Refused(f"HTTP {status}: {cs.error_message(body)}")
            self.connects += 1
            self.connected, self.error = True, ""
            self._publish()
            log.info("operator link up (pod %s/%s)", *pod)
            a = self.applied
            writer.write(cs.encode(cs.Hello(a.generation, a.version, a.owner, os.getpid())))
            await self._stream(reader, writer, stop)
        finally:
            writer.close()

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event
    ) -> None:
        reporter = asyncio.ensure_future(self._report(writer))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                line_task = asyncio.ensure_future(reader.readline())
                done, _ = await asyncio.wait(
                    {line_task, stopper}, timeout=cs.DEAD_AFTER, return_when=asyncio.FIRST_COMPLETED
                )
                if line_task not in done:
                    line_task.cancel()
                    if stopper in done:
                        return
                    raise TimeoutError("operator silent for too long")
                line = line_task.result()
                if not line.endswith(b"\n"):
                    raise EOFError("operator closed the stream")
                msg = cs.decode(line)
                if isinstance(msg, cs.Config):
                    writer.write(cs.encode(self._apply(msg)))
                    self._backoff.reset()
        finally:
            reporter.cancel()
            stopper.cancel()

    def _apply(self, msg: cs.Config) -> cs.Ack:
        try:
            policy = merge(self.base(), msg.policy, f"operator config generation {msg.generation}")
        except PolicyError as exc:
            log.error("operator config refused: %s", exc)
            return cs.Ack(msg.generation, msg.version, ok=False, error=str(exc)[:500])
        self.applied = Applied(msg.generation, msg.version, msg.owner, msg.policy)
        self._persist()
        if policy != self.acc.policy:
            self.acc.set_policy(policy)
            self.acc.counters.reloads["operator"] += 1
        log.info(
            "operator config generation %d (%s) from %s applied: cap %d",
            msg.generation,
            msg.version or "local",
            msg.owner,
            policy.limits.max_sessions,
        )
        self._publish()
        return cs.Ack(msg.generation, msg.version)

    def _persist(self) -> None:
        path = self.acc.run_dir / STATE_FILE
        if self.applied.policy is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.applied.to_json())
        tmp.replace(path)

    async def _report(self, writer: asyncio.StreamWriter) -> None:
        pacer = cs.ReportPacer()
        while True:
            report = figures(self.acc)
            if pacer.due(report, time.monotonic()):
                writer.write(cs.encode(report))
            await asyncio.sleep(cs.REPORT_INTERVAL / 4)


class _Refused(Exception):
    """The operator answered but did not open a stream."""
