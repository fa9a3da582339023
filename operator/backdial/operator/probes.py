"""App probes and the drain hook after the traffic port moved to the sidecar.

Once the port named ``http`` belongs to ``backdial-sidecar``, an app probe on
it would either stop resolving (a named port is looked up in the container's
own ports) or, by number, test the sidecar's listener and queue, not the app.
So probes on that port are rewritten to the sidecar's admin endpoint
``/v1/app-probe``, which checks the *app* (see docs/operator.md "Probes"):

* ``httpGet`` -> ``/v1/app-probe?path=<original path>[&host=<Host header>]``:
  the sidecar sends that GET over an idle leased session, outside the client
  queues; when every session is busy serving, the app is alive by definition;
* ``tcpSocket`` -> ``/v1/app-probe?tcp=1``: passes while the app has sessions
  registered (the session-world meaning of "accepts connections").

Probes on other ports, ``exec`` and ``grpc`` probes are left alone.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

APP_PROBE_PATH = "/v1/app-probe"
DRAIN_PATH = "/v1/drain"
DRAIN_TOKEN_HEADER = "X-Backdial-Drain-Token"
_KINDS = ("readinessProbe", "livenessProbe", "startupProbe")


def _on_port(ref: Any, port: dict[str, Any], port_name: str) -> bool:
    number = port["containerPort"]
    return ref in (port_name, number, str(number))


def _rewritten(probe: dict[str, Any], port: dict[str, Any], name: str, admin: int) -> bool:
    http = probe.get("httpGet")
    if http is not None and _on_port(http.get("port"), port, name):
        query = {"path": http.get("path") or "/"}
        headers = http.get("httpHeaders") or []
        host = next((h["value"] for h in headers if h.get("name", "").lower() == "host"), None)
        if host:
            query["host"] = host
        probe["httpGet"] = {
            "path": f"{APP_PROBE_PATH}?{urlencode(query)}",
            "port": admin,
            "scheme": "HTTP",
        }
        return True
    tcp = probe.get("tcpSocket")
    if tcp is not None and _on_port(tcp.get("port"), port, name):
        del probe["tcpSocket"]
        probe["httpGet"] = {"path": f"{APP_PROBE_PATH}?tcp=1", "port": admin, "scheme": "HTTP"}
        return True
    return False


def rewrite_probes(container: dict[str, Any], port: dict[str, Any], name: str, admin: int) -> int:
    """Rewrite *container*'s probes that target the moved *port*; returns how many."""
    count = 0
    for kind in _KINDS:
        probe = container.get(kind)
        if isinstance(probe, dict) and _rewritten(probe, port, name, admin):
            count += 1
    return count


def drain_hook(admin: int, token: str) -> dict[str, Any]:
    """The app container's ``preStop``: start the sidecar's drain and wait for it.

    The app must outlive the drain (its sessions serve the in-flight and queued
    requests), and with native sidecars the sidecar itself is only stopped after
    the app, so the hook belongs to the app container.  The token keeps anyone
    else who can reach the admin port from draining the pod.
    """
    return {
        "httpGet": {
            "path": DRAIN_PATH,
            "port": admin,
            "scheme": "HTTP",
            "httpHeaders": [{"name": DRAIN_TOKEN_HEADER, "value": token}],
        }
    }
