"""The harness's API client reports transport failures as OSError (no cluster needed).

Start-up polls the API server's /readyz while it is still binding its port; the probes
treat OSError as "not yet". The ``kubernetes`` client raises urllib3's own exceptions,
which would end the start-up at the first refused connection.
"""

from __future__ import annotations

import socket
from pathlib import Path

import components
import pytest
from apiclient import ApiClient
from certs import CertPair


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_refused_connection_is_an_oserror_and_readyz_says_not_yet(tmp_path: Path) -> None:
    missing = CertPair(tmp_path / "none.crt", tmp_path / "none.key")
    api = ApiClient("127.0.0.1", closed_port(), Path("/etc/ssl/certs/ca-certificates.crt"), missing)
    with pytest.raises(ConnectionError):
        api.request("GET", "/readyz", timeout=2)
    assert components.apiserver_ready(api) is None
