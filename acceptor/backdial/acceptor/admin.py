"""The acceptor's admin API: metrics, health, state and routes.

``/metrics`` is where the HPA-facing numbers come from.  Waiting counts are
the sum of what every sidecar worker reported in its last WANT, so requests
waiting inside workers are counted, not only the acceptor's own queue.
Queue-wait histograms and rejections are counted by the workers (where the
waiting happens) and reported in STATS records.

Reads are open; route edits only over the UNIX admin socket or with the bearer
token (``backdial.adminauth``), since inside a pod every container can reach
the TCP admin port.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

from backdial.acceptor.server import Acceptor
from backdial.adminauth import AdminAccess, check_mutation
from backdial.adminhttp import AdminRequest, AdminResponse
from backdial.control import Rejection
from backdial.metrics import (
    LATENCY_BUCKETS,
    Histogram,
    counter,
    gauge,
    histogram,
    registry,
)
from backdial.policy import PolicyError, Route, policy_from_data

# Rejection reasons workers report in STATS (``rejected|<slice>|<reason>``).
REJECT_REASONS = frozenset(reason.value for reason in Rejection)
# Services waited for but not registered that get a label of their own.
MAX_UNREGISTERED = 32


def state(acc: Acceptor) -> dict[str, Any]:
    ledger = acc.ledger
    waiting = ledger.waiting()
    services: dict[str, Any] = {}
    for name, book in ledger.services.items():
        quotas = ledger.quotas(name)
        services[name] = {
            "registered": book.total,
            "idle": book.idle_count,
            "leased": book.total - book.idle_count,
            "slices": {
                s.name: {
                    "quota": quotas.get(s.name, 0),
                    "leased": book.leased[s.name],
                    "waiting": waiting[(name, s.name)],
                }
                for s in acc.policy.slices
            },
        }
    return {
        "generation": acc.generation,
        "uptime_seconds": round(time.time() - acc.started, 3),
        "default_slice": acc.policy.default_slice,
        "default_service": ledger.resolve(""),
        "services": services,
        "registrants": [
            {
                "id": r.id,
                "service": r.service,
                "instance": r.instance,
                "slice_hint": r.slice_hint,
                "sessions": len(r.sessions),
                "idle": len(r.idle),
                "leases_granted": r.served,
            }
            for r in ledger.registrants.values()
        ],
        "workers": [
            {
                "id": w.id,
                "pid": w.pid,
                "name": w.name,
                "leased": sum(1 for s in ledger.sessions.values() if s.worker == w.id),
                "waiting": sum(ledger.wants.get(w.id, {}).values()),
                "revision": ledger.revisions.get(w.id, 1),
                # Requests that may not wait, not answered yet (not waiting: see asking.py).
                "asking": sum(a.n for a in ledger.asks.values() if a.worker == w.id),
            }
            for w in acc.workers.values()
        ],
        "queue_depth": len(ledger.queue),
        "routes": [r.model_dump(by_alias=True) for r in acc.policy.routes],
        "limits": acc.policy.limits.model_dump(mode="json", by_alias=True),
        "operator": acc.operator,  # the operator link (null without --operator)
    }


def _worker_totals(acc: Acceptor) -> collections.Counter[str]:
    totals: collections.Counter[str] = collections.Counter(acc.counters.retired_workers)
    for worker in acc.workers.values():
        for key, value in worker.stats.items():
            totals[key] += int(value)
    return totals


def families(acc: Acceptor) -> Iterator[Metric]:
    """The acceptor's metric families, read from its books and counters when scraped."""
    ledger = acc.ledger
    slices = [s.name for s in acc.policy.slices]
    waiting = ledger.waiting()
    rows_registered = []
    rows_leased = []
    rows_waiting = []
    rows_quota = []
    for name, book in ledger.services.items():
        quotas = ledger.quotas(name)
        for sl in slices:
            labels = {"service": name, "slice": sl}
            # Registered sessions are shared by all slices; per slice we report its quota
            # so an HPA on a slice sees the capacity that slice can count on.
            rows_registered.append(({"service": name, "slice": sl}, float(book.total)))
            rows_quota.append((labels, float(quotas.get(sl, 0))))
            rows_leased.append((labels, float(book.leased[sl])))
            rows_waiting.append((labels, float(waiting[(name, sl)])))
    # Waiting for a service nobody registered yet (an HPA may scale it from zero): a
    # few names by their own label, the rest summed, so labels stay bounded.
    unknown: collections.Counter[tuple[str, str]] = collections.Counter()
    names: set[str] = set()
    for (service, sl), n in sorted(waiting.items()):
        if service not in ledger.services and sl in slices:
            if service in names or len(names) < MAX_UNREGISTERED:
                names.add(service)
                unknown[(service or "(default)", sl)] += n
            else:
                unknown[("(other)", sl)] += n
    rows_waiting += [({"service": s, "slice": sl}, float(n)) for (s, sl), n in unknown.items()]
    yield gauge(
        "backdial_sessions_registered",
        "Sessions registered by services (shared by every slice).",
        rows_registered,
    )
    yield gauge(
        "backdial_acceptor_slice_quota_sessions",
        "Sessions apportioned to the slice from its share.",
        rows_quota,
    )
    yield gauge(
        "backdial_sessions_leased",
        "Sessions leased to sidecar workers for the slice.",
        rows_leased,
    )
    yield gauge(
        "backdial_requests_waiting",
        "Requests waiting for a session, summed over all sidecar workers.",
        rows_waiting,
    )
    yield gauge(
        "backdial_acceptor_registrants",
        "Registered service instances.",
        [({}, float(len(ledger.registrants)))],
    )
    yield gauge(
        "backdial_acceptor_workers",
        "Connected sidecar workers.",
        [({}, float(len(acc.workers)))],
    )
    totals = _worker_totals(acc)
    rejected = []
    for key, v in sorted(totals.items()):
        kind, _, rest = key.partition("|")
        sl, _, reason = rest.partition("|")
        # Worker-reported keys become labels only in their documented shape.
        if kind == "rejected" and sl in slices and reason in REJECT_REASONS:
            rejected.append(({"slice": sl, "reason": reason}, float(v)))
    yield counter(
        "backdial_requests_rejected_total",
        "Requests answered 503 without a session, by slice and reason.",
        rejected,
    )
    hists = []
    for sl in slices:
        hist = Histogram(LATENCY_BUCKETS)
        for i in range(len(hist.counts)):
            hist.counts[i] = totals.get(f"wait_bucket|{sl}|{i}", 0)
        hist.count = sum(hist.counts)
        hist.sum = totals.get(f"wait_sum_us|{sl}", 0) / 1e6
        hists.append(({"slice": sl}, hist))
    yield histogram(
        "backdial_queue_wait_seconds", "Time requests waited for a session, by slice.", hists
    )
    c = acc.counters
    yield counter(
        "backdial_acceptor_registrations_total",
        "Registration attempts by result.",
        [({"result": "ok"}, float(c.registrations_ok))]
        + [({"result": k}, float(v)) for k, v in sorted(c.registrations_err.items())],
    )
    yield counter(
        "backdial_acceptor_sessions_dropped_total",
        "Sessions closed, by reason.",
        [({"reason": k}, float(v)) for k, v in sorted(c.sessions_dropped.items())],
    )
    yield counter(
        "backdial_acceptor_leases_granted_total",
        "Leases granted to workers.",
        [({}, float(c.grants))],
    )
    yield counter(
        "backdial_acceptor_leases_recalled_total",
        "Leases recalled from workers.",
        [({}, float(c.recalls))],
    )
    yield counter(
        "backdial_acceptor_asks_total",
        "Requests that could not wait (ASK), by result: granted a session now, or refused.",
        [({"result": k}, float(c.asks[k])) for k in ("granted", "refused")],
    )
    yield counter(
        "backdial_acceptor_ask_probes_total",
        "Idle sessions asked back at once from workers for requests that could not wait.",
        [({}, float(c.probes))],
    )
    yield counter(
        "backdial_acceptor_control_records_total",
        "Control records received from sidecar workers, by type.",
        [({"type": k.name.lower()}, float(v)) for k, v in sorted(c.records.items())],
    )
    yield counter(
        "backdial_acceptor_config_reloads_total",
        "Config reloads by result.",
        [({"result": k}, float(v)) for k, v in sorted(c.reloads.items())],
    )
    yield counter(
        "backdial_acceptor_peers_refused_total",
        "Connections refused on a UNIX socket because of the peer's uid, by socket.",
        [({"socket": k}, float(v)) for k, v in sorted(c.peers_refused.items())],
    )
    yield counter(
        "backdial_acceptor_control_violations_total",
        "Control peers that broke a bound (disconnected, or clamped for want_clamped).",
        [({"kind": k}, float(v)) for k, v in sorted(c.violations.items())],
    )
    yield counter(
        "backdial_acceptor_services_forgotten_total",
        "Service names forgotten after having no sessions (forgetServicesAfter, maxServices).",
        [({}, float(c.services_forgotten))],
    )
    yield counter(
        "backdial_acceptor_admin_denied_total",
        "Admin requests refused: 401 without valid credentials, 403 browser-borne or no token.",
        [({"code": str(k)}, float(v)) for k, v in sorted(c.admin_denied.items())],
    )
    yield gauge(
        "backdial_acceptor_config_generation",
        "Generation of the policy in force.",
        [({}, float(acc.generation))],
    )
    if acc.operator is not None:
        yield gauge(
            "backdial_acceptor_operator_connected",
            "1 while the config stream to the operator is up.",
            [({}, float(bool(acc.operator["connected"])))],
        )
        yield gauge(
            "backdial_acceptor_operator_generation",
            "SessionSlice generation of the operator config in force (0: none).",
            [({}, float(acc.operator["generation"]))],
        )


def apply_overlay(data: dict[str, Any], overlay: dict[str, dict[str, Any] | None]) -> None:
    """Apply route edits made through the admin API on top of the file's routes."""
    routes = [r for r in data.get("routes") or [] if r.get("name") not in overlay]
    routes.extend(r for r in overlay.values() if r is not None)
    data["routes"] = routes


class AdminAPI:
    """Routes admin requests; route edits are kept as an overlay on the config file.

    The overlay survives config-file reloads (so ``backdial route add`` is not
    undone by the next edit of the file) but not an acceptor restart.
    """

    def __init__(
        self,
        acc: Acceptor,
        overlay: dict[str, dict[str, Any] | None],
        access: AdminAccess | None = None,
    ) -> None:
        self.acc = acc
        self.overlay = overlay
        self.access = access or AdminAccess()
        self.metrics = registry(lambda: families(acc))

    async def __call__(self, req: AdminRequest) -> AdminResponse:
        acc = self.acc
        denial = check_mutation(req.method, req.headers, req.via_unix, self.access, bool(req.body))
        if denial is not None:
            acc.counters.admin_denied[denial.status] += 1
            return AdminResponse.denied(denial)
        if req.path == "/metrics":
            return AdminResponse.exposition(self.metrics, req)
        if req.path == "/healthz":
            return AdminResponse.text(200, "ok\n")
        if req.path == "/readyz":
            if acc.draining:
                return AdminResponse.text(503, "draining\n")
            return AdminResponse.text(200, "ready\n")
        if req.path == "/v1/state":
            return AdminResponse.of_json(200, state(acc))
        if req.path == "/v1/routes":
            return self._routes(req)
        return AdminResponse.text(404, "not found\n")

    def _routes(self, req: AdminRequest) -> AdminResponse:
        acc = self.acc
        routes = [r.model_dump(by_alias=True) for r in acc.policy.routes]
        if req.method == "GET":
            return AdminResponse.of_json(200, {"routes": routes})
        if req.method == "POST":
            try:
                route = Route.model_validate(req.json())
            except Exception as exc:  # pydantic or JSON error: tell the caller precisely
                return AdminResponse.of_json(400, {"error": str(exc).splitlines()[0:3]})
            routes = [r for r in routes if r["name"] != route.name]
            routes.append(route.model_dump(by_alias=True))
        elif req.method == "DELETE":
            name = (req.query.get("name") or [""])[0]
            if not any(r["name"] == name for r in routes):
                return AdminResponse.of_json(404, {"error": f"no route named {name!r}"})
            routes = [r for r in routes if r["name"] != name]
        else:
            return AdminResponse.text(405, "use GET, POST or DELETE\n")
        data = acc.policy.to_wire()
        data["routes"] = routes
        try:
            policy = policy_from_data(data, "routes")
        except PolicyError as exc:
            return AdminResponse.of_json(400, {"error": str(exc)})
        if req.method == "POST":
            self.overlay[route.name] = route.model_dump(by_alias=True)
        else:
            self.overlay[name] = None
        acc.set_policy(policy)
        return AdminResponse.of_json(200, {"routes": routes})
