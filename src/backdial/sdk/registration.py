"""Where and how a service registers: the register URL and the reply outcomes.

The byte format lives in ``backdial.wire``; this module only decides what a
reply means for the dialer.  ``auth`` and the protocol-level refusals are
fatal (retrying cannot fix a wrong token or a wrong protocol version);
``limit``, ``draining`` and ``timeout`` (the preamble is sent at once, so a
timeout means the acceptor stalled) are transient and retried with backoff,
as is any failure to reach the acceptor at all (it may be restarting).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from backdial.wire import ErrCode

# Refusals retrying cannot fix; every other code (``timeout`` included: the preamble
# is sent at once, so it means a stalled acceptor) is retried with backoff.
FATAL_CODES = frozenset({ErrCode.VERSION, ErrCode.MALFORMED, ErrCode.TOO_LONG, ErrCode.AUTH})


class RegistrationError(Exception):
    """A session could not be registered; the dialer retries with backoff."""


class RegistrationRejected(RegistrationError):
    """The acceptor refused in a way retrying cannot fix; the service must stop.

    ``code`` is None when the acceptor's reply itself was not ``BDREG/1``.
    """

    def __init__(self, code: ErrCode | None, message: str) -> None:
        what = code.value if code is not None else "protocol"
        super().__init__(f"acceptor refused registration: {what}: {message}")
        self.code = code
        self.message = message


class RegistrationRefused(RegistrationError):
    """A transient ``ERR`` (``limit``, ``draining``, ``timeout``, or a code this version
    does not know)."""

    def __init__(self, code: ErrCode | None, message: str) -> None:
        super().__init__(f"{code.value}: {message}" if code is not None else message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class RegisterAddress:
    """A parsed register URL: ``unix:///path/register.sock`` or ``tcp://HOST:PORT``."""

    url: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str) -> RegisterAddress:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            path = (parts.netloc + parts.path) if parts.netloc else parts.path
            if not path.startswith("/"):
                raise ValueError(f"register URL {url!r}: unix:// needs an absolute path")
            return cls(url=url, path=path)
        if parts.scheme == "tcp":
            try:
                port = parts.port
            except ValueError:
                port = None
            if not parts.hostname or port is None or parts.path not in ("", "/"):
                raise ValueError(f"register URL {url!r}: expected tcp://HOST:PORT")
            return cls(url=url, host=parts.hostname, port=port)
        raise ValueError(f"register URL {url!r}: scheme must be unix:// or tcp://")


def default_instance() -> str:
    """``<hostname>-<pid>``, reduced to the characters a preamble value allows."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return f"{host or 'host'}-{os.getpid()}"[-128:]


def sanitize_name(name: str, fallback: str = "default") -> str:
    """Turn an arbitrary string (e.g. a module name) into a valid preamble value."""
    clean = "".join(c if (c.isascii() and c.isalnum()) or c in "._~:@+-" else "-" for c in name)
    return clean[:128] or fallback
