"""``backdial operator``: settings, the listeners, and kopf, in one event loop.

The process runs:

* kopf (``handlers.py``): indexes, events, one worker per SessionSlice, peering;
* the config endpoint (``configserver.py``, TLS) where acceptors hold their streams;
* the health endpoint (plain HTTP): ``/healthz``, ``/readyz`` (200 on every replica that
  can serve the webhook, acting or standby), ``/metrics``;
* TLS upkeep (``certs.py``), the peering watch (``peering.py``) and the role label of this
  replica's pod (``role.py``: the Services send config streams and metric queries to the
  acting replica, admission reviews to any ready one);
* the mutating webhook and the custom metrics API, with CA bundle upkeep
  (``injectservices.py``; docs/injection.md, docs/autoscaling.md).

``App`` holds the shared state other listeners build on (the fleet, the hub, the TLS
material, the API client, whether this replica acts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import kopf
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from backdial.adminhttp import AdminRequest, AdminResponse, start_admin
from backdial.metrics import counter, gauge, registry
from backdial.operator import certs
from backdial.operator.auth import Authenticator
from backdial.operator.configserver import ConfigServer
from backdial.operator.fleet import Fleet
from backdial.operator.handlers import Shared, make_registry
from backdial.operator.hub import Hub
from backdial.operator.injectservices import InjectServices, ServicesSettings
from backdial.operator.kube import SA_DIR, Kube, KubeError
from backdial.operator.models import INJECTED_LABEL
from backdial.operator.peering import PEERING_NAME, PeeringWatch, default_priority
from backdial.operator.role import RoleLabel
from backdial.operator.scaling import kube_request
from backdial.options import group, hostport, integer, load, log_level, option
from backdial.runtime import ConfigError, fail, run, setup_logging

log = logging.getLogger("backdial.operator")
EXIT_DEMOTED = 3


def _default_namespace() -> str:
    try:
        return (SA_DIR / "namespace").read_text().strip()
    except OSError:
        return "backdial-system"


def tls_dir(raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw)
    if not path.is_dir():
        raise ValueError(f"{raw}: not a directory")
    return path


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    health_listen: tuple[str, int] = option(
        "--health-listen",
        parse=hostport,
        default="0.0.0.0:8080",
        help="HOST:PORT for /healthz, /readyz and /metrics, plain HTTP",
    )
    config_listen: tuple[str, int] = option(
        "--config-listen",
        parse=hostport,
        default="0.0.0.0:8444",
        help="HOST:PORT for the acceptors' config streams, TLS",
    )
    namespace: str = option(
        "--namespace",
        default="",
        help="the operator's namespace, home of the TLS Secret (empty: the ServiceAccount's, "
        "else backdial-system)",
    )
    tls_dir: Path | None = option(
        "--tls-dir",
        parse=tls_dir,
        help="read tls.crt, tls.key and ca.crt from DIR (cert-manager) instead of managing "
        f"the Secret {certs.SECRET_NAME}",
    )
    tls_sans: tuple[str, ...] = option(
        "--tls-san",
        many=True,
        env="TLS_SANS",
        help="extra DNS name or IP for the serving certificate (repeatable)",
    )
    peering: str = option(
        "--peering", default=PEERING_NAME, help="ClusterKopfPeering object shared by the replicas"
    )
    standalone: bool = option(
        "--standalone", switch=True, help="no peering: this process always acts (one replica)"
    )
    priority: int | None = option(
        "--priority",
        parse=integer(),
        help="peering priority (default: older processes win; docs/operator.md)",
    )
    peering_lifetime: int = option(
        "--peering-lifetime",
        parse=integer(2),
        default="60",
        help="seconds a replica that stopped without saying so still counts as alive "
        "(kopf keepalives)",
    )
    all_pods: bool = option(
        "--all-pods",
        switch=True,
        help=f"watch every pod, not only those labelled {INJECTED_LABEL}=true",
    )
    pod_name: str = option(
        "--pod-name",
        default="",
        help="this replica's pod (the chart sets it from the downward API): while acting, "
        "the pod is labelled backdial.dev/operator-role=active, which the Services of the "
        "config streams and the metrics API select (empty: no label)",
    )
    services: ServicesSettings = group(ServicesSettings)
    log_level: str = log_level()

    @property
    def rank(self) -> int:
        """The peering priority in force (``resolved`` fills it in)."""
        return self.priority if self.priority is not None else default_priority(time.time())

    def resolved(self) -> OperatorSettings:
        """With the namespace and the peering priority filled in from the process."""
        return replace(self, namespace=self.namespace or _default_namespace(), priority=self.rank)


def settings_from(argv: list[str]) -> OperatorSettings:
    settings = load(
        OperatorSettings,
        argv,
        prog="backdial operator",
        description="Reconcile SessionSlice objects into per-pod capacity and slicing, "
        "delivered to the pods' acceptors over authenticated streams (docs/operator.md). "
        "Every option may also be given as the BACKDIAL_* variable named in its help; "
        "a flag wins.",
    )
    return settings.resolved()


@dataclass(slots=True)
class App:
    """The operator process's shared state."""

    settings: OperatorSettings
    kube: Kube
    hub: Hub = field(default_factory=Hub)
    fleet: Fleet = field(default_factory=Fleet)
    tls: certs.ServerTLS = field(default_factory=certs.ServerTLS)
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}/{os.getpid()}")
    peering: PeeringWatch | None = None
    config: ConfigServer | None = None
    inject: InjectServices | None = None
    role: RoleLabel | None = None
    serving: bool = False  # every listener started
    shared: Shared | None = None
    kopf_ready: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = registry(self.families)

    def selected_pods(self, namespace: str) -> list[tuple[str, dict[str, str]]]:
        """(name, labels) of the pods SessionSlices of *namespace* select (metrics API)."""
        plans = self.shared.plans.values() if self.shared else ()
        return [
            (pod.name, dict(pod.labels))
            for plan in plans
            if plan.slice.namespace == namespace
            for pod in plan.owned
        ]

    def active(self) -> bool:
        """This replica acts (standalone, or kopf peering says no peer outranks it)."""
        return self.peering is None or self.peering.active

    def acting(self) -> bool:
        """Active and kopf is up: what the pod's role label says (``role.py``)."""
        return self.active() and self.kopf_ready.is_set()

    def ready(self) -> tuple[bool, str]:
        """Ready to serve the webhook, which every replica does (standbys too)."""
        if self.tls.material is None:
            return False, "no TLS certificate yet"
        if not self.serving:
            return False, "starting"
        if self.role is not None and self.role.applied is None:
            # A restarted container may still carry the label: not before it is right.
            return False, "role label not set yet" + (
                f": {self.role.error}" if self.role.error else ""
            )
        if self.acting():
            return True, "ready (acting)"
        return True, "ready (standby: serves the webhook)"

    async def admin(self, req: AdminRequest) -> AdminResponse:
        if req.path == "/healthz":
            return AdminResponse.text(200, "ok\n")
        if req.path == "/readyz":
            ok, why = self.ready()
            return AdminResponse.text(200 if ok else 503, why + "\n")
        if req.path == "/metrics":
            return AdminResponse.exposition(self.metrics, req)
        if req.path == "/v1/state":
            return AdminResponse.of_json(200, self.state())
        return AdminResponse.text(404, "not found\n")

    def state(self) -> dict[str, Any]:
        plans = self.shared.plans if self.shared else {}
        return {
            "identity": self.identity,
            "active": self.active(),
            "acting": self.acting(),
            "priority": self.settings.priority,
            "peering_checked": self.peering is None or self.peering.known,
            "ready": self.ready()[0],
            "role_label": None if self.role is None else self.role.applied,
            "sessionslices": {
                key: {"pods": len(p.owned), "error": p.error, "conflicts": p.conflicts}
                for key, p in sorted(plans.items())
            },
            "streams": len(self.hub.streams),
            "recomputes": self.shared.recomputes if self.shared else 0,
            "status_writes": self.shared.status_writes if self.shared else 0,
            "api_requests": dict(self.kube.requests),
        }

    def families(self) -> Iterator[Metric]:
        """The operator's metric families, read from its counters when scraped."""
        yield gauge(
            "backdial_operator_active",
            "1 on the replica that acts.",
            [({}, float(self.active()))],
        )
        yield gauge(
            "backdial_operator_streams",
            "Acceptors holding a config stream.",
            [({}, float(len(self.hub.streams)))],
        )
        plans = self.shared.plans if self.shared else {}
        yield gauge(
            "backdial_operator_sessionslices",
            "SessionSlices reconciled.",
            [({}, float(len(plans)))],
        )
        yield gauge(
            "backdial_operator_pods",
            "Pods configured.",
            [({}, float(sum(len(p.owned) for p in plans.values())))],
        )
        yield counter(
            "backdial_operator_config_pushes_total",
            "Changed per-pod configs offered to connected streams.",
            [({}, float(self.hub.pushes))],
        )
        writes = self.shared.status_writes if self.shared else 0
        yield counter(
            "backdial_operator_status_writes_total",
            "SessionSlice status patches.",
            [({}, float(writes))],
        )
        yield counter(
            "backdial_operator_api_requests_total",
            "Kubernetes API requests made outside kopf, by verb.",
            [({"verb": v}, float(n)) for v, n in sorted(self.kube.requests.items())],
        )
        config = self.config
        yield counter(
            "backdial_operator_stream_refusals_total",
            "Config stream requests refused, by HTTP status.",
            [
                ({"code": str(c)}, float(n))
                for c, n in sorted((config.refused if config else {}).items())
            ],
        )
        reviews = config.auth.reviews if config else 0
        yield counter(
            "backdial_operator_token_reviews_total",
            "TokenReviews sent (cache misses).",
            [({}, float(reviews))],
        )


async def serve(cfg: OperatorSettings, stop: asyncio.Event) -> int:
    try:
        kube = Kube.from_environment()
    except (KubeError, OSError, kopf.LoginError) as exc:
        return fail(f"cannot reach Kubernetes: {exc}")
    app = App(cfg, kube)
    app.fleet.on_change = app.hub.figures_changed
    exit_code = 0

    def demoted() -> None:
        nonlocal exit_code
        log.warning("another replica outranks this one: exiting to restart as a standby")
        exit_code = EXIT_DEMOTED
        stop.set()

    background: list[asyncio.Future[Any]] = []
    try:
        health = await start_admin(*cfg.health_listen, app.admin)
        names = certs.service_names(cfg.namespace, cfg.tls_sans)
        if cfg.tls_dir is not None:
            dir_source = certs.DirSource(cfg.tls_dir, app.tls)
            dir_source.sync()
            background.append(asyncio.ensure_future(dir_source.run()))
        else:
            source = certs.SecretSource(kube, cfg.namespace, names, app.tls)
            await source.sync()
            background.append(asyncio.ensure_future(source.run()))
        if not cfg.standalone:
            app.peering = PeeringWatch(
                kube, app.identity, cfg.rank, name=cfg.peering, on_demoted=demoted
            )
            await app.peering.ensure_object()
            background.append(asyncio.ensure_future(app.peering.run()))
        auth = Authenticator(_token_review(kube))
        app.config = ConfigServer(app.hub, app.fleet, auth, app.active)
        await app.config.start(*cfg.config_listen, app.tls.context())
        app.inject = InjectServices(
            cfg.services,
            kube_request(kube),
            lambda: app.tls.material.ca if app.tls.material else b"",
            app.fleet,
            app.selected_pods,
            manage_bundles=cfg.tls_dir is None,
        )
        await app.inject.start(app.tls.context(), app.tls.context())
        app.serving = True
        if cfg.pod_name:
            app.role = RoleLabel(kube, cfg.namespace, cfg.pod_name)
            app.role.start(app.acting)
    except (OSError, KubeError) as exc:
        for task in background:
            task.cancel()
        await kube.close()
        return fail(f"cannot start the operator: {exc}")
    app.shared = Shared(app.hub, app.fleet, kube)
    registry = make_registry(
        None if cfg.all_pods else f"{INJECTED_LABEL}=true", cfg.peering_lifetime
    )
    kopf_stop = asyncio.Event()
    operator = asyncio.ensure_future(
        kopf.operator(
            registry=registry,
            clusterwide=True,
            standalone=cfg.standalone,
            priority=cfg.rank,
            peering_name=None if cfg.standalone else cfg.peering,
            identity=app.identity,  # type: ignore[arg-type]  # kopf's NewType of str
            memo=kopf.Memo(shared=app.shared),
            stop_flag=kopf_stop,
            ready_flag=app.kopf_ready,
        )
    )
    log.info(
        "operator %s: config streams on %s:%d, health on %s:%d, priority %d%s",
        app.identity,
        *cfg.config_listen,
        *cfg.health_listen,
        cfg.rank,
        " (standalone)" if cfg.standalone else f", peering {cfg.peering}",
    )
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({operator, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        kopf_stop.set()
        stopper.cancel()
        app.shared.stop_all()
        app.config.close()
        await app.inject.close()
        if app.role is not None:
            await app.role.stop()
        health.close()
        for task in background:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(operator, 10)
        await kube.close()
    if operator.done() and not operator.cancelled() and operator.exception() is not None:
        log.error("kopf stopped: %s", operator.exception())
        return 1
    return exit_code


def _token_review(kube: Kube) -> Any:
    async def review(token: str) -> dict[str, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": ["backdial"]},
        }
        resp = await kube.request(
            "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body, ok=(200, 201)
        )
        status = (resp.body or {}).get("status") or {}
        return dict(status)

    return review


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = settings_from(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(cfg.log_level)
    if cfg.log_level != "debug":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("kopf.activities").setLevel(logging.WARNING)
    return run(lambda stop: serve(cfg, stop))


if __name__ == "__main__":
    sys.exit(main())
