"""The webhook and metrics API listeners over real TLS sockets on 127.0.0.1.

The aggregator's side is played by an aiohttp client holding a front-proxy
client certificate; the SubjectAccessReview is a recorded stand-in here (the
real API server answers it in tests/k8s).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from backdial.operator.injectsettings import InjectSettings
from backdial.operator.metricsapi import PodSample
from backdial.operator.metricsserver import MetricsApi, run
from backdial.operator.webhook import Webhook, serve
from tests.helpers import free_port
from tests.operator.test_inject import demo_pod, review
from tests.operator.tlsutil import Pair, make_ca, make_leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    d = tmp_path_factory.mktemp("pki")
    serving_ca = make_ca(d, "serving-ca")
    front_ca = make_ca(d, "front-proxy-ca")
    rogue_ca = make_ca(d, "rogue-ca")
    return {
        "serving-ca": serving_ca,
        "serving": make_leaf(d, serving_ca, "serving", "backdial-operator", server=True),
        "front-ca": front_ca,
        "front": make_leaf(d, front_ca, "front", "front-proxy-client", server=False),
        "front-other": make_leaf(d, front_ca, "front-other", "intruder", server=False),
        "rogue": make_leaf(d, rogue_ca, "rogue", "front-proxy-client", server=False),
    }


def server_ctx(pki: dict[str, Pair]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["serving"].cert, pki["serving"].key)
    return ctx


def client_ctx(pki: dict[str, Pair], cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["serving-ca"].cert))
    if cert is not None:
        ctx.load_cert_chain(pki[cert].cert, pki[cert].key)
    return ctx


def test_webhook_answers_admission_reviews_over_tls(pki: dict[str, Pair]) -> None:
    async def main() -> None:
        port = free_port()
        hook = Webhook(InjectSettings, lambda: "CA-PEM", "1.2.3")
        runner = await serve(hook.app(), "127.0.0.1", port, server_ctx(pki))
        url = f"https://127.0.0.1:{port}/mutate-pods"
        try:
            async with aiohttp.ClientSession() as http:
                ctx = client_ctx(pki, None)
                async with http.post(url, json=review(demo_pod()), ssl=ctx) as resp:
                    assert resp.status == 200
                    answer = await resp.json()
                async with http.post(url, data=b"{nope", ssl=ctx) as resp:
                    assert resp.status == 400
                async with http.post(url, json={"kind": "Pod"}, ssl=ctx) as resp:
                    assert resp.status == 400
        finally:
            await runner.cleanup()
        response = answer["response"]
        assert response["uid"] == "u-1" and response["allowed"] is True
        patch = json.loads(base64.b64decode(response["patch"]))
        annotations = next(op for op in patch if op["path"] == "/metadata/annotations")
        assert annotations["value"]["backdial.dev/operator-ca"] == "CA-PEM"
        assert annotations["value"]["backdial.dev/injected-version"] == "1.2.3"
        assert hook.reviewed == 1

    asyncio.run(main())


NOW_PODS = [("web-a", {"app": "web"}), ("web-b", {"app": "web"}), ("db", {"app": "db"})]


class Harness:
    def __init__(self, pki: dict[str, Pair], allow: Callable[[str], bool]) -> None:
        self.pki = pki
        self.reviews: list[dict[str, Any]] = []
        self.allow = allow
        self.port = free_port()

    async def load_auth(self) -> dict[str, str]:
        return {
            "requestheader-client-ca-file": self.pki["front-ca"].pem(),
            "requestheader-allowed-names": '["front-proxy-client"]',
            "requestheader-username-headers": '["X-Remote-User"]',
            "requestheader-group-headers": '["X-Remote-Group"]',
        }

    async def review(self, body: dict[str, Any]) -> bool:
        self.reviews.append(body)
        return self.allow(body["spec"]["user"])

    def samples(self, namespace: str) -> dict[str, PodSample]:
        now = time.time()
        return {
            "web-a": PodSample("web-a", 7, 2, 2, now),
            "web-b": PodSample("web-b", 1, 1, 2, now),
            "db": PodSample("db", 0, 0, 1, now),
        }

    async def run(self, body: Callable[[], Awaitable[None]]) -> None:
        api = MetricsApi(
            server_ctx(self.pki),
            self.load_auth,
            lambda ns: NOW_PODS if ns == "shop" else [],
            self.samples,
            self.review,
        )
        runner = await run(api, "127.0.0.1", self.port)
        try:
            await body()
        finally:
            await runner.cleanup()

    async def get(self, path: str, cert: str | None, user: str = "system:hpa") -> tuple[int, Any]:
        url = f"https://127.0.0.1:{self.port}{path}"
        headers = {"X-Remote-User": user, "X-Remote-Group": "system:authenticated"}
        ctx = client_ctx(self.pki, cert)
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, headers=headers, ssl=ctx) as resp,
        ):
            return resp.status, await resp.json()


METRIC = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/shop/pods/*/backdial_requests_waiting"


def test_metrics_api_serves_the_front_proxy(pki: dict[str, Pair]) -> None:
    h = Harness(pki, allow=lambda user: user == "system:hpa")

    async def body() -> None:
        status, doc = await h.get("/apis/custom.metrics.k8s.io/v1beta2", "front")
        assert status == 200 and doc["kind"] == "APIResourceList"
        status, doc = await h.get(METRIC + "?labelSelector=app%3Dweb", "front")
        assert status == 200, doc
        assert [(i["describedObject"]["name"], i["value"]) for i in doc["items"]] == [
            ("web-a", "7"),
            ("web-b", "1"),
        ]
        await h.get(METRIC + "?labelSelector=app%3Dweb", "front")
        assert len(h.reviews) == 1  # the decision is cached
        status, doc = await h.get(METRIC, "front", user="mallory")
        assert status == 403 and doc["reason"] == "Forbidden"

    asyncio.run(h.run(body))


@pytest.mark.parametrize(("cert", "status"), [(None, 401), ("front-other", 403)])
def test_metrics_api_refuses_other_callers(
    pki: dict[str, Pair], cert: str | None, status: int
) -> None:
    h = Harness(pki, allow=lambda user: True)

    async def body() -> None:
        got, doc = await h.get(METRIC, cert)
        assert got == status and doc["kind"] == "Status"
        assert h.reviews == []

    asyncio.run(h.run(body))


def test_metrics_api_refuses_a_certificate_of_another_ca(pki: dict[str, Pair]) -> None:
    h = Harness(pki, allow=lambda user: True)

    async def body() -> None:
        with pytest.raises(aiohttp.ClientError):
            await h.get(METRIC, "rogue")
        assert h.reviews == []

    asyncio.run(h.run(body))
