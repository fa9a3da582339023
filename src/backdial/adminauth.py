"""Who may change state through an admin API, decided as plain data.

Read-only requests (``GET``/``HEAD``: metrics, probes, state) stay open, so
kubelets and Prometheus need nothing.  Everything else mutates, and inside a
pod every container shares ``127.0.0.1``, so loopback proves nothing.  A
mutation is allowed only over an authenticated channel:

* the component's UNIX admin socket, whose peers the kernel identifies
  (``SO_PEERCRED``; checked when the connection is accepted), or
* TCP with ``Authorization: Bearer <token>`` matching the token file (read on
  every mutation, so it can be rotated in place; compared in constant time).

On TCP the request must also look like it came from a program, not a browser
tricked into sending it: ``Host`` must name this machine by address (or be in
an allow-list: DNS rebinding uses a name the attacker controls), no
``Origin`` (browsers send one on cross-site and scripted requests), and a body
must be ``application/json`` (which a cross-site form cannot send without a
CORS preflight, which is never answered).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

READ_ONLY = frozenset({"GET", "HEAD"})
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


@dataclass(frozen=True, slots=True)
class Denial:
    status: int  # 401 (no or wrong credentials) or 403 (refused whatever the credentials)
    reason: str


@dataclass(frozen=True, slots=True)
class AdminAccess:
    """How an admin API authenticates mutations."""

    token_file: Path | None = None  # None: no mutations over TCP
    hosts: frozenset[str] = frozenset()  # extra Host names accepted for mutations over TCP

    def token(self) -> str:
        if self.token_file is None:
            return ""
        try:
            return self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return ""


def host_name(value: str) -> str:
    """The host part of a ``Host`` header value, lower-cased, brackets removed."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else ""
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def host_is_local(value: str, extra: frozenset[str] = frozenset()) -> bool:
    """An IP literal, ``localhost`` or an explicitly allowed name (no DNS rebinding)."""
    name = host_name(value)
    if not name:
        return False
    if name in _LOCAL_NAMES or name in extra:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def browser_refusal(headers: Mapping[str, str], extra_hosts: frozenset[str]) -> Denial | None:
    """Why a TCP mutation looks browser-borne (cross-site or DNS rebinding), or None."""
    if not host_is_local(headers.get("host", ""), extra_hosts):
        return Denial(403, "Host must be an IP address, localhost or an allowed name")
    if "origin" in headers:
        return Denial(403, "requests with an Origin (from a browser) may not change state")
    return None


def check_mutation(
    method: str,
    headers: Mapping[str, str],
    via_unix: bool,
    access: AdminAccess,
    has_body: bool,
) -> Denial | None:
    """None when the request may proceed; *headers* have lower-case names."""
    if method in READ_ONLY or via_unix:
        return None  # reads are open; the UNIX socket admitted only allowed uids
    refusal = browser_refusal(headers, access.hosts)
    if refusal is not None:
        return refusal
    if has_body and headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return Denial(403, "a request body must be application/json")
    expected = access.token()
    if not expected:
        return Denial(403, "mutations over TCP need a token file; use the UNIX admin socket")
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        return Denial(401, "missing or wrong bearer token")
    return None
