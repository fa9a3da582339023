"""The custom metrics API (``custom.metrics.k8s.io``) as plain data: paths in, documents out.

The HPA controller asks, through the API server's aggregation layer, for
``/apis/custom.metrics.k8s.io/v1beta2/namespaces/NS/pods/*/METRIC?labelSelector=...``
and reads one value per pod.  This module routes such a path
(:func:`route`), builds the discovery documents and the ``MetricValueList``
(:func:`value_list`) from the pods' latest reports, and parses label
selectors; ``metricsserver.py`` is the thin TLS/aiohttp shell around it.

Metrics (design §7), per pod, from the operator's fleet state (SHAPES §2):

* ``backdial_requests_waiting``: requests waiting for a session in the pod
  (summed over slices and sidecar workers, invariant 7);
* ``backdial_session_utilization``: leased ÷ registered sessions, in percent;
  a pod with no session registered counts 100 while requests wait for it, else 0.

A pod without a report younger than ``max_age`` is left out (the HPA then
treats it as missing, not as idle).  ``v1beta1`` is served too, for HPA
controllers that ask for it.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GROUP = "custom.metrics.k8s.io"


class Version(enum.StrEnum):
    V1BETA2 = "v1beta2"
    V1BETA1 = "v1beta1"


class MetricName(enum.StrEnum):
    REQUESTS_WAITING = "backdial_requests_waiting"
    SESSION_UTILIZATION = "backdial_session_utilization"


class ApiError(Exception):
    """Answered as a Kubernetes ``Status`` document."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def not_found(message: str) -> ApiError:
    return ApiError(404, "NotFound", message)


@dataclass(frozen=True, slots=True)
class PodSample:
    """One pod's latest report (from ``fleet.PodState``)."""

    name: str
    waiting: int
    leased: int
    registered: int
    received: float  # epoch seconds

    def value(self, metric: MetricName) -> float:
        if metric is MetricName.REQUESTS_WAITING:
            return float(self.waiting)
        if self.registered:
            return 100.0 * self.leased / self.registered
        return 100.0 if self.waiting else 0.0


# -- discovery ----------------------------------------------------------------------------------
def group() -> dict[str, Any]:
    versions = [{"groupVersion": f"{GROUP}/{v.value}", "version": v.value} for v in Version]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": versions,
        "preferredVersion": versions[0],
    }


def group_list() -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]}


def resource_list(version: Version) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{GROUP}/{version.value}",
        "resources": [
            {
                "name": f"pods/{m.value}",
                "singularName": "",
                "namespaced": True,
                "kind": "MetricValueList",
                "verbs": ["get"],
            }
            for m in MetricName
        ],
    }


# -- routing ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MetricQuery:
    version: Version
    namespace: str
    pod: str  # a name, or "*" for every pod matching the selector
    metric: MetricName


Route = dict[str, Any] | MetricQuery


_METRIC_PATH = re.compile(
    rf"^/apis/{re.escape(GROUP)}/(?P<v>[^/]+)/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)"
    r"/(?P<metric>[^/]+)$"
)


def route(path: str) -> Route:
    """A discovery document, or the metric query *path* asks for (ApiError otherwise)."""
    path = path.rstrip("/") or "/"
    if path == "/apis":
        return group_list()
    if path == f"/apis/{GROUP}":
        return group()
    for v in Version:
        if path == f"/apis/{GROUP}/{v.value}":
            return resource_list(v)
    m = _METRIC_PATH.match(path)
    if m is None:
        raise not_found(f"the server could not find the requested resource {path}")
    try:
        version = Version(m["v"])
    except ValueError:
        raise not_found(f"{GROUP} has no version {m['v']!r}") from None
    try:
        metric = MetricName(m["metric"])
    except ValueError:
        known = ", ".join(x.value for x in MetricName)
        raise not_found(f"no metric {m['metric']!r} for pods (known: {known})") from None
    return MetricQuery(version, m["ns"], m["pod"], metric)


# -- label selectors (the HPA sends the scale target's selector) ---------------------------------
@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        if self.op in ("!=", "notin"):
            return value is None or value not in self.values
        if self.op == "exists":
            return value is not None
        return value is None  # "!"


_SET_REQ = re.compile(r"^\s*([^\s!=,()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_REQ = re.compile(r"^\s*([^\s!=,()]+)\s*(==|=|!=)\s*([^\s!=,()]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([^\s!=,()]+)\s*$")


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def parse_selector(text: str) -> list[Requirement]:
    """A Kubernetes label selector string (``a=b,c notin (x,y),!d``); ApiError(400) if bad."""
    reqs: list[Requirement] = []
    for part in _split(text or ""):
        if m := _SET_REQ.match(part):
            values = frozenset(v.strip() for v in m[3].split(",") if v.strip())
            reqs.append(Requirement(m[1], m[2], values))
        elif m := _EQ_REQ.match(part):
            reqs.append(Requirement(m[1], "!=" if m[2] == "!=" else "=", frozenset({m[3]})))
        elif m := _EXISTS.match(part):
            reqs.append(Requirement(m[2], "!" if m[1] else "exists"))
        else:
            raise ApiError(400, "BadRequest", f"invalid label selector {text!r}")
    return reqs


def selector_matches(reqs: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    return all(r.matches(labels) for r in reqs)


# -- values -------------------------------------------------------------------------------------
def quantity(value: float) -> str:
    """A Kubernetes quantity: integers as is, fractions in milli-units."""
    if value == int(value):
        return str(int(value))
    return f"{round(value * 1000)}m"


def _timestamp(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _item(q: MetricQuery, sample: PodSample) -> dict[str, Any]:
    described = {"kind": "Pod", "namespace": q.namespace, "name": sample.name, "apiVersion": "/v1"}
    common = {
        "describedObject": described,
        "timestamp": _timestamp(sample.received),
        "windowSeconds": 1,
        "value": quantity(sample.value(q.metric)),
    }
    if q.version is Version.V1BETA1:
        return {**common, "metricName": q.metric.value}
    return {**common, "metric": {"name": q.metric.value}}


def value_list(
    q: MetricQuery,
    pods: Iterable[tuple[str, Mapping[str, str]]],
    samples: Mapping[str, PodSample],
    *,
    selector: str,
    now: float,
    max_age: float,
) -> dict[str, Any]:
    """The ``MetricValueList`` for *q*: pods (name, labels) of the namespace, their samples."""
    reqs = parse_selector(selector)
    items = []
    for name, labels in sorted(pods, key=lambda p: p[0]):
        if q.pod != "*" and name != q.pod:
            continue
        if q.pod == "*" and not selector_matches(reqs, labels):
            continue
        sample = samples.get(name)
        if sample is None or now - sample.received > max_age:
            continue
        items.append(_item(q, sample))
    if q.pod != "*" and not items:
        raise not_found(f"no fresh {q.metric.value} for pod {q.namespace}/{q.pod}")
    return {
        "kind": "MetricValueList",
        "apiVersion": f"{GROUP}/{q.version.value}",
        "metadata": {},
        "items": items,
    }
