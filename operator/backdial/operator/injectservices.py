"""The operator's injection and autoscaling listeners, as one piece ``main.py`` starts.

* the mutating webhook (``--webhook-listen``, TLS) with the settings from
  ``--inject-config`` (re-read when the file changes, e.g. a ConfigMap update);
* the custom metrics API (``--metrics-api-listen``, TLS, front-proxy client
  certificates) over the fleet state;
* CA bundle upkeep (self-managed CA only; with cert-manager its CA injector
  does it): the operator's CA patched into the webhook configuration and the
  APIServices at start, and re-checked every 30 s.

An empty listen address turns a listener off.  Everything the operator
process owns (API client, TLS contexts, fleet, pod index) comes in as
callables, so this module does not depend on how they are built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aiohttp import web

from backdial.operator import cabundle, metricsserver, webhook
from backdial.operator.aggregatorauth import CONFIGMAP_NAME, CONFIGMAP_NAMESPACE
from backdial.operator.fleet import Fleet
from backdial.operator.injectsettings import InjectError, InjectSettings, load_settings
from backdial.operator.scaling import Request, samples
from backdial.options import option, optional_hostport

log = logging.getLogger("backdial.operator")

CA_SYNC_INTERVAL = 30.0


def inject_config(raw: str) -> Path | None:
    """The injection defaults file, read once now so a bad one is refused at start."""
    if not raw.strip():
        return None
    path = Path(raw)
    try:
        load_settings(path)
    except InjectError as exc:
        raise ValueError(str(exc)) from None
    return path


@dataclass(frozen=True, slots=True)
class ServicesSettings:
    webhook_listen: tuple[str, int] | None = option(
        "--webhook-listen",
        parse=optional_hostport,
        default="0.0.0.0:9443",
        help="HOST:PORT for the mutating webhook, TLS; empty: off",
    )
    metrics_api_listen: tuple[str, int] | None = option(
        "--metrics-api-listen",
        parse=optional_hostport,
        default="0.0.0.0:6443",
        help="HOST:PORT for the custom metrics API (custom.metrics.k8s.io), TLS; empty: off",
    )
    inject_config: Path | None = option(
        "--inject-config",
        parse=inject_config,
        help="YAML file of injection defaults (docs/injection.md)",
    )


def _version() -> str:
    try:
        return version("backdial")
    except PackageNotFoundError:
        return "0+unknown"


class SettingsFile:
    """The injection settings, re-read when the file's stat changes (bad file: keep the old)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[float, int, int] | None = None
        self._settings = InjectSettings()
        self()

    def __call__(self) -> InjectSettings:
        if self.path is None:
            return self._settings
        try:
            st = os.stat(self.path)
        except OSError:
            return self._settings
        stamp = (st.st_mtime, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._settings = load_settings(self.path)
                log.info("injection settings loaded from %s", self.path)
            except InjectError as exc:
                log.error("injection settings not reloaded, previous ones stay: %s", exc)
        return self._settings


class InjectServices:
    def __init__(
        self,
        cfg: ServicesSettings,
        request: Request,
        ca_pem: Callable[[], bytes],
        fleet: Fleet,
        pods_of: Callable[[str], Iterable[tuple[str, Mapping[str, str]]]],
        *,
        manage_bundles: bool = True,
    ) -> None:
        self.cfg = cfg
        self.manage_bundles = manage_bundles  # False with cert-manager: its CA injector does it
        self.request = request
        self.ca_pem = ca_pem
        self.fleet = fleet
        self.pods_of = pods_of
        self.settings = SettingsFile(cfg.inject_config)
        self.webhook = webhook.Webhook(self.settings, lambda: self.ca_pem().decode(), _version())
        self.metrics: metricsserver.MetricsApi | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self, webhook_ctx: ssl.SSLContext, metrics_ctx: ssl.SSLContext) -> None:
        if self.cfg.webhook_listen is not None:
            self._runners.append(
                await webhook.serve(self.webhook.app(), *self.cfg.webhook_listen, webhook_ctx)
            )
        if self.cfg.metrics_api_listen is not None:
            self.metrics = metricsserver.MetricsApi(
                metrics_ctx,
                self._load_auth,
                self.pods_of,
                lambda ns: samples(self.fleet, ns),
                self._review,
            )
            self._tasks.append(asyncio.ensure_future(self._serve_metrics(self.metrics)))
        if self.manage_bundles:
            self._tasks.append(asyncio.ensure_future(self._keep_bundles()))

    async def _serve_metrics(self, api: metricsserver.MetricsApi) -> None:
        assert self.cfg.metrics_api_listen is not None
        self._runners.append(await metricsserver.run(api, *self.cfg.metrics_api_listen))
        await api.keep_auth_fresh()

    async def _load_auth(self) -> Mapping[str, str]:
        path = f"/api/v1/namespaces/{CONFIGMAP_NAMESPACE}/configmaps/{CONFIGMAP_NAME}"
        obj = await self.request("GET", path, None)
        return dict((obj or {}).get("data") or {})

    async def _review(self, body: dict[str, Any]) -> bool:
        path = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        obj = await self.request("POST", path, body)
        return bool(((obj or {}).get("status") or {}).get("allowed"))

    async def _keep_bundles(self) -> None:
        """Re-checked every round, not only on a CA change: ``helm upgrade`` re-renders
        the objects without a bundle."""
        while True:
            ca = self.ca_pem()
            delay = CA_SYNC_INTERVAL
            if ca:
                try:
                    found, _ = await cabundle.patch_bundles(self.request, ca)
                    if found < cabundle.TARGETS:
                        delay = 5.0  # not installed (yet): look again soon
                except Exception as exc:  # retried soon
                    log.warning("CA bundle not updated: %s", exc)
                    delay = 2.0
            else:
                delay = 1.0  # no certificate yet
            await asyncio.sleep(delay)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for runner in self._runners:
            await runner.cleanup()
