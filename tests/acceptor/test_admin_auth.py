"""Admin API mutations need an authenticated channel; reads and probes stay open (issue 12).

Inside a pod every container shares 127.0.0.1, and a browser can be made to
send requests there (cross-site, or after DNS rebinding), so the TCP admin
port is not trusted.  Each test replays one such request against a real
acceptor and checks that routes did not change.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.acceptor.conftest import metric_value
from tests.helpers import get_json, http_get

BLACK_HOLE = json.dumps({"name": "hole", "service": "nowhere", "pathPrefix": "/"})


def _post(
    admin: str, headers: dict[str, str], body: str = BLACK_HOLE, path: str = "/v1/routes"
) -> tuple[int, str]:
    host, port = admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
    for name, value in {"Host": admin, **headers}.items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body.encode())
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def _routes(admin: str) -> list[str]:
    return [r["name"] for r in get_json(f"http://{admin}/v1/routes")["routes"]]


def test_cross_site_post_cannot_black_hole_traffic(acceptor) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    # What a browser sends cross-site without a preflight: text/plain and a foreign Origin.
    status, _ = _post(admin, {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 403
    # The same with a JSON body (needs a preflight nobody answers; refused anyway).
    status, _ = _post(admin, {"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert status == 403
    # No credentials at all: TCP edits need a token file, and there is none.
    status, text = _post(admin, {"Content-Type": "application/json"})
    assert status == 403 and "token" in text
    assert _routes(admin) == []
    assert metric_value(admin, 'backdial_acceptor_admin_denied_total{code="403"}') == 3


def test_token_and_host_checks_over_tcp(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    token_file = run_dir / "admin-token"
    token_file.write_text("s3cret-token\n")
    _, admin, _ = acceptor(extra=("--admin-token-file", str(token_file)))
    good = {"Content-Type": "application/json", "Authorization": "Bearer s3cret-token"}
    # DNS rebinding: the page's own name in Host, the right token does not help.
    status, _ = _post(admin, {**good, "Host": "rebind.evil.example:9901"})
    assert status == 403
    status, _ = _post(admin, {**good, "Authorization": "Bearer wrong"})
    assert status == 401
    status, _ = _post(admin, {"Content-Type": "application/json"})
    assert status == 401
    assert _routes(admin) == []
    status, _ = _post(admin, good)
    assert status == 200 and _routes(admin) == ["hole"]
    # Rotated in place: the old token stops working at once.
    token_file.write_text("rotated\n")
    status, _ = _post(admin, good, json.dumps({"name": "b", "service": "s"}))
    assert status == 401
    # Reads and probes need nothing.
    for path in ("/metrics", "/healthz", "/readyz", "/v1/state", "/v1/routes"):
        assert http_get(f"http://{admin}{path}")[0] == 200, path


def _unix_post(path: Path, body: str) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(
            b"POST /v1/routes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
        )
        raw = b""
        while chunk := s.recv(4096):
            raw += chunk
    if not raw:
        return 0, b""
    return int(raw.split(b" ", 2)[1]), raw


def test_unix_admin_socket_is_the_authenticated_channel(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    sock = run_dir / "admin.sock"
    assert os.stat(sock).st_mode & 0o777 == 0o600
    status, _ = _unix_post(sock, BLACK_HOLE)
    assert status == 200 and _routes(admin) == ["hole"]


def test_unix_admin_socket_refuses_other_uids(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    other = "4242" if os.getuid() != 4242 else "4343"
    _, admin, _ = acceptor(extra=("--control-uids", other))
    status, _ = _unix_post(run_dir / "admin.sock", BLACK_HOLE)
    assert status == 0  # closed unanswered
    assert _routes(admin) == []


def test_route_cli_over_tcp_needs_the_token(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    token_file = run_dir / "admin-token"
    token_file.write_text("t0ken\n")
    _, admin, _ = acceptor(extra=("--admin-token-file", str(token_file)))

    def route(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "backdial.cli", "route", "--admin", admin, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    refused = route("add", "api", "--service", "api")
    assert refused.returncode == 1 and "401" in refused.stderr
    ok = route("--token-file", str(token_file), "add", "api", "--service", "api")
    assert ok.returncode == 0, ok.stderr
    assert route("list").returncode == 0  # reads need no token
    assert _routes(admin) == ["api"]
