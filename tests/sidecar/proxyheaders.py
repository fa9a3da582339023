"""PROXY protocol headers as a load balancer writes them, to send at the sidecar in tests.

The product only parses these (``backdial.sidecar.proxyproto``); building them is the
load balancer's part, so it lives here.
"""

from __future__ import annotations

import ipaddress
import struct

from backdial.sidecar.proxyproto import V2_SIG


def encode_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """A v1 (text) header."""
    family = b"TCP6" if ":" in src[0] else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (
        family,
        src[0].encode(),
        dst[0].encode(),
        src[1],
        dst[1],
    )


def encode_v2(src: tuple[str, int], dst: tuple[str, int], tlvs: bytes = b"") -> bytes:
    """Build a v2 PROXY (TCP) header."""
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1]) + tlvs
    return V2_SIG + struct.pack("!BBH", 0x21, fam, len(body)) + body
