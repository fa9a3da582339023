"""The thin IO around autoscaling: the HPA kept in line with ``spec.autoscaling``, and
the fleet's reports turned into metric samples.

``kube_request`` adapts ``Kube.request`` to the ``Request`` callable used here and
by ``cabundle.py``.  ``apply_hpa`` carries out what ``hpa.decide`` chose from the
namespace's HPAs as the operator's index sees them (create, replace with the live
``resourceVersion``, delete, or nothing).  ``samples`` adapts ``fleet.PodState``
to the metrics API's ``PodSample``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from backdial.operator.fleet import Fleet
from backdial.operator.hpa import HpaAction, HpaDecision
from backdial.operator.kube import Kube
from backdial.operator.metricsapi import PodSample

log = logging.getLogger("backdial.operator.scaling")

# request(method, path, body) -> decoded object; raises an exception with .status on failure.
Request = Callable[[str, str, Any], Awaitable[Any]]


def kube_request(kube: Kube) -> Request:
    """``Kube.request`` as the ``(method, path, body) -> object`` the pieces here use."""

    async def request(method: str, path: str, body: Any) -> Any:
        kind = "application/json-patch+json" if method == "PATCH" else "application/json"
        resp = await kube.request(method, path, body, content_type=kind, ok=(200, 201, 202))
        return resp.body

    return request


def _hpa_path(namespace: str, name: str = "") -> str:
    base = f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers"
    return f"{base}/{name}" if name else base


async def apply_hpa(
    request: Request, decision: HpaDecision, desired: Mapping[str, Any] | None
) -> None:
    """Carry out *decision* (from ``hpa.decide``); a 409 means the namespace changed
    meanwhile, and the next HPA event decides again."""
    action, existing = decision.action, decision.existing
    if action is HpaAction.NONE:
        return
    target = existing if action is HpaAction.DELETE else desired
    assert target is not None
    namespace, name = target["metadata"]["namespace"], target["metadata"]["name"]
    try:
        if action is HpaAction.CREATE:
            assert desired is not None
            await request("POST", _hpa_path(namespace), desired)
        elif action is HpaAction.UPDATE:
            assert desired is not None and existing is not None
            version = existing["metadata"]["resourceVersion"]
            body = {**desired, "metadata": {**desired["metadata"], "resourceVersion": version}}
            await request("PUT", _hpa_path(namespace, name), body)
        else:
            await request("DELETE", _hpa_path(namespace, name), None)
    except Exception as exc:
        if getattr(exc, "status", None) not in (404, 409):
            raise
        return
    log.info("HPA %s/%s: %s", namespace, name, action.value)


def samples(fleet: Fleet, namespace: str) -> dict[str, PodSample]:
    """Every connected pod of *namespace* as a metric sample."""
    return {
        state.name: PodSample(
            state.name, state.waiting, state.leased, state.registered, state.received
        )
        for (ns, _), state in fleet.pods.items()
        if ns == namespace
    }
