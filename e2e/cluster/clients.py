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
from util import HarnessError


class ClusterClients:
    """kubectl, helm and admin API helpers; the host class provides the attributes below."""

    binaries: Binaries
    workdir: Path
    kubeconfig: Path
    kube_cache_dir: Path

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

    def get_json(self, path: str) -> Any:
        """GET ``path`` as admin; raises :class:`HarnessError` unless 200."""
        response = self.api.request("GET", path)
        if response.status != 200:
            raise HarnessError(f"GET {path}: HTTP {response.status}: {response.text[:500]}")
        return response.json()
