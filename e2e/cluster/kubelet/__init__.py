"""backdial's process kubelet: a small kubelet for the local test cluster that runs the
containers of the pods bound to its Node as local processes.

The names below are what test workloads, the Helm chart and the other engineers rely on
(SHAPES.md §1); they are importable without the kubelet's own dependencies, so the harness
and tests can use them. The kubelet itself runs as ``python -m kubelet`` (``main.py``).

Modules: ``plan`` (pod spec → what to run: argv, env, mounts; the loopback rewrite),
``volumes`` (contents of configMap/secret/downwardAPI/projected volumes, atomic writes),
``hosts`` (per-pod /etc/hosts), ``status`` (container and pod status, conditions, phase),
``probes`` (probe specs, thresholds, handlers), ``policy`` (restart decisions, back-off),
``launcher`` (runs inside each container's namespaces), ``process`` (one container
process), ``addresses`` (pod IPs claimed machine-wide), ``informer`` (list+watch
caches), ``node`` (Node and Lease), ``tokens`` (TokenRequest), ``containers`` (one
container's supervision), ``podworker`` (one pod's lifecycle), ``main`` (wiring, command
line).
"""

from __future__ import annotations

from typing import Any

#: Name of the process node the harness starts.
NODE_NAME = "backdial-proc-0"
#: Label (key, value) that selects process nodes.
NODE_KIND_LABEL = "backdial.dev/node-kind"
NODE_KIND_PROCESS = "process"
#: Taint keeping ordinary (kwok-faked) workloads off the process node.
TAINT_KEY = "backdial.dev/process-node"
TAINT_VALUE = "true"
TAINT_EFFECT = "NoSchedule"
#: Pod IPs of the process node; kwok's fake pods use FAKE_POD_CIDR. Both in 127.0.0.0/8:
#: on these machines test traffic may only go to loopback.
DEFAULT_POD_CIDR = "127.42.0.0/16"
FAKE_POD_CIDR = "127.43.0.0/16"
#: Repository of the project's image (any tag or digest runs the project's code).
DEFAULT_PROJECT_IMAGE = "ghcr.io/backdial/backdial"
#: Waiting reason of a container whose image the process node cannot run.
IMAGE_NOT_RUNNABLE = "ImageNotRunnable"
#: Container logs: ``<log dir>/pods/<namespace>_<pod>_<uid[:8]>/<container>.log``.
POD_LOGS = "pods"

#: Merge into a pod spec to place a workload on the process node.
PROCESS_PLACEMENT: dict[str, Any] = {
    "nodeSelector": {NODE_KIND_LABEL: NODE_KIND_PROCESS},
    "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": TAINT_EFFECT}],
}


def place_on_process_node(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """``pod_spec`` with the process node's nodeSelector and toleration merged in."""
    spec = dict(pod_spec)
    spec["nodeSelector"] = {**spec.get("nodeSelector", {}), **PROCESS_PLACEMENT["nodeSelector"]}
    spec["tolerations"] = [*spec.get("tolerations", []), *PROCESS_PLACEMENT["tolerations"]]
    return spec


def process_deployment(
    name: str,
    namespace: str,
    replicas: int,
    pod_spec: dict[str, Any],
    pod_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Deployment ``name`` (pods labelled ``app: name`` and *pod_labels*) whose pods run
    on the process node."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": {**labels, **(pod_labels or {})}},
                "spec": place_on_process_node(pod_spec),
            },
        },
    }
