"""Minimal HTTPS access to the API server, authenticated by a client certificate."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certs import CertPair


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
    """Minimal HTTPS client for the API server, authenticated by a client certificate."""

    def __init__(self, host: str, port: int, ca: Path, client: CertPair) -> None:
        self.host = host
        self.port = port
        self._context = ssl.create_default_context(cafile=str(ca))
        self._context.load_cert_chain(str(client.cert), str(client.key))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        impersonate_user: str | None = None,
        impersonate_groups: Iterable[str] = (),
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> ApiResponse:
        """Send one request; ``body`` (if not bytes/str) is sent as JSON.

        ``impersonate_user``/``impersonate_groups`` set the ``Impersonate-*`` headers, so the
        request is authorized as that user (the admin identity is allowed to impersonate).
        """
        payload: bytes | None
        if body is None:
            payload = None
        elif isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode("utf-8")
        else:
            payload = json.dumps(body).encode("utf-8")
        all_headers = {"Accept": "application/json"}
        if payload is not None:
            all_headers["Content-Type"] = content_type
        if impersonate_user:
            all_headers["Impersonate-User"] = impersonate_user
        all_headers.update(headers or {})
        conn = http.client.HTTPSConnection(
            self.host, self.port, context=self._context, timeout=timeout
        )
        try:
            if impersonate_groups:
                # http.client sends repeated headers when given via putheader.
                conn.putrequest(method, path)
                for key, value in all_headers.items():
                    conn.putheader(key, value)
                for group in impersonate_groups:
                    conn.putheader("Impersonate-Group", group)
                conn.putheader("Content-Length", str(len(payload or b"")))
                conn.endheaders(payload)
            else:
                conn.request(method, path, body=payload, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            return ApiResponse(response.status, data, dict(response.getheaders()))
        finally:
            conn.close()
