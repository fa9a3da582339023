"""ASGI 3 type aliases shared by the SDK modules.

Kept deliberately loose (``MutableMapping[str, Any]``) because ASGI messages are
plain dicts whose shape depends on their ``type`` key; the server core checks
the keys it reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Shared, never mutated by the core: apps only read it.
ASGI_VERSION: dict[str, str] = {"version": "3.0", "spec_version": "2.3"}
