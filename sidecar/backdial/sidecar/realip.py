"""Who the client is: trusted proxies, as nginx's ``set_real_ip_from`` decides it.

Addresses a peer *claims* (a PROXY protocol header, ``X-Forwarded-For``,
``Forwarded``, ``X-Real-IP``) are believed only from peers in the trusted
CIDRs (``ProxySettings.trusted_proxies``).  From anyone else they are
replaced, not appended: the service sees only the address that actually
connected, so a client cannot pick its own address for a CIDR slice rule or
plant one in the chain a service reads.

From a trusted peer the chain is kept and the client for slice rules is the
rightmost ``X-Forwarded-For`` address that is not itself a trusted proxy
(nginx's ``real_ip_recursive on``).  Pure functions; no sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from backdial.sidecar.classify import IPAddress, Network, parse_ip


class TrustedProxies:
    """The CIDRs whose forwarding claims are believed; empty trusts nobody."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self.networks)

    def real_client(self, chain: list[bytes], hop: IPAddress | None) -> IPAddress | None:
        """The client behind trusted *hop*, from its ``X-Forwarded-For`` field values.

        Walks the addresses right to left, skipping trusted proxies; an entry that is
        not an address ends the walk at the last good one (a trusted proxy wrote
        everything to its right, nothing to its left can be verified).
        """
        client = hop
        for value in reversed(chain):
            for raw in reversed(value.split(b",")):
                ip = parse_ip(raw.strip().decode("latin-1"))
                if ip is None:
                    return client
                client = ip
                if not self.trusts(ip):
                    return ip
        return client
