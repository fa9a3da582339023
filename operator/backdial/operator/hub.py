"""Where reconcile results meet the acceptors' streams, inside the operator process.

SessionSlice workers (``handlers.py``) publish plans; the hub keeps the resulting desired
config of every owned pod and offers each change to that pod's stream, if connected
(``configserver.py``).  Streams ask for their pod's desired config when they start.  The
hub also carries "something changed in namespace X" signals from the kopf handlers and the
fleet to the workers, so a burst of pod events becomes one recompute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from backdial.operator.fleet import PodKey
from backdial.operator.reconcile import Plan


@dataclass(frozen=True, slots=True)
class Desired:
    """One pod's config as a stream sends it (``policy`` None: revert to local config)."""

    pod_uid: str
    owner: str
    generation: int
    version: str
    policy: Any  # Mapping[str, Any] | None, shared between the pods of one cap


class Stream(Protocol):
    def offer(self, desired: Desired) -> None: ...


class Signal:
    """Events of the workers interested in one namespace."""

    def __init__(self) -> None:
        self.events: set[asyncio.Event] = set()

    def set(self) -> None:
        for event in self.events:
            event.set()


class Hub:
    def __init__(self) -> None:
        self.desired: dict[PodKey, Desired] = {}
        self.by_owner: dict[str, set[PodKey]] = {}
        self.streams: dict[PodKey, Stream] = {}
        self._specs: dict[str, Signal] = {}  # pods or SessionSlices changed
        self._figures: dict[str, Signal] = {}  # pod reports changed
        self._hpas: dict[str, Signal] = {}  # HorizontalPodAutoscalers changed
        self.pushes = 0  # desired configs offered to connected streams

    # -- signals ---------------------------------------------------------------------------

    def subscribe(self, namespace: str) -> tuple[asyncio.Event, asyncio.Event, asyncio.Event]:
        """(spec changed, figures changed, HPAs changed) events for a worker of *namespace*."""
        spec, figures, hpas = asyncio.Event(), asyncio.Event(), asyncio.Event()
        spec.set()  # compute once at start
        self._specs.setdefault(namespace, Signal()).events.add(spec)
        self._figures.setdefault(namespace, Signal()).events.add(figures)
        self._hpas.setdefault(namespace, Signal()).events.add(hpas)
        return spec, figures, hpas

    def unsubscribe(self, namespace: str, events: Iterable[asyncio.Event]) -> None:
        for table in (self._specs, self._figures, self._hpas):
            signal = table.get(namespace)
            if signal is not None:
                signal.events.difference_update(events)
                if not signal.events:
                    del table[namespace]

    def touch(self, namespace: str) -> None:
        """Pods or SessionSlices of *namespace* changed."""
        signal = self._specs.get(namespace)
        if signal is not None:
            signal.set()

    def figures_changed(self, namespace: str) -> None:
        signal = self._figures.get(namespace)
        if signal is not None:
            signal.set()

    def hpas_changed(self, namespace: str) -> None:
        """An HPA of *namespace* was created, changed (its status too) or deleted."""
        signal = self._hpas.get(namespace)
        if signal is not None:
            signal.set()

    # -- desired configs ----------------------------------------------------------------------

    def publish(self, plan: Plan) -> int:
        """Record a plan's configs; offer changes to connected streams; returns how many
        pods' desired config changed.  An invalid plan changes nothing (pods keep what
        they have)."""
        owner = plan.slice.key
        if not plan.valid:
            return 0
        keys: set[PodKey] = set()
        changed = 0
        for pod in plan.owned:
            key = (pod.namespace, pod.name)
            keys.add(key)
            config = plan.configs[pod.name]
            want = Desired(pod.uid, owner, plan.slice.generation, config.version, config.policy)
            if self.desired.get(key) != want:
                changed += 1
                self._set(key, want)
        for key in self.by_owner.get(owner, set()) - keys:
            if self.desired.get(key, None) and self.desired[key].owner == owner:
                del self.desired[key]  # no longer ours: keep the pod's config, stop managing it
        self.by_owner[owner] = keys
        return changed

    def release(self, owner: str, revert: bool) -> None:
        """A SessionSlice is gone (*revert*: deleted, its pods go back to their local
        config) or its worker stopped (the operator pauses or exits: pods keep theirs)."""
        for key in self.by_owner.pop(owner, set()):
            current = self.desired.get(key)
            if current is None or current.owner != owner:
                continue
            if revert:
                self._set(key, Desired(current.pod_uid, owner, current.generation, "", None))
            else:
                del self.desired[key]

    def _set(self, key: PodKey, want: Desired) -> None:
        self.desired[key] = want
        stream = self.streams.get(key)
        if stream is not None:
            self.pushes += 1
            stream.offer(want)

    # -- streams ----------------------------------------------------------------------------------

    def attach(self, key: PodKey, stream: Stream) -> Stream | None:
        """Register a pod's stream; returns the one it replaces (the caller closes it)."""
        old = self.streams.get(key)
        self.streams[key] = stream
        return old

    def detach(self, key: PodKey, stream: Stream) -> None:
        if self.streams.get(key) is stream:
            del self.streams[key]
