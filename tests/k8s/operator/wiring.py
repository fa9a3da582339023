"""How the API server reaches the session's operator process, as the chart wires it.

Services ``backdial-webhook`` and ``backdial-metrics-api`` whose EndpointSlices point
at 127.0.0.1 and the operator's free ports (the harness accepts loopback endpoint
addresses): the API server calls the webhook and the metrics API through them.
(Injected pods reach the config port through ``backdial-operator``, which
``opstack.py`` installs.)
The webhook configuration and the APIServices are the ones ``webhookconfig.py``
renders; the operator patches its CA into them. The chart's ``helm install``
version of this lives with the chart's tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import harness

from backdial.operator.webhookconfig import (
    CONFIG_NAME,
    METRICS_SERVICE,
    WEBHOOK_SERVICE,
    api_services,
    webhook_configuration,
)
from tests.helpers import wait_for
from tests.k8s.operator.opstack import OPERATOR_NS, OperatorEnv


class ApiFailure(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def requester(cluster: harness.Cluster) -> Any:
    """The admin's API access as the ``(method, path, body) -> object`` the operator uses."""

    async def request(method: str, path: str, body: Any) -> Any:
        kind = "application/json-patch+json" if method == "PATCH" else "application/json"
        resp = await asyncio.to_thread(cluster.api.request, method, path, body, content_type=kind)
        if resp.status >= 300:
            raise ApiFailure(resp.status, resp.text)
        return resp.json()

    return request


def _service(name: str, port: int, target: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": OPERATOR_NS},
            "spec": {"ports": [{"name": "https", "port": port, "targetPort": target}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-local",
                "namespace": OPERATOR_NS,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": target, "protocol": "TCP"}],
        },
    ]


def install(env: OperatorEnv) -> None:
    env.cluster.apply(
        [
            *_service(WEBHOOK_SERVICE, 443, env.webhook_port),
            *_service(METRICS_SERVICE, 443, env.metrics_port),
            webhook_configuration(OPERATOR_NS),
            *api_services(OPERATOR_NS),
        ]
    )


def wait_wired(cluster: harness.Cluster) -> None:
    """The API server trusts the operator: CA bundles set, the metrics APIService available."""

    def available() -> bool:
        name = api_services(OPERATOR_NS)[0]["metadata"]["name"]
        svc = cluster.get_json(f"/apis/apiregistration.k8s.io/v1/apiservices/{name}")
        conds = (svc.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Available" and c["status"] == "True" for c in conds)

    def bundled() -> bool:
        config = cluster.get_json(
            f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{CONFIG_NAME}"
        )
        return all(w["clientConfig"].get("caBundle") for w in config["webhooks"])

    wait_for(bundled, timeout=60, what="webhook CA bundle")
    wait_for(available, timeout=60, what="metrics APIService available")


def bundles(cluster: harness.Cluster) -> list[str]:
    """The caBundle of both webhooks and both APIServices."""
    hooks = cluster.get_json(
        f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{CONFIG_NAME}"
    )["webhooks"]
    services = [
        cluster.get_json(f"/apis/apiregistration.k8s.io/v1/apiservices/{s['metadata']['name']}")[
            "spec"
        ].get("caBundle", "")
        for s in api_services(OPERATOR_NS)
    ]
    return [h["clientConfig"].get("caBundle", "") for h in hooks] + services


def uninstall(cluster: harness.Cluster) -> None:
    api = cluster.api
    api.request(
        "DELETE",
        f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{CONFIG_NAME}",
    )
    for svc in api_services(OPERATOR_NS):
        api.request(
            "DELETE", f"/apis/apiregistration.k8s.io/v1/apiservices/{svc['metadata']['name']}"
        )
    for name in (WEBHOOK_SERVICE, METRICS_SERVICE):
        api.request("DELETE", f"/api/v1/namespaces/{OPERATOR_NS}/services/{name}")
        api.request(
            "DELETE",
            f"/apis/discovery.k8s.io/v1/namespaces/{OPERATOR_NS}/endpointslices/{name}-local",
        )
