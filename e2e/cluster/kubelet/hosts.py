"""Cluster DNS emulation: each pod's own ``/etc/hosts``, rendered from EndpointSlices.

There is no DNS server and no kube-proxy on the process node. Instead every pod gets an
``/etc/hosts`` mapping ``<svc>.<ns>.svc.cluster.local``, ``<svc>.<ns>.svc``, ``<svc>.<ns>``
(and ``<svc>`` within the pod's own namespace) to the ready endpoint addresses of the
Service, ``<hostname>.<svc>.<ns>.svc...`` for endpoints with a hostname (StatefulSets), the
``kubernetes`` Service to the API server, and ``localhost`` plus the pod's own name to its
pod IP. Names map to endpoint addresses, so a client must dial the target port.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .plan import Obj

CLUSTER_DOMAIN = "cluster.local"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class ServiceAddresses:
    """Ready endpoint addresses of one Service, and per-hostname addresses."""

    ips: tuple[str, ...]
    hostnames: tuple[tuple[str, str], ...] = ()  # (hostname, ip)


ServiceMap = Mapping[tuple[str, str], ServiceAddresses]


def service_map(slices: Iterable[Obj]) -> dict[tuple[str, str], ServiceAddresses]:
    """(namespace, service) → ready addresses, from EndpointSlices."""
    ips: dict[tuple[str, str], list[str]] = {}
    named: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for item in slices:
        meta = item.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            continue
        key = (meta.get("namespace", ""), service)
        ips.setdefault(key, [])
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                if address not in ips[key]:
                    ips[key].append(address)
                if endpoint.get("hostname"):
                    named.setdefault(key, []).append((endpoint["hostname"], address))
    return {
        key: ServiceAddresses(tuple(sorted(found)), tuple(sorted(named.get(key, []))))
        for key, found in ips.items()
    }


def service_names(namespace: str, service: str, pod_namespace: str) -> list[str]:
    """The names a pod in ``pod_namespace`` may use for a Service."""
    base = f"{service}.{namespace}"
    names = [f"{base}.svc.{CLUSTER_DOMAIN}", f"{base}.svc", base]
    if namespace == pod_namespace:
        names.append(service)
    return names


def render_hosts(
    *,
    pod_name: str,
    pod_namespace: str,
    pod_ip: str,
    apiserver_ip: str,
    services: ServiceMap,
) -> str:
    """The ``/etc/hosts`` of one pod."""
    lines = [
        "# Written by backdial's process kubelet (cluster DNS emulation).",
        f"{pod_ip}\tlocalhost {pod_name}",
        "::1\tip6-localhost ip6-loopback",
        f"{apiserver_ip}\t" + " ".join(service_names("default", "kubernetes", pod_namespace)),
    ]
    for (namespace, service), found in sorted(services.items()):
        if (namespace, service) == ("default", "kubernetes"):
            continue
        names = " ".join(service_names(namespace, service, pod_namespace))
        lines.extend(f"{ip}\t{names}" for ip in found.ips)
        for hostname, ip in found.hostnames:
            fqdn = f"{hostname}.{service}.{namespace}.svc"
            lines.append(f"{ip}\t{fqdn}.{CLUSTER_DOMAIN} {fqdn}")
    return "\n".join(lines) + "\n"
