"""Service-account tokens for projected volumes, through the TokenRequest API.

Each token is bound to its pod (``boundObjectRef``), so it stops being valid when the pod
is deleted, and carries the pod's name and uid. Like the kubelet, a token is refreshed once
80% of its lifetime has passed (or after 24 hours), see :func:`refresh_at`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from kubernetes_asyncio import client

from .informer import call
from .plan import Obj
from .volumes import TokenSource

MAX_AGE = 24 * 3600.0


@dataclass(frozen=True)
class IssuedToken:
    """A token and when (wall-clock seconds) to ask for a new one."""

    token: str
    refresh_at: float


def refresh_at(issued: float, expires: float) -> float:
    """When a token issued at ``issued`` and expiring at ``expires`` is renewed."""
    return issued + min(0.8 * (expires - issued), MAX_AGE)


def token_request(pod: Obj, source: TokenSource) -> Obj:
    """The TokenRequest body for ``source``, bound to ``pod``."""
    meta = pod["metadata"]
    spec: Obj = {
        "expirationSeconds": source.expiration,
        "boundObjectRef": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "uid": meta["uid"],
        },
    }
    if source.audience:
        spec["audiences"] = [source.audience]
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


def _parse_time(text: str) -> float:
    stamp = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


async def request_token(
    core: client.CoreV1Api, pod: Obj, source: TokenSource, now: float
) -> IssuedToken:
    """Ask the API server for a token of the pod's service account."""
    meta = pod["metadata"]
    account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    body = await call(
        core.create_namespaced_service_account_token,
        account,
        meta["namespace"],
        token_request(pod, source),
    )
    status = body["status"]
    return IssuedToken(status["token"], refresh_at(now, _parse_time(status["expirationTimestamp"])))
