"""The custom metrics API's HTTPS listener (aiohttp), for the API server's aggregator.

TLS asks for a client certificate and verifies it against the requestheader
CA from ``kube-system/extension-apiserver-authentication`` (re-read every
``refresh`` seconds; new CAs are added to the live context): a certificate of
any other CA fails the handshake.  Then ``aggregatorauth.authenticate``
checks the front proxy's name and takes the user from its headers, a cached
SubjectAccessReview decides, and ``metricsapi`` builds the answer from the
fleet state.  See docs/autoscaling.md.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from backdial.operator.aggregatorauth import (
    DecisionCache,
    RequestHeaderConfig,
    access_review,
    authenticate,
    requestheader_config,
)
from backdial.operator.metricsapi import ApiError, MetricQuery, PodSample, route, value_list

log = logging.getLogger("backdial.operator.metricsapi")

PodsOf = Callable[[str], Iterable[tuple[str, Mapping[str, str]]]]  # namespace -> (name, labels)
SamplesOf = Callable[[str], Mapping[str, PodSample]]  # namespace -> pod name -> sample
Review = Callable[[dict[str, Any]], Awaitable[bool]]  # SubjectAccessReview -> allowed
LoadAuth = Callable[[], Awaitable[Mapping[str, str]]]  # the ConfigMap's data


def _common_name(peercert: Any) -> str | None:
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class MetricsApi:
    def __init__(
        self,
        ctx: ssl.SSLContext,
        load_auth: LoadAuth,
        pods_of: PodsOf,
        samples_of: SamplesOf,
        review: Review | None,
        *,
        max_age: float = 5.0,
    ) -> None:
        self.ctx = ctx
        self.load_auth = load_auth
        self.pods_of, self.samples_of, self.review = pods_of, samples_of, review
        self.max_age = max_age
        self.auth: RequestHeaderConfig | None = None
        self._cas: set[str] = set()
        self.decisions = DecisionCache()
        self.served = 0
        self.refused = 0
        ctx.verify_mode = ssl.CERT_OPTIONAL  # no certificate: answered 401, not a TLS error

    async def refresh_auth(self) -> None:
        """Read the requestheader configuration; trust its CA from now on."""
        cfg = requestheader_config(await self.load_auth())
        if cfg.ca_pem not in self._cas:
            self.ctx.load_verify_locations(cadata=cfg.ca_pem)
            self._cas.add(cfg.ca_pem)
        self.auth = cfg

    async def keep_auth_fresh(self, refresh: float = 60.0) -> None:
        while True:
            await asyncio.sleep(refresh)
            try:
                await self.refresh_auth()
            except Exception as exc:  # keep serving with what we have
                log.warning("requestheader configuration not refreshed: %s", exc)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await self._answer(request)
        except ApiError as exc:
            if exc.code in (401, 403):
                self.refused += 1
                log.warning("metrics API refused %s: %s", request.path, exc.message)
            return web.json_response(exc.status(), status=exc.code)
        self.served += 1
        return web.json_response(body)

    async def _answer(self, request: web.Request) -> dict[str, Any]:
        if self.auth is None:
            raise ApiError(503, "ServiceUnavailable", "requestheader configuration not loaded")
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        caller = authenticate(self.auth, _common_name(peer), headers)
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", "the metrics API is read-only")
        found = route(request.path)
        if not isinstance(found, MetricQuery):
            return found  # discovery: any authenticated caller
        if self.review is not None:
            key = self.decisions.key(caller, found)
            now = time.monotonic()
            allowed = self.decisions.get(key, now)
            if allowed is None:
                allowed = await self.review(access_review(caller, found))
                self.decisions.put(key, allowed, now)
            if not allowed:
                raise ApiError(
                    403,
                    "Forbidden",
                    f"{caller.user} may not get pods/{found.metric.value} in {found.namespace}",
                )
        return value_list(
            found,
            self.pods_of(found.namespace),
            self.samples_of(found.namespace),
            selector=request.query.get("labelSelector", ""),
            now=time.time(),
            max_age=self.max_age,
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def run(api: MetricsApi, host: str, port: int) -> web.AppRunner:
    """Load the requestheader configuration (retrying until it is there), then serve."""
    delay = 0.5
    while True:
        try:
            await api.refresh_auth()
            break
        except Exception as exc:
            log.warning("metrics API waits for the requestheader configuration: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    runner = web.AppRunner(api.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=api.ctx, reuse_address=True).start()
    return runner
