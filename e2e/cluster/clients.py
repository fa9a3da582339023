"""Client-side helpers of a running cluster: the environment for kubectl and helm, running
them, ``kubectl apply`` and JSON GETs as admin. Mixed into :class:`harness.Cluster`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from apiclient import ApiClient
from binaries import Binaries
from kubelet import POD_LOGS
from util import HarnessError


class ClusterClients:
    """kubectl, helm and admin API helpers; the host class provides the attributes below."""

    binaries: Binaries
    workdir: Path
    kubeconfig: Path
    kube_cache_dir: Path
    logs_dir: Path

    @property
    def api(self) -> ApiClient:
        """HTTPS client authenticated as the cluster admin (provided by the host class)."""
        raise NotImplementedError

    @property
    def kubectl_path(self) -> Path:
        """The built kubectl."""
        return self.binaries.kubectl

    @property
    def helm_path(self) -> Path:
        """The built helm."""
        return self.binaries.helm

    def env(self) -> dict[str, str]:
        """Environment for clients: ``os.environ`` plus ``KUBECONFIG`` and a PATH with
        kubectl/helm first."""
        path = os.pathsep.join(
            [
                str(self.binaries.kubectl.parent),
                str(self.binaries.helm.parent),
                os.environ.get("PATH", ""),
            ]
        )
        env = dict(
            os.environ,
            KUBECONFIG=str(self.kubeconfig),
            PATH=path,
            # kubectl's and helm's discovery/HTTP cache, else ~/.kube/cache/<host_port>.
            KUBECACHEDIR=str(self.kube_cache_dir),
        )
        # helm keeps caches/config under these; keep them inside the work directory.
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            env.setdefault(var, str(self.workdir / "helm" / sub))
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        as_user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster; raises on failure if ``check``."""
        argv = [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}"]
        if as_user:
            argv.append(f"--as={as_user}")
        return self._run([*argv, *args], input=input, check=check, timeout=timeout)

    def helm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built helm against this cluster; raises on failure if ``check``."""
        argv = [str(self.binaries.helm), f"--kubeconfig={self.kubeconfig}", *args]
        return self._run(argv, input=input, check=check, timeout=timeout)

    def _run(
        self,
        argv: list[str],
        *,
        input: str | None,
        check: bool,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise HarnessError(
                f"{Path(argv[0]).name} {' '.join(argv[2:])} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def apply(self, manifest: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
        """``kubectl apply -f -`` a YAML string, an object or a list of objects."""
        if isinstance(manifest, str):
            text = manifest
        elif isinstance(manifest, Mapping):
            text = yaml.safe_dump(dict(manifest))
        else:
            text = yaml.safe_dump_all([dict(item) for item in manifest])
        return self.kubectl("apply", "-f", "-", input=text).stdout

    def pod_log_path(self, pod: str, container: str | None = None, namespace: str = "") -> Path:
        """The log file of a container that ran on the process node.

        Without ``namespace`` the pod name must be unique across namespaces; without
        ``container`` the pod must have had one container. The newest pod of that name wins
        (a StatefulSet's pod comes back with the same name)."""
        return find_pod_log(self.logs_dir, pod, container, namespace)

    def pod_logs(self, pod: str, container: str | None = None, namespace: str = "") -> str:
        """The output (stdout and stderr, all restarts) of a container on the process node."""
        return self.pod_log_path(pod, container, namespace).read_text(errors="replace")

    def get_json(self, path: str) -> Any:
        """GET ``path`` as admin; raises :class:`HarnessError` unless 200."""
        response = self.api.request("GET", path)
        if response.status != 200:
            raise HarnessError(f"GET {path}: HTTP {response.status}: {response.text[:500]}")
        return response.json()


def find_pod_log(logs_dir: Path, pod: str, container: str | None, namespace: str = "") -> Path:
    """``<logs_dir>/pods/<namespace>_<pod>_<uid>/<container>.log``, see
    :meth:`ClusterClients.pod_log_path`; :class:`HarnessError` says what is ambiguous."""
    root = logs_dir / POD_LOGS
    dirs = [
        d
        for d in (root.iterdir() if root.is_dir() else [])
        if d.is_dir()
        and d.name.split("_")[1:2] == [pod]
        and (not namespace or d.name.split("_")[0] == namespace)
    ]
    if not dirs:
        raise HarnessError(f"no logs of pod {pod!r} in {root} (did it run on the process node?)")
    if len({d.name.split("_")[0] for d in dirs}) > 1:
        found = sorted({d.name.split("_")[0] for d in dirs})
        raise HarnessError(f"pod {pod!r} exists in several namespaces {found}: name one")
    newest = max(dirs, key=lambda d: d.stat().st_mtime)
    logs = sorted(newest.glob("*.log"))
    if container is None:
        if len(logs) != 1:
            names = [p.stem for p in logs]
            raise HarnessError(f"pod {pod!r} has containers {names}: name one")
        return logs[0]
    path = newest / f"{container}.log"
    if not path.is_file():
        raise HarnessError(f"pod {pod!r} has no log of container {container!r}")
    return path


def service_account_with_role(
    namespace: str, account: str, role: str, rules: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Manifests of a ServiceAccount, a Role with ``rules`` and the RoleBinding between them
    (named like the Role), for :meth:`ClusterClients.apply`."""
    rbac = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": namespace},
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": {"name": role, "namespace": namespace},
            "rules": rules,
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": role, "namespace": namespace},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    ]
