"""Who may talk to a backdial socket: peer uids on UNIX sockets, CIDRs on TCP.

A UNIX socket's peer is identified by the kernel (``SO_PEERCRED``), so the
acceptor's ``register.sock``, ``control.sock`` and ``admin.sock`` admit a
connection only when the peer's uid is in an allow-list (by default the
acceptor's own uid).  The file mode follows the list: ``0600`` when only the
owner may connect, ``0666`` otherwise (the uid check is the gate; the mode only
lets the kernel admit other users' ``connect``).  ``docs/security.md`` explains
who should be on each list.

Everything here is a pure function or a frozen value, except :func:`peer_uid`
which asks the kernel.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


@dataclass(frozen=True, slots=True)
class Uids:
    """An allow-list of uids; ``everyone`` admits any local process."""

    uids: frozenset[int] = frozenset()
    everyone: bool = False

    @classmethod
    def own(cls) -> Uids:
        return cls(frozenset({os.getuid()}))

    @classmethod
    def parse(cls, text: str, what: str) -> Uids:
        """``any``, or a comma-separated list of uids and user names; ``self`` is our uid."""
        text = text.strip()
        if text == "any":
            return cls(everyone=True)
        uids: set[int] = set()
        for item in filter(None, (p.strip() for p in text.split(","))):
            if item == "self":
                uids.add(os.getuid())
            elif item.isdigit():
                uids.add(int(item))
            else:
                try:
                    uids.add(pwd.getpwnam(item).pw_uid)
                except KeyError:
                    raise ValueError(f"{what}: unknown user {item!r}") from None
        if not uids:
            raise ValueError(f"{what}: expected 'any' or a list of uids, got {text!r}")
        return cls(frozenset(uids))

    def admits(self, uid: int) -> bool:
        return self.everyone or uid in self.uids

    def mode(self) -> int:
        """File mode for a socket guarded by this list."""
        return 0o600 if not self.everyone and self.uids <= {os.getuid()} else 0o666

    def __str__(self) -> str:
        return "any" if self.everyone else ",".join(str(u) for u in sorted(self.uids))


def admitted(sock: socket.socket, allowed: Uids) -> tuple[bool, int]:
    """(admitted, peer uid) for a connected UNIX socket; -1 when the kernel cannot tell."""
    if allowed.everyone:
        return True, -1
    try:
        uid = peer_uid(sock)
    except OSError:
        return False, -1
    return allowed.admits(uid), uid


def bind_unix(path: Path, mode: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A listening UNIX socket at *path* with file mode *mode* (a stale file is replaced).

    Bound under a umask that leaves nothing open, then widened to *mode*: the socket
    never exists with more permissions than asked for.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, kind)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(1024)
    return sock


def parse_networks(text: str, what: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128)."""
    out: list[Network] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    return tuple(out)
