"""The real API server accepts what the injector produces (server-side dry run).

Pure injection is unit-tested in tests/operator; here kube-apiserver's own
validation (native sidecars, probes, projected volumes, security contexts,
the webhook configuration's selectors) judges the output.
"""

from __future__ import annotations

import copy
from typing import Any

import harness
import pytest

from backdial.operator.inject import inject
from backdial.operator.injectsettings import InjectSettings
from backdial.operator.webhookconfig import webhook_configuration
from tests.operator.test_inject import CA, demo_pod

pytestmark = pytest.mark.k8s


def _variants() -> list[dict[str, Any]]:
    probes = demo_pod(terminationGracePeriodSeconds=45)
    app = probes["spec"]["containers"][0]
    app["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}}
    app["livenessProbe"] = {
        "httpGet": {"path": "/live", "port": 8080, "httpHeaders": [{"name": "Host", "value": "x"}]}
    }
    app["startupProbe"] = {"tcpSocket": {"port": "http"}}
    multi = demo_pod(initContainers=[{"name": "setup", "image": "busybox", "command": ["true"]}])
    multi["spec"]["containers"].append(
        {"name": "side", "image": "x", "lifecycle": {"preStop": {"sleep": {"seconds": 1}}}}
    )
    return [demo_pod(), probes, multi]


@pytest.mark.parametrize("with_ca", [True, False])
def test_injected_pods_pass_server_side_validation(
    k8s_cluster: harness.Cluster, k8s_namespace: str, with_ca: bool
) -> None:
    settings = InjectSettings(sidecarWorkers=2, drainQuietPeriod=0.5)
    for pod in _variants():
        pod = copy.deepcopy(pod)
        pod["metadata"]["namespace"] = k8s_namespace
        out = inject(pod, settings, drain_token="t0k", ca_pem=CA if with_ca else "", version="1")
        resp = k8s_cluster.api.request(
            "POST", f"/api/v1/namespaces/{k8s_namespace}/pods?dryRun=All", out
        )
        assert resp.status == 201, resp.text
        created = resp.json()
        names = [c["name"] for c in created["spec"]["initContainers"]]
        assert names[:2] == ["backdial-acceptor", "backdial-sidecar"]
        assert created["metadata"]["labels"]["backdial.dev/injected"] == "true"


def test_webhook_configuration_passes_server_side_validation(k8s_cluster: harness.Cluster) -> None:
    config = webhook_configuration("backdial-system", CA.encode())
    resp = k8s_cluster.api.request(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?dryRun=All",
        config,
    )
    assert resp.status == 201, resp.text
