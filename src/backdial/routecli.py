"""``backdial route add|del|list``: edit routes of a running acceptor over its admin API."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from backdial.runtime import ArgParser, ConfigError, env, fail


def _call(admin: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{admin}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def main(argv: list[str]) -> int:
    p = ArgParser(
        prog="backdial route", description="Add, delete or list routes on a running acceptor."
    )
    p.add_argument(
        "--admin",
        default=env("ADMIN", "127.0.0.1:9901"),
        help="acceptor admin HOST:PORT (env BACKDIAL_ADMIN; default 127.0.0.1:9901)",
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
    except ConfigError as exc:
        return fail(str(exc))
    try:
        if ns.action == "add":
            route = {"name": ns.name, "service": ns.service, "pathPrefix": ns.path_prefix}
            if ns.host:
                route["host"] = ns.host
            status, body = _call(ns.admin, "POST", "/v1/routes", route)
        elif ns.action == "del":
            status, body = _call(ns.admin, "DELETE", f"/v1/routes?name={ns.name}")
        else:
            status, body = _call(ns.admin, "GET", "/v1/routes")
    except (OSError, ValueError) as exc:
        return fail(f"cannot reach acceptor admin at {ns.admin}: {exc}")
    if status != 200:
        return fail(f"acceptor refused ({status}): {body.get('error') if body else body}")
    for r in body["routes"]:
        host = r.get("host") or "*"
        print(f"{r['name']}\thost={host}\tpathPrefix={r['pathPrefix']}\tservice={r['service']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
