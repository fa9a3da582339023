"""High availability: which replica acts, decided by kopf peering.

Every replica runs kopf with peering on the ``ClusterKopfPeering`` object ``backdial``:
each writes a keepalive (identity, priority, lifetime) into its status, and kopf pauses
every replica that sees a live peer with a higher or equal priority.  The default priority
is derived from the process start time, so the *oldest* replica acts and a new one (a
rollout, a restart) waits as a standby instead of taking over; a random tail breaks ties.

The operator reads the same object with the same rule (:func:`is_active`) to decide what
only the acting replica may do outside kopf's handlers: serve config streams (a standby
answers 503; the acting replica's pod label routes the Services there: ``role.py``), write
status and Events, renew certificates.  A replica that acted and is told to pause (a higher-priority
operator appeared, e.g. a developer's) exits, and restarts as a standby with a fresh index:
kopf's indexes could otherwise keep pods deleted during the pause.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from backdial.operator.kube import Kube, KubeError

log = logging.getLogger("backdial.operator.peering")
PEERING_NAME = "backdial"
_EPOCH_LIMIT = 4_000_000_000  # seconds; start times below it give positive priorities


def default_priority(started: float, rng: Callable[[], float] = random.random) -> int:
    """Older processes get higher priorities; 1,000 random steps per second break ties."""
    return (_EPOCH_LIMIT - int(started)) * 1000 + int(rng() * 1000)


def _parse_time(value: str) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def is_active(
    status: Mapping[str, Any], identity: str, priority: int, now: datetime.datetime
) -> bool:
    """kopf's rule: pause while a live peer has a priority >= ours."""
    for peer, info in status.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        seen = _parse_time(str(info.get("lastseen", "")))
        lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
        if seen is None or seen + lifetime <= now:
            continue  # dead (kopf cleans it up)
        if int(info.get("priority", 0)) >= priority:
            return False
    return True


class PeeringWatch:
    """Polls the peering object; ``active`` follows kopf's decision."""

    def __init__(
        self,
        kube: Kube,
        identity: str,
        priority: int,
        *,
        name: str = PEERING_NAME,
        interval: float = 2.0,
        on_demoted: Callable[[], None] | None = None,
    ) -> None:
        self.kube, self.identity, self.priority = kube, identity, priority
        self.path = f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}"
        self.name = name
        self.interval = interval
        self.on_demoted = on_demoted
        self.active = False
        self.known = False  # read the object at least once

    async def ensure_object(self) -> None:
        body = {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": self.name},
        }
        await self.kube.request(
            "POST", "/apis/kopf.dev/v1/clusterkopfpeerings", body, ok=(201, 409)
        )

    async def check(self) -> bool:
        got = await self.kube.request("GET", self.path)
        status = (got.body or {}).get("status") or {}
        was = self.active
        self.active = is_active(
            status, self.identity, self.priority, datetime.datetime.now(datetime.UTC)
        )
        self.known = True
        if self.active != was:
            log.info("this replica is now %s", "active" if self.active else "standby")
            if was and self.on_demoted is not None:
                self.on_demoted()
        return self.active

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except KubeError as exc:
                log.warning("cannot read peering %s: %s", self.name, exc)
            await asyncio.sleep(self.interval)
