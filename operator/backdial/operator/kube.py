"""A small asyncio client for the Kubernetes API (aiohttp), for what kopf does not do.

kopf watches and indexes; the operator itself also creates TokenReviews, patches
SessionSlice status, posts Events and keeps its TLS Secret.  Credentials are the same ones
kopf uses (the in-cluster ServiceAccount, else ``$KUBECONFIG``); an in-cluster token file is
re-read periodically, since projected tokens rotate.  Every request is counted by verb, so
tests and ``/metrics`` can show that reconciling never turns into a per-pod write storm.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kopf

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_TOKEN_REREAD = 60.0


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0: no response)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.reason = reason


def in_cluster_info() -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount and the API server the kubelet names in
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` (as client-go's in-cluster config does; kopf's own
    service-account login dials ``kubernetes.default.svc:443``, which needs kube-proxy)."""
    token = SA_DIR / "token"
    if not token.exists() or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    namespace = SA_DIR / "namespace"
    return kopf.ConnectionInfo(
        server=f"https://{host}:{port}",
        ca_path=str(SA_DIR / "ca.crt"),
        token=token.read_text().strip(),
        default_namespace=namespace.read_text().strip() if namespace.exists() else None,
    )


def service_account_owner(token: str | None) -> dict[str, str] | None:
    """An ownerReference to the ServiceAccount a token was issued for, from the token's
    ``kubernetes.io`` claims (our own token, read only to name the owner, so not verified);
    None for tokens without them (e.g. a developer's kubeconfig)."""
    try:
        payload = (token or "").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        account = claims["kubernetes.io"]["serviceaccount"]
        return {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "name": str(account["name"]),
            "uid": str(account["uid"]),
        }
    except (IndexError, KeyError, TypeError, ValueError):
        return None


@dataclass(slots=True)
class Response:
    status: int
    body: Any  # decoded JSON, or None


def _materialize(data: str | bytes | None, path: Any, suffix: str) -> str | None:
    """A file path for base64 *data* from a kubeconfig (written once, private), or *path*."""
    if path:
        return os.fspath(path) if not isinstance(path, bytes) else path.decode()
    if not data:
        return None
    raw = base64.b64decode(data)
    fd, name = tempfile.mkstemp(prefix="backdial-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    return name


class Kube:
    """Authenticated JSON requests to the API server."""

    def __init__(self, info: kopf.ConnectionInfo, token_file: Path | None = None) -> None:
        self.server = info.server.rstrip("/")
        self._token = info.token
        self._token_file = token_file
        self._token_read = time.monotonic()
        ctx = ssl.create_default_context(cafile=_materialize(info.ca_data, info.ca_path, ".crt"))
        if info.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        cert = _materialize(info.certificate_data, info.certificate_path, ".crt")
        key = _materialize(info.private_key_data, info.private_key_path, ".key")
        if cert:
            ctx.load_cert_chain(cert, key)
        self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None
        self.requests: collections.Counter[str] = collections.Counter()  # by verb

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster ServiceAccount credentials, else the current ``$KUBECONFIG`` context."""
        info = in_cluster_info()
        if info is not None:
            return cls(info, token_file=SA_DIR / "token")
        found = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
        if found is None:
            raise KubeError(0, "no in-cluster ServiceAccount and no KUBECONFIG")
        return cls(found)

    def service_account_owner(self) -> dict[str, str] | None:
        """See :func:`service_account_owner` (None unless in-cluster)."""
        return service_account_owner(self._token)

    def _headers(self) -> dict[str, str]:
        if self._token_file and time.monotonic() - self._token_read > _TOKEN_REREAD:
            self._token = self._token_file.read_text().strip()
            self._token_read = time.monotonic()
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200, 201),
        params: dict[str, str] | None = None,
    ) -> Response:
        """Send one request; raises KubeError unless the status is in *ok*."""
        self.requests[method.lower()] += 1
        headers = {**self._headers(), "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        try:
            async with self._http().request(
                method, self.server + path, data=data, headers=headers, params=params
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(0, f"{method} {path}: {exc}") from exc
        try:
            decoded = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            decoded = raw.decode("utf-8", "replace")
        if status not in ok:
            message = decoded.get("message", "") if isinstance(decoded, dict) else str(decoded)
            reason = decoded.get("reason", "") if isinstance(decoded, dict) else ""
            raise KubeError(status, f"{method} {path}: {message}"[:500], reason)
        return Response(status, decoded)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
