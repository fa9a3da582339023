"""Route (which service) and slice (which client class) for a request, precompiled per policy.

A ``Classifier`` is built once per ``Policy`` object (policies are immutable and
replaced whole on reload) and cached by identity, so a request costs a few
``startswith`` calls and, only when the policy has such rules, one regex search
per rule header.  Everything works on the raw bytes the parser produced: hosts
are compared lower-cased without port, paths are the undecoded request path
(percent-escapes are not normalised, so ``/%61pi`` does not match ``/api``;
the service that receives the request decodes it).

Slice rules (``Slice.rules()``): the first slice, in policy order, with any rule
whose every given field matches wins; otherwise the default slice.  Within a
rule: the client IP is in any CIDR, each listed header's value ``search``-es its
regex, the User-Agent ``search``-es ``userAgent``, the path starts with any
prefix.  A missing header is matched as the empty string.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from backdial.http1 import host_key
from backdial.policy import Match, Policy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

USER_AGENT = b"user-agent"


@dataclass(frozen=True, slots=True)
class _Rule:
    networks: tuple[Network, ...]  # empty: any client
    headers: tuple[tuple[bytes, re.Pattern[str]], ...]
    path_prefixes: tuple[bytes, ...]  # empty: any path

    def matches(self, ip: IPAddress | None, headers: Mapping[bytes, bytes], path: bytes) -> bool:
        if self.networks and (ip is None or not any(ip in net for net in self.networks)):
            return False
        if self.path_prefixes and not path.startswith(self.path_prefixes):
            return False
        for name, pattern in self.headers:
            if pattern.search(headers.get(name, b"").decode("latin-1")) is None:
                return False
        return True


def _rule(match: Match) -> _Rule:
    headers = [(name.encode("ascii"), re.compile(rx)) for name, rx in match.headers.items()]
    if match.user_agent is not None:
        headers.append((USER_AGENT, re.compile(match.user_agent)))
    return _Rule(
        networks=tuple(ipaddress.ip_network(c, strict=False) for c in match.cidrs),
        headers=tuple(headers),
        path_prefixes=tuple(p.encode("utf-8") for p in match.path_prefixes),
    )


class Classifier:
    """Compiled routes and slice rules of one policy generation."""

    __slots__ = (
        "_any_host",
        "_by_host",
        "_default_service",
        "_slices",
        "default_slice",
        "policy",
        "trivial_slices",
        "uses_ip",
        "wanted",
    )

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.default_slice = policy.default_slice
        self._default_service = policy.default_service or ""
        by_host: dict[bytes, list[tuple[bytes, str]]] = {}
        any_host: list[tuple[bytes, str]] = []
        for route in policy.routes:
            entry = (route.path_prefix.encode("utf-8"), route.service)
            if route.host is None:
                any_host.append(entry)
            else:
                by_host.setdefault(_config_host(route.host), []).append(entry)
        # Longest prefix first; ties keep config order (sort is stable).
        self._by_host = {h: tuple(sorted(v, key=lambda e: -len(e[0]))) for h, v in by_host.items()}
        self._any_host = tuple(sorted(any_host, key=lambda e: -len(e[0])))
        self._slices = tuple(
            (s.name, tuple(_rule(m) for m in s.rules()))
            for s in policy.slices
            if s.match is not None
        )
        self.trivial_slices = not self._slices
        # Header names the proxy must keep for classification (lower-case bytes).
        self.wanted = frozenset(
            name for _, rules in self._slices for rule in rules for name, _ in rule.headers
        )
        self.uses_ip = any(rule.networks for _, rules in self._slices for rule in rules)

    def service(self, host: bytes, path: bytes) -> str:
        """Exact host routes first (longest prefix), then host-less routes, then the default."""
        routes = self._by_host.get(host)
        if routes is not None:
            for prefix, service in routes:
                if path.startswith(prefix):
                    return service
        for prefix, service in self._any_host:
            if path.startswith(prefix):
                return service
        return self._default_service

    def slice(self, ip: IPAddress | None, headers: Mapping[bytes, bytes], path: bytes) -> str:
        for name, rules in self._slices:
            for rule in rules:
                if rule.matches(ip, headers, path):
                    return name
        return self.default_slice


def _config_host(host: str) -> bytes:
    try:
        raw = host.strip().encode("idna")
    except UnicodeError:
        raw = host.strip().encode("utf-8")
    return host_key(raw) or raw.lower()


_cache: tuple[Policy, Classifier] | None = None


def classifier_for(policy: Policy) -> Classifier:
    """The compiled classifier of *policy*, rebuilt only when the policy object changes."""
    global _cache
    cached = _cache
    if cached is not None and cached[0] is policy:
        return cached[1]
    compiled = Classifier(policy)
    _cache = (policy, compiled)
    return compiled


def parse_ip(text: str) -> IPAddress | None:
    """Client address for CIDR rules; IPv4-mapped IPv6 is unmapped so v4 CIDRs apply."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
