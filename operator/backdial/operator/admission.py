"""AdmissionReview in, AdmissionReview out: the webhook's decision as plain data.

``review_response`` never raises for a bad pod: it answers ``allowed: false``
with a message naming the problem (the user sees it in ``kubectl`` or in the
ReplicaSet's events).  A request that is not an AdmissionReview for a pod is a
``ReviewError`` (the server answers 400).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

from backdial.operator.inject import Decision, decide, inject, json_patch
from backdial.operator.injectsettings import InjectError, InjectSettings, overridden

log = logging.getLogger("backdial.operator.webhook")

API_VERSION = "admission.k8s.io/v1"


class ReviewError(ValueError):
    """Not an AdmissionReview we can answer."""


def _request(review: Any) -> dict[str, Any]:
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise ReviewError("expected an AdmissionReview")
    if review.get("apiVersion") != API_VERSION:
        raise ReviewError(f"unsupported AdmissionReview version {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, dict) or not request.get("uid"):
        raise ReviewError("AdmissionReview without request.uid")
    return request


def review_response(
    review: Any,
    settings: InjectSettings,
    *,
    ca_pem: str,
    version: str,
    new_token: Callable[[], str],
) -> dict[str, Any]:
    """The AdmissionReview answering *review* (a pod CREATE)."""
    request = _request(review)
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    out = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    kind = request.get("kind") or {}
    pod = request.get("object")
    if kind.get("kind") != "Pod" or request.get("operation") != "CREATE":
        return out  # not ours to change; the configuration's rules should not send it
    if not isinstance(pod, dict):
        raise ReviewError("pod CREATE without an object")
    decision = decide(pod)
    where = f"{request.get('namespace', '')}/{pod.get('metadata', {}).get('generateName', '')}"
    if decision is not Decision.INJECT:
        log.debug("not injecting %s: %s", where, decision.value)
        return out
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        effective = overridden(settings, annotations)
        injected = inject(pod, effective, drain_token=new_token(), ca_pem=ca_pem, version=version)
    except InjectError as exc:
        response["allowed"] = False
        response["status"] = {
            "code": 400,
            "reason": "BadRequest",
            "message": f"backdial injection: {exc}",
        }
        return out
    patch = json_patch(pod, injected)
    response["patchType"] = "JSONPatch"
    response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return out
