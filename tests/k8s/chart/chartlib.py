"""Rendering the chart with the built helm, and the values combinations the tests use."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import harness
import yaml

from tests.helpers import ROOT

CHART = ROOT / "charts" / "backdial"
KUBE_VERSION = "1.36.0"  # helm template's default (1.20) is older than the chart's kubeVersion

# Workloads that must really run go to the process node (SHAPES §1).
PROCESS_NODE_VALUES: dict[str, Any] = {
    "operator": {
        "nodeSelector": {"backdial.dev/node-kind": "process"},
        "tolerations": [
            {"key": "backdial.dev/process-node", "operator": "Exists", "effect": "NoSchedule"}
        ],
    }
}

# The combinations the issue names, and a few more corners.
COMBOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "crds-off": {"crds": {"enabled": False}},
    "cert-manager": {"certManager": {"enabled": True}},
    "cert-manager-cluster-issuer": {
        "certManager": {
            "enabled": True,
            "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
        }
    },
    "minimal": {
        "crds": {"enabled": False},
        "webhook": {"enabled": False},
        "metricsApi": {"enabled": False},
        "operator": {"replicaCount": 1},
        "serviceAccount": {"create": False, "name": "default"},
    },
    "everything": {
        "image": {
            "repository": "registry.example/backdial",
            "digest": "sha256:" + "ab" * 32,
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "crds": {"enabled": True, "keep": False},
        "certManager": {"enabled": True, "duration": "720h", "renewBefore": "24h"},
        "operator": {
            "replicaCount": 3,
            "logLevel": "debug",
            "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": 1}},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "ops",
                    "effect": "NoExecute",
                    "tolerationSeconds": 60,
                }
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/arch",
                                        "operator": "In",
                                        "values": ["amd64"],
                                    }
                                ]
                            }
                        ]
                    }
                }
            },
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "backdial"}},
                }
            ],
            "priorityClassName": "system-cluster-critical",
            "podAnnotations": {"example.com/a": "1"},
            "podLabels": {"team": "platform"},
            "deploymentAnnotations": {"example.com/d": "2"},
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
            "extraArgs": ["--log-level=debug"],
            "terminationGracePeriodSeconds": 45,
            "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
        },
        "serviceAccount": {"create": True, "name": "bd-op", "annotations": {"example.com/sa": "x"}},
        "webhook": {"enabled": True, "excludeNamespaces": ["legacy", "batch"]},
        "metricsApi": {"enabled": True},
        "inject": {
            "image": {
                "repository": "registry.example/backdial",
                "tag": "0.1.0-rc1",
                "pullPolicy": "Always",
            },
            "portName": "web",
            "defaultPort": 8000,
            "acceptorAdminPort": 9911,
            "sidecarAdminPort": 9912,
            "acceptorResources": {
                "requests": {"cpu": "10m", "memory": "16Mi"},
                "limits": {"memory": "128Mi"},
            },
            "sidecarResources": {"requests": {"cpu": "20m", "memory": "32Mi"}},
            "runAsUser": 4242,
            "drainQuietPeriod": "2500ms",
            "sidecarWorkers": 2,
            "tokenExpirationSeconds": 900,
        },
    },
}


def values_file(values: dict[str, Any], tmp: Path | None = None) -> Path:
    directory = tmp or Path(tempfile.mkdtemp(prefix="bd-values-"))
    path = directory / "values.json"  # JSON is YAML
    path.write_text(json.dumps(values))
    return path


def render(
    cluster: harness.Cluster, values: dict[str, Any], namespace: str, *extra: str
) -> list[dict[str, Any]]:
    """``helm template`` the chart; the objects in order."""
    out = cluster.helm(
        "template",
        "backdial",
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
        "--values",
        str(values_file(values)),
        *extra,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]
