"""The config endpoint: acceptors dial in over TLS and hold a stream (``configstream``).

Per connection: read the upgrade request (bounded size and time), refuse what is not a
stream request, authenticate the bearer token for the claimed pod (``auth.py``), switch
protocols, then run the stream: HELLO tells what the acceptor applied, CONFIG goes out
whenever the pod's desired config differs from that, ACKs and REPORTs go into the fleet,
PINGs keep idle streams alive and dead ones are dropped after ``DEAD_AFTER``.  A newer
stream of the same pod replaces the older one.  A standby replica (kopf peering: another
replica acts) refuses with 503, so acceptors reconnect until they reach the active one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

from backdial import configstream as cs
from backdial.operator.auth import Authenticator, AuthError, Identity
from backdial.operator.fleet import Fleet, PodState
from backdial.operator.hub import Desired, Hub
from backdial.operator.kube import KubeError

log = logging.getLogger("backdial.operator.config")
HEAD_TIMEOUT = 10.0


class PodStream:
    """One acceptor's stream after the upgrade."""

    def __init__(
        self,
        identity: Identity,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hub: Hub,
        fleet: Fleet,
    ) -> None:
        self.identity = identity
        self.key = (identity.namespace, identity.pod)
        self.reader, self.writer = reader, writer
        self.hub, self.fleet = hub, fleet
        self.state: PodState | None = None
        self.sent: tuple[int, str] | None = None  # last CONFIG written
        self.applied: tuple[int, str] = (0, "")
        self.hello = False

    def offer(self, desired: Desired) -> None:
        """The hub has a new desired config for this pod."""
        if desired.pod_uid and desired.pod_uid != self.identity.pod_uid:
            log.warning("stream of %s/%s: token of an older pod incarnation", *self.key)
            self.close()
            return
        if not self.hello or self.writer.is_closing():
            return  # sent after HELLO, once we know what the acceptor has
        want = (desired.generation, desired.version)
        if want == self.sent or (want == self.applied and desired.policy is not None):
            return
        self.sent = want
        self._write(cs.Config(desired.generation, desired.version, desired.owner, desired.policy))

    def _write(self, msg: cs.Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(cs.encode(msg))

    def close(self) -> None:
        self.writer.close()

    async def run(self) -> None:
        old = self.hub.attach(self.key, self)
        if isinstance(old, PodStream):
            old.close()
        self.state = self.fleet.connect(*self.key, self.identity.pod_uid)
        pinger = asyncio.ensure_future(self._ping())
        try:
            while True:
                async with asyncio.timeout(cs.DEAD_AFTER):
                    line = await self.reader.readline()
                if not line.endswith(b"\n"):
                    return  # EOF (or a partial line at EOF)
                self._on(cs.decode(line))
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.LimitOverrunError):
            return
        except ValueError as exc:  # StreamError, and readline's own overrun error
            log.warning("stream of %s/%s: %s", *self.key, exc)
        finally:
            pinger.cancel()
            self.hub.detach(self.key, self)
            self.fleet.disconnect(self.state)
            self.writer.close()

    def _on(self, msg: cs.Message) -> None:
        assert self.state is not None
        if isinstance(msg, cs.Hello):
            self.hello = True
            self.applied = (msg.generation, msg.version)
            self.fleet.applied(self.state, msg.generation, msg.version, msg.owner)
            desired = self.hub.desired.get(self.key)
            if desired is not None:
                self.offer(desired)
        elif isinstance(msg, cs.Ack):
            if msg.ok:
                self.applied = (msg.generation, msg.version)
                owner = self.hub.desired[self.key].owner if self.key in self.hub.desired else ""
                self.fleet.applied(self.state, msg.generation, msg.version, owner)
            else:
                log.warning(
                    "pod %s/%s refused config generation %d: %s",
                    *self.key,
                    msg.generation,
                    msg.error,
                )
        elif isinstance(msg, cs.Report):
            self.fleet.report(self.state, msg.figures())

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(cs.KEEPALIVE)
            self._write(cs.Ping())


class ConfigServer:
    """The TLS listener for ``/v1/namespaces/{ns}/pods/{pod}/config`` streams."""

    def __init__(
        self,
        hub: Hub,
        fleet: Fleet,
        auth: Authenticator,
        active: Callable[[], bool],
    ) -> None:
        self.hub, self.fleet, self.auth, self.active = hub, fleet, auth, active
        self.refused: dict[int, int] = {}  # HTTP status -> count
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, tls: ssl.SSLContext) -> None:
        self._server = await asyncio.start_server(
            self._accept, host, port, ssl=tls, limit=cs.MAX_LINE, ssl_handshake_timeout=10
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for stream in list(self.hub.streams.values()):
            if isinstance(stream, PodStream):
                stream.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            identity = await self._handshake(reader, writer)
            if identity is not None:
                await PodStream(identity, reader, writer, self.hub, self.fleet).run()
        except (ConnectionError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Identity | None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return self._refuse(writer, 431, "request head too large")
        if len(head) > cs.MAX_HEAD:
            return self._refuse(writer, 431, "request head too large")
        try:
            req = cs.parse_request(head)
        except cs.StreamError as exc:
            return self._refuse(writer, 400, str(exc))
        claim = cs.parse_path(req.target)
        if claim is None:
            return self._refuse(writer, 404, "use /v1/namespaces/NAMESPACE/pods/POD/config")
        if req.method != "GET":
            return self._refuse(writer, 405, "use GET with Upgrade")
        if not cs.wants_upgrade(req):
            return self._refuse(writer, 426, f"send Upgrade: {cs.PROTOCOL}")
        token = cs.bearer_token(req)
        if token is None:
            return self._refuse(writer, 401, "a bearer token is required")
        if not self.active():
            return self._refuse(writer, 503, "standby replica; another operator replica acts")
        try:
            identity = await self.auth.authenticate(token, *claim)
        except AuthError as exc:
            log.info("config stream for %s/%s refused: %s", *claim, exc.message)
            return self._refuse(writer, exc.status, exc.message)
        except KubeError as exc:
            log.warning("TokenReview failed: %s", exc)
            return self._refuse(writer, 503, "cannot verify the token now")
        writer.write(cs.encode_response(101))
        return identity

    def _refuse(self, writer: asyncio.StreamWriter, status: int, message: str) -> Identity | None:
        """Answer with an error; returns None (no identity) for the caller to return."""
        self.refused[status] = self.refused.get(status, 0) + 1
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.write(cs.encode_response(status, message))
        return None
