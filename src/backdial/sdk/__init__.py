"""backdial SDK: serve an app over sessions dialed to a backdial acceptor.

A service instance connects to the pod-local acceptor, registers each
connection as a *session* and then acts as the HTTP/1.1 server on it; the
number of sessions it keeps registered is its declared capacity.  See
``docs/sdk.md``.

Public API:

* ``Service(app_or_handler, register=URL, sessions=N, ...)`` -- ``start``,
  ``set_sessions``, ``drain``, ``sessions``, ``in_flight``.
* ``Request`` / ``Response`` / ``Handler`` -- the raw-handler API.
* ``Bridge(target)`` -- ASGI app relaying to an unmodified HTTP/1.1 app.
* ``ListenServer(app, host, port)`` -- the same HTTP core on a listening socket.
* ``serve_main(argv)`` / ``bridge_main(argv)`` -- the CLI (in ``backdial.sdk.main``).
"""

from __future__ import annotations

from .backoff import Backoff
from .bridge import Bridge
from .connection import ConnectionContext
from .lifespan import LifespanError
from .listen import ListenServer
from .raw import Handler, Request, Response, as_asgi, handler_app
from .registration import (
    RegisterAddress,
    RegistrationError,
    RegistrationRefused,
    RegistrationRejected,
)
from .service import Service

__all__ = [
    "Backoff",
    "Bridge",
    "ConnectionContext",
    "Handler",
    "LifespanError",
    "ListenServer",
    "RegisterAddress",
    "RegistrationError",
    "RegistrationRefused",
    "RegistrationRejected",
    "Request",
    "Response",
    "Service",
    "as_asgi",
    "handler_app",
]
