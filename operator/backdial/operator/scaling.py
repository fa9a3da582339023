"""The thin IO around autoscaling: the HPA kept in line with ``spec.autoscaling``, and
the fleet's reports turned into metric samples.

``kube_request`` adapts ``Kube.request`` to the ``Request`` callable used here and
by ``cabundle.py``.  ``sync_hpa`` reads the HPA of the SessionSlice's name, asks ``hpa.hpa_action``
what to do and does it (create, replace with the live ``resourceVersion``,
delete, or nothing).  ``samples`` adapts ``fleet.PodState`` to the metrics
API's ``PodSample``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from backdial.operator.fleet import Fleet
from backdial.operator.hpa import HpaAction, desired_hpa, hpa_action, hpa_name
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


async def sync_hpa(
    request: Request,
    namespace: str,
    slice_name: str,
    slice_uid: str,
    slice_api_version: str,
    autoscaling: Mapping[str, Any] | None,
) -> HpaAction:
    """Make the live HPA match ``spec.autoscaling``; returns what was done."""
    desired = desired_hpa(namespace, slice_name, slice_uid, slice_api_version, autoscaling)
    path = _hpa_path(namespace, hpa_name(slice_name))
    try:
        existing = await request("GET", path, None)
    except Exception as exc:
        if getattr(exc, "status", None) != 404:
            raise
        existing = None
    action = hpa_action(desired, existing, slice_uid)
    if action is HpaAction.CREATE:
        assert desired is not None
        await request("POST", _hpa_path(namespace), desired)
    elif action is HpaAction.UPDATE:
        assert desired is not None and existing is not None
        body = {
            **desired,
            "metadata": {
                **desired["metadata"],
                "resourceVersion": existing["metadata"]["resourceVersion"],
            },
        }
        await request("PUT", path, body)
    elif action is HpaAction.DELETE:
        await request("DELETE", path, None)
    elif action is HpaAction.CONFLICT:
        log.warning("HPA %s/%s exists and is not owned by its SessionSlice", namespace, slice_name)
    if action not in (HpaAction.NONE, HpaAction.CONFLICT):
        log.info("HPA %s/%s: %s", namespace, slice_name, action.value)
    return action


def samples(fleet: Fleet, namespace: str) -> dict[str, PodSample]:
    """Every connected pod of *namespace* as a metric sample."""
    return {
        state.name: PodSample(
            state.name, state.waiting, state.leased, state.registered, state.received
        )
        for (ns, _), state in fleet.pods.items()
        if ns == namespace
    }
