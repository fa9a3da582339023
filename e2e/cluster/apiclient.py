"""The API server as the cluster admin, through the ``kubernetes`` client.

``ApiClient`` holds a ``kubernetes.client.ApiClient`` configured with the
cluster's CA and the admin's client certificate: TLS, authentication and the
HTTP exchange are the client library's.  Tests mostly speak raw REST paths (the
objects under test are often custom resources or deliberately invalid), so
``request`` is the one adapter: a path and a body in, an ``ApiResponse`` (status,
body, headers) out, never an exception for an HTTP error status.  Typed access
is there too: ``core`` is a ``CoreV1Api``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from certs import CertPair
from kubernetes import client as k8s


@dataclass(frozen=True)
class ApiResponse:
    """Status, headers and body of one API server response."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body.decode("utf-8"))

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8", "replace")


class ApiClient:
    """The admin's connection to the API server (a client certificate)."""

    def __init__(self, host: str, port: int, ca: Path, client: CertPair) -> None:
        config = k8s.Configuration()
        config.host = f"https://{host}:{port}"
        config.ssl_ca_cert = str(ca)
        config.cert_file = str(client.cert)
        config.key_file = str(client.key)
        self.client = k8s.ApiClient(config)
        self.core = k8s.CoreV1Api(self.client)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        impersonate_user: str | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> ApiResponse:
        """Send one request to *path* (query string included); a JSON body may be given as
        an object, or as text/bytes in its content type. A transport failure raises
        :class:`ConnectionError` (an ``OSError``), never urllib3's own exceptions.

        ``impersonate_user`` sets ``Impersonate-User``, so the request is authorized as
        that user (the admin identity is allowed to impersonate).
        """
        header_params = {"Accept": "application/json"}
        if body is not None:
            header_params["Content-Type"] = content_type
            if isinstance(body, bytes | str) and "json" in content_type:
                body = json.loads(body)  # the client serialises JSON bodies itself
        if impersonate_user:
            header_params["Impersonate-User"] = impersonate_user
        header_params.update(headers or {})
        try:
            # RESTResponse's methods carry no annotations.
            response: Any = self.client.call_api(
                method,
                self.client.configuration.host + path,
                header_params=header_params,
                body=body,
                _request_timeout=timeout,
            )
        except urllib3.exceptions.HTTPError as exc:
            # Transport failures (refused, reset, timed out) stay OSErrors, as callers that
            # poll a starting API server expect; urllib3 would raise its own hierarchy.
            raise ConnectionError(f"{method} {path}: {exc}") from exc
        try:
            data = response.read()
            return ApiResponse(response.status, data, dict(response.getheaders()))
        finally:
            response.close()
