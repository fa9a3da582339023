"""PROXY protocol v1 (text) and v2 (binary) header parsing, sans-IO and strict.

A load balancer in front of the sidecar may prepend one PROXY header to each
client connection to pass the original client address.  The listener opts in
(``ProxySettings.proxy_protocol``); then every connection must start with a
valid header and anything else closes the connection: accepting a connection
without the header would let clients choose their own address (and so their
slice by CIDR).

``parse(buf)`` returns ``None`` until a whole header is buffered, raises
``ProxyHeaderError`` as soon as the bytes cannot become a valid header, and
otherwise returns the client address (``None`` for ``LOCAL``/``UNKNOWN``/
non-IP families, meaning "use the socket peer") and the header length.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the spec's maximum line length, CRLF included
V2_SIG: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX: Final = 16 + 1024  # header + addresses + TLVs; real LBs stay far below this


class ProxyHeaderError(Exception):
    """The connection did not start with a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    client: tuple[str, int] | None  # None: use the transport's peer address
    length: int  # bytes of the header; the client's data starts after it


def parse(buf: bytes | bytearray) -> ProxyHeader | None:
    if buf[:1] == b"P":
        return _v1(buf)
    if buf[:1] == b"\r":
        return _v2(buf)
    if buf:
        raise ProxyHeaderError("no PROXY protocol header")
    return None


def _v1(buf: bytes | bytearray) -> ProxyHeader | None:
    head = bytes(buf[: len(V1_PREFIX)])
    if not V1_PREFIX.startswith(head):
        raise ProxyHeaderError("bad PROXY v1 signature")
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX or b"\n" in buf or b"\r" in buf[:-1]:
            raise ProxyHeaderError("PROXY v1 line too long or not CRLF-terminated")
        return None
    line = bytes(buf[len(V1_PREFIX) : end])
    length = end + 2
    parts = line.split(b" ")
    if parts[0] == b"UNKNOWN":  # the LB could not tell; everything after it is ignored
        return ProxyHeader(None, length)
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    family = 4 if parts[0] == b"TCP4" else 6
    src = _v1_addr(parts[1], family)
    _v1_addr(parts[2], family)
    sport = _v1_port(parts[3])
    _v1_port(parts[4])
    return ProxyHeader((src, sport), length)


def _v1_addr(raw: bytes, family: int) -> str:
    try:
        ip = ipaddress.ip_address(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("bad address in PROXY v1 line") from None
    if ip.version != family:
        raise ProxyHeaderError("address family mismatch in PROXY v1 line")
    return str(ip)


def _v1_port(raw: bytes) -> int:
    # Decimal without leading zeros, as the spec requires.
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[:1] == b"0"):
        raise ProxyHeaderError("bad port in PROXY v1 line")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError("bad port in PROXY v1 line")
    return port


_FAMILIES: Final[dict[int, int]] = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}


def _v2(buf: bytes | bytearray) -> ProxyHeader | None:
    sig = bytes(buf[:12])
    if not V2_SIG.startswith(sig):
        raise ProxyHeaderError("bad PROXY v2 signature")
    if len(buf) < 16:
        return None
    ver_cmd, fam, size = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1:
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    length = 16 + size
    if length > V2_MAX:
        raise ProxyHeaderError("PROXY v2 header too large")
    if fam != 0x00 and fam not in _FAMILIES:
        raise ProxyHeaderError("unsupported PROXY v2 address family")
    if fam != 0x00 and size < _FAMILIES[fam]:
        raise ProxyHeaderError("PROXY v2 address block too short")
    if len(buf) < length:
        return None
    if ver_cmd & 0x0F == 0:  # LOCAL: health check from the LB itself
        return ProxyHeader(None, length)
    if fam in (0x11, 0x12):
        src = str(ipaddress.IPv4Address(bytes(buf[16:20])))
        (port,) = struct.unpack_from("!H", buf, 24)
        return ProxyHeader((src, port), length)
    if fam in (0x21, 0x22):
        src = str(ipaddress.IPv6Address(bytes(buf[16:32])))
        (port,) = struct.unpack_from("!H", buf, 48)
        return ProxyHeader((src, port), length)
    return ProxyHeader(None, length)  # UNSPEC or UNIX: nothing routable to report
