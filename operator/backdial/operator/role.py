"""Where the operator's Services send traffic: every replica serves the webhook; only the
acting one serves config streams and the custom metrics API.

The webhook's answer is a pure function of the pod, the injection settings and the CA,
which every replica has, so every replica that has its TLS certificate and listeners
reports ready (``/readyz``) and the Service ``backdial-webhook`` sends admission reviews
to any of them: a failover (or a rolling update) leaves no window in which opted-in pods
are refused.  Config streams and the metrics API need the acting replica (kopf peering:
the fleet's reports are there), so that replica labels its own pod
``backdial.dev/operator-role=active`` and the Services ``backdial-operator`` and
``backdial-metrics-api`` select the label as well.  A replica that stops acting, or starts
(a restarted container keeps its pod's labels), removes it.

The label is set with a JSON merge patch (idempotent, so no read first) and re-asserted
every minute in case someone removed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from backdial.operator.kube import Kube, KubeError

log = logging.getLogger("backdial.operator.role")

ROLE_LABEL = "backdial.dev/operator-role"
ACTIVE = "active"
CHECK_INTERVAL = 0.5  # seconds between looks at the peering state (local, no API call)
REASSERT_INTERVAL = 60.0  # seconds between patches that repeat the current label
RETRY_INTERVAL = 2.0  # seconds before a refused patch is tried again
STOP_TIMEOUT = 2.0  # seconds the last patch (label removed) may take at exit


def role_patch(acting: bool) -> dict[str, Any]:
    """The merge patch that makes a pod's role label say *acting* (null removes it)."""
    return {"metadata": {"labels": {ROLE_LABEL: ACTIVE if acting else None}}}


class RoleLabel:
    """Keeps this replica's pod labelled as it acts or not."""

    def __init__(self, kube: Kube, namespace: str, pod: str) -> None:
        self.kube = kube
        self.path = f"/api/v1/namespaces/{namespace}/pods/{pod}"
        self.pod = pod
        self.applied: bool | None = None  # what the pod's label says, once patched
        self.error = ""
        self._task: asyncio.Task[None] | None = None

    async def set(self, acting: bool) -> bool:
        """Patch the label; False (and ``error``) when the API server refused."""
        try:
            await self.kube.request(
                "PATCH", self.path, role_patch(acting), content_type="application/merge-patch+json"
            )
        except KubeError as exc:
            if self.error != str(exc):
                log.error("cannot label pod %s as %s: %s", self.pod, _role(acting), exc)
            self.error = str(exc)
            return False
        if self.applied != acting:
            log.info("pod %s labelled %s", self.pod, _role(acting))
        self.applied, self.error = acting, ""
        return True

    def start(self, acting: Callable[[], bool]) -> None:
        self._task = asyncio.ensure_future(self._run(acting))

    async def _run(self, acting: Callable[[], bool]) -> None:
        """Follow *acting* (checked often, patched on change and every minute)."""
        loop = asyncio.get_running_loop()
        due = 0.0
        while True:
            want = acting()
            # A change is patched at once, unless the last patch failed: then at *due*.
            if (want != self.applied and not self.error) or loop.time() >= due:
                ok = await self.set(want)
                due = loop.time() + (REASSERT_INTERVAL if ok else RETRY_INTERVAL)
            await asyncio.sleep(CHECK_INTERVAL)

    async def stop(self) -> None:
        """On the way out: no more patches, and the pod no longer takes config streams."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.applied:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.set(False)
            except TimeoutError:
                log.warning("pod %s still labelled %s at exit", self.pod, ACTIVE)


def _role(acting: bool) -> str:
    return f"{ROLE_LABEL}={ACTIVE}" if acting else f"without {ROLE_LABEL}"
