"""Who may read the metrics API: the aggregator, on behalf of an authorized user.

The API server's aggregation layer proxies ``custom.metrics.k8s.io`` requests
to the operator over TLS with its *front-proxy* client certificate and names
the original caller in request headers (``X-Remote-User``,
``X-Remote-Group``).  An extension API server must therefore

1. accept client certificates only when signed by the requestheader CA that
   the API server publishes in ``kube-system/extension-apiserver-authentication``
   (the TLS layer verifies the chain: anything else fails the handshake, and a
   request without a certificate is answered 401);
2. accept only the common names listed in ``requestheader-allowed-names``
   (when the list is empty, any certificate of that CA);
3. take the user from the configured username/group headers, and ask the API
   server whether that user may ``get`` the metric (a SubjectAccessReview;
   the chart's ``system:auth-delegator`` binding allows the operator to ask).

This module is the pure part: the ConfigMap parsed, the caller authenticated,
the SubjectAccessReview body built, its answers cached.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backdial.operator.metricsapi import GROUP, ApiError, MetricQuery

CONFIGMAP_NAMESPACE = "kube-system"
CONFIGMAP_NAME = "extension-apiserver-authentication"


@dataclass(frozen=True, slots=True)
class RequestHeaderConfig:
    ca_pem: str
    allowed_names: tuple[str, ...]
    username_headers: tuple[str, ...]
    group_headers: tuple[str, ...]


def _names(data: Mapping[str, str], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = data.get(key)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{CONFIGMAP_NAME}: {key} is not a JSON list") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{CONFIGMAP_NAME}: {key} is not a list of strings")
    return tuple(value)


def requestheader_config(data: Mapping[str, str]) -> RequestHeaderConfig:
    """Parse the ConfigMap's data (ValueError when there is no requestheader CA)."""
    ca = data.get("requestheader-client-ca-file", "")
    if "BEGIN CERTIFICATE" not in ca:
        raise ValueError(
            f"{CONFIGMAP_NAMESPACE}/{CONFIGMAP_NAME} has no requestheader-client-ca-file: "
            "the API server runs without the aggregation layer's front-proxy certificates"
        )
    return RequestHeaderConfig(
        ca_pem=ca,
        allowed_names=_names(data, "requestheader-allowed-names", ()),
        username_headers=_names(data, "requestheader-username-headers", ("X-Remote-User",)),
        group_headers=_names(data, "requestheader-group-headers", ("X-Remote-Group",)),
    )


@dataclass(frozen=True, slots=True)
class Caller:
    user: str
    groups: tuple[str, ...]


def authenticate(
    cfg: RequestHeaderConfig, common_name: str | None, headers: Mapping[str, list[str]]
) -> Caller:
    """The user the aggregator acts for; *common_name* is of the verified client certificate.

    *headers* maps lower-case names to every value sent.  Raises ApiError 401/403.
    """
    if common_name is None:
        raise ApiError(401, "Unauthorized", "a client certificate is required")
    if cfg.allowed_names and common_name not in cfg.allowed_names:
        raise ApiError(
            403, "Forbidden", f"client certificate {common_name!r} is not an allowed front proxy"
        )
    user = next((v for h in cfg.username_headers for v in headers.get(h.lower(), []) if v), "")
    if not user:
        raise ApiError(401, "Unauthorized", "no user named by the front proxy")
    groups = tuple(g for h in cfg.group_headers for g in headers.get(h.lower(), []) if g)
    return Caller(user, groups)


def access_review(caller: Caller, q: MetricQuery) -> dict[str, Any]:
    """The SubjectAccessReview asking whether *caller* may get the metric."""
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": caller.user,
            "groups": list(caller.groups),
            "resourceAttributes": {
                "namespace": q.namespace,
                "verb": "get",
                "group": GROUP,
                "version": q.version.value,
                "resource": "pods",
                "subresource": q.metric.value,
                "name": "" if q.pod == "*" else q.pod,
            },
        },
    }


class DecisionCache:
    """SubjectAccessReview answers by (caller, namespace, metric), for ``ttl`` seconds.

    The HPA controller asks every 15 s for the same few keys; one review per
    key and ttl keeps the API server out of the request path.
    """

    def __init__(self, ttl: float = 10.0, limit: int = 1024) -> None:
        self.ttl, self.limit = ttl, limit
        self._entries: dict[tuple[Any, ...], tuple[bool, float]] = {}

    @staticmethod
    def key(caller: Caller, q: MetricQuery) -> tuple[Any, ...]:
        return (caller.user, caller.groups, q.namespace, q.pod, q.metric, q.version)

    def get(self, key: tuple[Any, ...], now: float) -> bool | None:
        entry = self._entries.get(key)
        if entry is None or now - entry[1] > self.ttl:
            return None
        return entry[0]

    def put(self, key: tuple[Any, ...], allowed: bool, now: float) -> None:
        if len(self._entries) >= self.limit:
            self._entries = {k: v for k, v in self._entries.items() if now - v[1] <= self.ttl}
            if len(self._entries) >= self.limit:
                self._entries.clear()
        self._entries[key] = (allowed, now)
