"""The operator as a local process against the real control plane, and pods for it.

The operator runs with the credentials of its ServiceAccount (a TokenRequest token and
exactly the RBAC of ``backdial.operator.rbac``), listening on ``OPERATOR_IP``; the Service
``backdial-operator`` points there, so pods on the process node reach it by name
(``realpods.py``).  For the tests that need many pods or direct control over an
acceptor's token and flags (authentication, conditions, peering, scale), ``PodStack`` runs
a kwok pod's data plane as local processes on 127.0.0.1 instead: an acceptor that
authenticates with a TokenRequest token bound to *that* pod, a sidecar and the demo.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import yaml

from backdial.operator import rbac
from tests.helpers import Proc, free_port, get_json, http_get, metric, wait_for

OPERATOR_NS = "backdial-system"
INJECTED = {"backdial.dev/injected": "true"}
# The operator runs as a local process on this loopback address (not 127.0.0.1, which the
# process node rewrites to a pod's own IP); pods reach it through the Service
# backdial-operator, whose EndpointSlice names this address.
OPERATOR_IP = "127.0.8.44"
OPERATOR_HOST = f"backdial-operator.{OPERATOR_NS}.svc"


def token_request(
    cluster: harness.Cluster,
    namespace: str,
    account: str,
    *,
    pod: dict[str, Any] | None = None,
    audience: str | None = "backdial",
) -> str:
    """A ServiceAccount token from the TokenRequest API, optionally bound to *pod*."""
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if audience:
        spec["audiences"] = [audience]
    if pod is not None:
        meta = pod["metadata"]
        spec["boundObjectRef"] = {
            "kind": "Pod",
            "apiVersion": "v1",
            "name": meta["name"],
            "uid": meta["uid"],
        }
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"

    def issue() -> str | None:
        resp = cluster.api.request("POST", path, {"spec": spec})
        if resp.status == 404:  # the ServiceAccount controller has not made it yet
            return None
        assert resp.status == 201, resp.text
        return str(resp.json()["status"]["token"])

    token: str = harness.poll(issue, timeout=30, what=f"a token of {namespace}/{account}")
    return token


def install_rbac(cluster: harness.Cluster) -> None:
    ns = cluster.api.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}},
    )
    assert ns.status in (201, 409), ns.text
    cluster.apply(rbac.objects(OPERATOR_NS))


def operator_kubeconfig(cluster: harness.Cluster, path: Path) -> Path:
    token = token_request(cluster, OPERATOR_NS, rbac.SERVICE_ACCOUNT, audience=None)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority": str(cluster.pki.ca.cert),
                },
            }
        ],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "operator"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Operator:
    """One ``backdial operator`` process (restartable).

    Every listener is explicit and on a free loopback port: a default (``0.0.0.0:9443``...)
    would collide with any other operator on the machine, e.g. another test session's.
    """

    def __init__(
        self,
        env: OperatorEnv,
        name: str,
        *extra: str,
        config_port: int | None = None,
        webhook_port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.env, self.name, self.extra = env, name, list(extra)
        self.health = f"127.0.0.1:{free_port()}"
        self.config_port = config_port or env.config_port
        self.webhook_port = webhook_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.proc: Proc | None = None
        self.starts = 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, wait_acting: bool = True) -> Operator:
        # A second process would fail to bind and orphan the first (which keeps acting).
        assert not self.alive(), f"{self.name} is already running"
        self.starts += 1
        args = [
            "operator",
            "--health-listen",
            self.health,
            "--config-listen",
            f"{OPERATOR_IP}:{self.config_port}",
            "--webhook-listen",
            f"127.0.0.1:{self.webhook_port}",
            "--metrics-api-listen",
            f"127.0.0.1:{self.metrics_port}",
            "--namespace",
            OPERATOR_NS,
            "--tls-san",
            OPERATOR_IP,
            *self.extra,
        ]
        self.proc = Proc(
            args,
            self.env.logs / f"{self.name}-{self.starts}.log",
            {"KUBECONFIG": str(self.env.kubeconfig), "BACKDIAL_LOG_LEVEL": "info"},
        )
        if wait_acting:
            self.wait_acting()
        return self

    def url(self, path: str) -> str:
        return f"http://{self.health}{path}"

    def ready(self) -> bool:
        return http_get(self.url("/readyz"))[0] == 200

    def wait_acting(self, timeout: float = 60.0) -> None:
        """Ready, and the replica that acts (kopf up, no peer outranks it)."""

        def check() -> bool:
            assert self.proc is not None and self.proc.alive(), self.output()[-3000:]
            return self.ready() and bool(self.state()["acting"])

        wait_for(check, timeout=timeout, what=f"{self.name} acting")

    def state(self) -> Any:
        return get_json(self.url("/v1/state"))

    def output(self) -> str:
        return self.proc.output() if self.proc else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=20, sig=sig)


class AcceptorView:
    """Reads a pod's acceptor admin API (``acceptor_admin`` is its HOST:PORT)."""

    acceptor_admin: str

    def state(self) -> Any:
        return get_json(f"http://{self.acceptor_admin}/v1/state")

    def operator_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.state()["operator"]
        return state

    def registered(self) -> int:
        return sum(s["registered"] for s in self.state()["services"].values())

    def metric(self, name: str, **labels: str) -> float:
        text = http_get(f"http://{self.acceptor_admin}/metrics")[1].decode()
        return metric(text, name, **labels)


@dataclass
class PodStack(AcceptorView):
    """The data plane of one kwok pod, as local processes."""

    name: str
    pod: dict[str, Any]
    run_dir: Path
    port: int
    acceptor_admin: str
    token_file: Path
    sidecar_admin: str = ""
    procs: list[Proc] = field(default_factory=list)
    acceptor: Proc | None = None

    def wait_serving(self) -> None:
        """The sidecar is ready: it listens and a session is registered."""
        wait_for(
            lambda: http_get(f"http://{self.sidecar_admin}/readyz")[0] == 200,
            timeout=20,
            what=f"sidecar of {self.name} ready",
        )

    def demo_stats(self) -> Any:
        return get_json(f"http://127.0.0.1:{self.port}/stats")


class OperatorEnv:
    """The shared operator (one per test session) and helpers to make pods."""

    def __init__(self, cluster: harness.Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config_port = free_port()
        # The webhook and the metrics API listen on free loopback ports; what the API
        # server needs to reach them is installed by tests/k8s/operator/wiring.py.
        self.webhook_port = free_port()
        self.metrics_port = free_port()
        self.inject_config = workdir / "inject.yaml"
        self.inject_config.write_text(
            f"image: {harness.DEFAULT_PROJECT_IMAGE}:0.1.0\n"
            f"operatorUrl: https://backdial-operator.{OPERATOR_NS}.svc:{self.config_port}\n"
            "drainQuietPeriod: 2s\n"
        )
        install_rbac(cluster)
        self.kubeconfig = operator_kubeconfig(cluster, workdir / "operator.kubeconfig")
        self.operator = Operator(
            self,
            "operator",
            "--peering-lifetime",
            "10",
            "--inject-config",
            str(self.inject_config),
            webhook_port=self.webhook_port,
            metrics_port=self.metrics_port,
        )
        self.ca = workdir / "ca.crt"
        self._pods: list[PodStack] = []

    def start(self) -> None:
        self.operator.start()
        secret = self.cluster.get_json(
            f"/api/v1/namespaces/{OPERATOR_NS}/secrets/backdial-operator-tls"
        )
        import base64

        self.ca.write_bytes(base64.b64decode(secret["data"]["ca.crt"]))
        self.cluster.apply(operator_service(self.config_port))

    @property
    def operator_url(self) -> str:
        return f"https://{OPERATOR_IP}:{self.config_port}"

    # -- pods ---------------------------------------------------------------------------

    def create_pods(self, namespace: str, names: list[str], labels: dict[str, str]) -> list[Any]:
        pods = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": n, "namespace": namespace, "labels": {**labels, **INJECTED}},
                "spec": {
                    "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
                    "terminationGracePeriodSeconds": 0,
                },
            }
            for n in names
        ]
        self.cluster.apply(pods)
        return self.wait_pods(namespace, names)

    def wait_pods(self, namespace: str, names: list[str]) -> list[Any]:
        def ready() -> list[Any] | None:
            got = []
            for n in names:
                pod = self.cluster.get_json(f"/api/v1/namespaces/{namespace}/pods/{n}")
                conds = pod.get("status", {}).get("conditions") or []
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                    return None
                got.append(pod)
            return got

        pods: list[Any] = harness.poll(ready, timeout=60, interval=0.3, what=f"pods {names} Ready")
        return pods

    def start_stack(
        self, pod: dict[str, Any], sessions: int, token: str | None = None, **acceptor_env: str
    ) -> PodStack:
        """Acceptor (authenticated as *pod*), sidecar and demo with *sessions* sessions."""
        name = pod["metadata"]["name"]
        ns = pod["metadata"]["namespace"]
        run_dir = Path(tempfile.mkdtemp(prefix="bdop-"))
        token_file = run_dir / "token"
        token_file.write_text(token or token_request(self.cluster, ns, "default", pod=pod))
        stack = PodStack(name, pod, run_dir, free_port(), f"127.0.0.1:{free_port()}", token_file)
        self._pods.append(stack)
        self.start_acceptor(stack, **acceptor_env)
        sidecar_admin = stack.sidecar_admin = f"127.0.0.1:{free_port()}"
        stack.procs.append(
            Proc(
                [
                    "sidecar",
                    "--run-dir",
                    str(run_dir),
                    "--listen",
                    f"127.0.0.1:{stack.port}",
                    "--admin",
                    sidecar_admin,
                ],
                self.logs / f"{ns}-{name}-sidecar.log",
            )
        )
        stack.procs.append(
            Proc(
                [
                    "serve",
                    "backdial.demo:app",
                    "--register",
                    f"unix://{run_dir}/register.sock",
                    "--sessions",
                    str(sessions),
                    "--service",
                    "demo",
                    "--instance",
                    name,
                ],
                self.logs / f"{ns}-{name}-demo.log",
            )
        )
        return stack

    def start_acceptor(self, stack: PodStack, ca: Path | None = None, **env: str) -> None:
        ns = stack.pod["metadata"]["namespace"]
        stack.acceptor = Proc(
            [
                "acceptor",
                "--run-dir",
                str(stack.run_dir),
                "--admin",
                stack.acceptor_admin,
                "--operator",
                self.operator_url,
                "--operator-ca",
                str(ca or self.ca),
                "--token-file",
                str(stack.token_file),
            ],
            self.logs / f"{ns}-{stack.name}-acceptor-{int(time.time() * 1000)}.log",
            env,
        )
        stack.procs.insert(0, stack.acceptor)
        wait_for(
            lambda: http_get(f"http://{stack.acceptor_admin}/healthz")[0] == 200,
            what=f"acceptor of {stack.name}",
        )

    def stop_stacks(self) -> None:
        for stack in self._pods:
            for proc in reversed(stack.procs):
                proc.stop()
            shutil.rmtree(stack.run_dir, ignore_errors=True)
        self._pods.clear()

    def close(self) -> None:
        self.stop_stacks()
        self.operator.stop()


def operator_service(port: int) -> list[dict[str, Any]]:
    """Service backdial-operator (port == targetPort: there is no kube-proxy) with an
    EndpointSlice naming the local operator process."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "backdial-operator", "namespace": OPERATOR_NS},
            "spec": {"ports": [{"name": "config", "port": port, "targetPort": port}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "backdial-operator-local",
                "namespace": OPERATOR_NS,
                "labels": {"kubernetes.io/service-name": "backdial-operator"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [OPERATOR_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "config", "port": port, "protocol": "TCP"}],
        },
    ]


def sessionslice(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "backdial.dev/v1alpha1",
        "kind": "SessionSlice",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def slice_status(cluster: harness.Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = cluster.get_json(
        f"/apis/backdial.dev/v1alpha1/namespaces/{namespace}/sessionslices/{name}"
    )
    status: dict[str, Any] = obj.get("status") or {}
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in status.get("conditions") or []:
        if cond["type"] == kind:
            found: dict[str, Any] = cond
            return found
    return {}


def wait_generation(stacks: Sequence[AcceptorView], generation: int, timeout: float) -> float:
    """Seconds until every acceptor applied *generation* (fails after *timeout*)."""
    started = time.monotonic()
    wait_for(
        lambda: all(s.operator_state()["generation"] >= generation for s in stacks),
        timeout=timeout,
        what=f"every acceptor on generation {generation}",
    )
    return time.monotonic() - started


@contextlib.contextmanager
def operator_env(cluster: harness.Cluster) -> Iterator[OperatorEnv]:
    workdir = Path(tempfile.mkdtemp(prefix="bdop-env-"))
    env = OperatorEnv(cluster, workdir)
    try:
        env.start()
        yield env
    except BaseException:
        print("\n----- operator log -----\n" + env.operator.output()[-6000:])
        raise
    finally:
        env.close()
        if os.environ.get("BACKDIAL_KEEP_OPERATOR_LOGS") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def as_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


Waiter = Callable[[], bool]
