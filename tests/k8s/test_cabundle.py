"""The operator's CA is patched into the real webhook configuration and APIServices."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import harness
import pytest

from backdial.operator.cabundle import APISERVICE_PATHS, WEBHOOK_CONFIG_PATH, patch_bundles
from backdial.operator.webhookconfig import api_services, webhook_configuration

pytestmark = pytest.mark.k8s

CA1 = b"-----BEGIN CERTIFICATE-----\nMIIBone\n-----END CERTIFICATE-----\n"
CA2 = b"-----BEGIN CERTIFICATE-----\nMIIBtwo\n-----END CERTIFICATE-----\n"


class NotThere(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def requester(cluster: harness.Cluster) -> Any:
    async def request(method: str, path: str, body: Any) -> Any:
        kind = "application/json-patch+json" if method == "PATCH" else "application/json"
        resp = await asyncio.to_thread(cluster.api.request, method, path, body, content_type=kind)
        if resp.status >= 300:
            raise NotThere(resp.status, resp.text)
        return resp.json()

    return request


def bundles(cluster: harness.Cluster) -> list[str]:
    hooks = cluster.get_json(WEBHOOK_CONFIG_PATH)["webhooks"]
    services = [cluster.get_json(p)["spec"].get("caBundle", "") for p in APISERVICE_PATHS]
    return [h["clientConfig"].get("caBundle", "") for h in hooks] + services


def test_ca_bundle_patched_and_rotated(k8s_cluster: harness.Cluster) -> None:
    api = k8s_cluster.api
    request = requester(k8s_cluster)
    # Nothing installed: nothing to patch, no error.
    assert asyncio.run(patch_bundles(request, CA1)) == 0
    objects = [webhook_configuration("backdial-system"), *api_services("backdial-system")]
    created = []
    try:
        for obj in objects:
            plural = (
                "mutatingwebhookconfigurations" if obj["kind"] != "APIService" else "apiservices"
            )
            group = obj["apiVersion"]
            resp = api.request("POST", f"/apis/{group}/{plural}", obj)
            assert resp.status == 201, resp.text
            created.append(f"/apis/{group}/{plural}/{obj['metadata']['name']}")
        assert asyncio.run(patch_bundles(request, CA1)) == 3
        assert bundles(k8s_cluster) == [base64.b64encode(CA1).decode()] * 4
        assert asyncio.run(patch_bundles(request, CA1)) == 0  # already there: no write
        assert asyncio.run(patch_bundles(request, CA2)) == 3
        assert bundles(k8s_cluster) == [base64.b64encode(CA2).decode()] * 4
        # The rest of each object is untouched.
        hooks = k8s_cluster.get_json(WEBHOOK_CONFIG_PATH)["webhooks"]
        assert [h["failurePolicy"] for h in hooks] == ["Fail", "Fail"]
        assert json.dumps(hooks[0]["namespaceSelector"]).count("enabled") == 1
    finally:
        for path in created:
            api.request("DELETE", path)
