"""List+watch caches over ``kubernetes_asyncio``, with objects kept as plain JSON dicts.

:func:`call` runs one generated client method and returns the response body as a dict
(``_preload_content=False``: no model objects, the kubelet works on the API's JSON).
:class:`Informer` lists a resource, then watches from the list's resourceVersion (with
bookmarks), relisting when the version has expired; every change reaches a callback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .plan import Obj

log = logging.getLogger("kubelet.informer")

WATCH_SECONDS = 240  # below aiohttp's default 5-minute total timeout


class ApiError(Exception):
    """An API call answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


async def call(method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Obj:
    """Call a generated API method; the JSON body, or :class:`ApiError`."""
    response = await method(*args, _preload_content=False, **kwargs)
    try:
        data = await response.read()
    finally:
        response.release()
    if response.status >= 400:
        raise ApiError(response.status, data.decode("utf-8", "replace"))
    body: Obj = json.loads(data) if data else {}
    return body


def _version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def key_of(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


class _Expired(Exception):
    pass


EventHandler = Callable[[str, Obj], None]


class Informer:
    """A cache of one resource kind, kept current by list+watch."""

    def __init__(
        self,
        kind: str,
        list_method: Callable[..., Awaitable[Any]],
        on_event: EventHandler,
        **selectors: str,
    ) -> None:
        self.kind = kind
        self._list = list_method
        self._on_event = on_event
        self._selectors = selectors
        self.store: dict[tuple[str, str], Obj] = {}
        self.synced = asyncio.Event()

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.store.get((namespace, name))

    async def run(self) -> None:
        """List and watch forever (cancel to stop)."""
        while True:
            try:
                version = await self._relist()
                self.synced.set()
                while True:
                    version = await self._watch(version)
            except _Expired:
                log.info("%s: resource version expired; relisting", self.kind)
            except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as exc:
                log.warning("%s: list/watch failed (%s); retrying", self.kind, exc)
                await asyncio.sleep(1.0)

    def _emit(self, kind: str, obj: Obj) -> None:
        try:
            self._on_event(kind, obj)
        except Exception:  # a handler bug must not stop the cache
            log.exception("%s: handler failed on %s %s", self.kind, kind, key_of(obj))

    async def _relist(self) -> str:
        body = await call(self._list, **self._selectors)
        fresh: dict[tuple[str, str], Obj] = {}
        for item in body.get("items") or []:
            item.setdefault("kind", self.kind)
            fresh[key_of(item)] = item
        for key, old in list(self.store.items()):
            if key not in fresh:
                del self.store[key]
                self._emit("DELETED", old)
        for key, item in fresh.items():
            previous = self.store.get(key)
            self.store[key] = item
            if previous is None:
                self._emit("ADDED", item)
            elif _version(previous) != _version(item):
                self._emit("MODIFIED", item)
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> str:
        response = await self._list(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            **self._selectors,
        )
        try:
            if response.status == 410:
                raise _Expired
            if response.status >= 400:
                raise ApiError(response.status, (await response.read()).decode())
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired
                    raise ApiError(int(obj.get("code") or 500), json.dumps(obj))
                version = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                obj.setdefault("kind", self.kind)
                if kind == "DELETED":
                    self.store.pop(key_of(obj), None)
                else:
                    self.store[key_of(obj)] = obj
                self._emit(kind, obj)
        finally:
            response.release()
        return version
