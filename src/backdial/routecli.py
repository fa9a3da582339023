"""``backdial route add|del|list``: edit routes of a running acceptor over its admin API.

By default it talks to the acceptor's UNIX admin socket in the run directory,
where the kernel vouches for the caller (docs/security.md); over TCP, edits
need the acceptor's bearer token (``--token-file``).
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from backdial.options import from_namespace, hostport, option, optional_path, parser, path
from backdial.runtime import ConfigError, fail


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def _call(admin: str, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
    conn: http.client.HTTPConnection
    if admin.startswith("unix:"):
        conn = _UnixConnection(admin[5:], 10)
    else:
        host, port = hostport(admin)
        conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw or b"null")
    except ValueError:
        return resp.status, {"error": raw.decode("utf-8", "replace").strip()}


def admin_target(raw: str) -> str:
    """``HOST:PORT`` or ``unix:PATH`` (empty: the run directory's admin.sock)."""
    if raw and not raw.startswith("unix:"):
        hostport(raw)
    return raw


@dataclass(frozen=True, slots=True)
class RouteSettings:
    run_dir: Path = option(
        "--run-dir",
        parse=path,
        default="/var/run/backdial",
        help="the acceptor's run directory; its admin.sock is used unless --admin is given",
    )
    admin: str = option(
        "--admin",
        parse=admin_target,
        default="",
        env="ROUTE_ADMIN",
        help="acceptor admin HOST:PORT or unix:PATH (empty: unix:<run-dir>/admin.sock); over "
        "TCP, add and del need --token-file",
    )
    token_file: Path | None = option(
        "--token-file",
        parse=optional_path,
        env="ADMIN_TOKEN_FILE",
        help="file holding the acceptor's admin bearer token",
    )


def main(argv: list[str]) -> int:
    p = parser(
        RouteSettings,
        prog="backdial route",
        description="Add, delete or list routes on a running acceptor. Every option may also "
        "be given as the BACKDIAL_* variable named in its help; a flag wins.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add or replace a route")
    add.add_argument("name")
    add.add_argument("--service", required=True, help="service name the route sends to")
    add.add_argument("--path-prefix", default="/", help="path prefix to match (default /)")
    add.add_argument("--host", help="exact Host to match (port ignored)")
    rm = sub.add_parser("del", help="delete a route")
    rm.add_argument("name")
    sub.add_parser("list", help="list routes")
    try:
        ns = p.parse_args(argv)
        cfg = from_namespace(RouteSettings, vars(ns))
        admin = cfg.admin or f"unix:{cfg.run_dir / 'admin.sock'}"
        token = cfg.token_file.read_text().strip() if cfg.token_file else ""
    except ConfigError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot read --token-file: {exc.strerror}")
    try:
        if ns.action == "add":
            route = {"name": ns.name, "service": ns.service, "pathPrefix": ns.path_prefix}
            if ns.host:
                route["host"] = ns.host
            status, body = _call(admin, "POST", "/v1/routes", route, token)
        elif ns.action == "del":
            status, body = _call(admin, "DELETE", f"/v1/routes?name={quote(ns.name)}", None, token)
        else:
            status, body = _call(admin, "GET", "/v1/routes", None, token)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return fail(f"cannot reach acceptor admin at {admin}: {exc}")
    if status != 200:
        return fail(f"acceptor refused ({status}): {body.get('error') if body else body}")
    for r in body["routes"]:
        host = r.get("host") or "*"
        print(f"{r['name']}\thost={host}\tpathPrefix={r['pathPrefix']}\tservice={r['service']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
