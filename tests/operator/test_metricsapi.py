"""The custom metrics API, its authentication and the HPA, as pure data."""

from __future__ import annotations

from typing import Any

import pytest

from backdial.operator.aggregatorauth import (
    Caller,
    DecisionCache,
    access_review,
    authenticate,
    requestheader_config,
)
from backdial.operator.metricsapi import (
    ApiError,
    MetricName,
    MetricQuery,
    PodSample,
    Version,
    parse_selector,
    quantity,
    route,
    selector_matches,
    value_list,
)

NOW = 1_800_000_000.0
BASE = "/apis/custom.metrics.k8s.io"


def test_discovery_documents() -> None:
    group = route(f"{BASE}/")
    assert isinstance(group, dict) and group["kind"] == "APIGroup"
    assert group["preferredVersion"]["version"] == "v1beta2"
    assert [v["version"] for v in group["versions"]] == ["v1beta2", "v1beta1"]
    apis = route("/apis")
    assert isinstance(apis, dict) and apis["groups"][0]["name"] == "custom.metrics.k8s.io"
    for version in ("v1beta2", "v1beta1"):
        doc = route(f"{BASE}/{version}")
        assert isinstance(doc, dict)
        assert doc["groupVersion"] == f"custom.metrics.k8s.io/{version}"
        assert [(r["name"], r["namespaced"], r["verbs"]) for r in doc["resources"]] == [
            ("pods/backdial_requests_waiting", True, ["get"]),
            ("pods/backdial_session_utilization", True, ["get"]),
        ]


def test_routes_metric_queries() -> None:
    assert route(f"{BASE}/v1beta2/namespaces/shop/pods/*/backdial_requests_waiting") == (
        MetricQuery(Version.V1BETA2, "shop", "*", MetricName.REQUESTS_WAITING)
    )
    assert route(f"{BASE}/v1beta1/namespaces/a/pods/web-1/backdial_session_utilization") == (
        MetricQuery(Version.V1BETA1, "a", "web-1", MetricName.SESSION_UTILIZATION)
    )
    for bad in (
        f"{BASE}/v1beta2/namespaces/a/pods/*/cpu",
        f"{BASE}/v2/namespaces/a/pods/*/backdial_requests_waiting",
        f"{BASE}/v1beta2/namespaces/a/services/*/backdial_requests_waiting",
        "/healthz",
    ):
        with pytest.raises(ApiError) as info:
            route(bad)
        assert info.value.code == 404 and info.value.status()["reason"] == "NotFound"


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("app=web", {"app": "web"}, True),
        ("app==web", {"app": "web", "x": "y"}, True),
        ("app=web", {"app": "api"}, False),
        ("app=web,tier!=db", {"app": "web", "tier": "db"}, False),
        ("app=web,tier!=db", {"app": "web"}, True),
        ("env in (a, b),app", {"env": "b", "app": "x"}, True),
        ("env notin (a,b)", {"env": "a"}, False),
        ("!canary", {"canary": "1"}, False),
        ("!canary", {}, True),
        ("", {"any": "thing"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(parse_selector(selector), labels) is matches


def test_bad_selector_is_a_400() -> None:
    with pytest.raises(ApiError) as info:
        parse_selector("app in web")
    assert info.value.code == 400


def test_quantities() -> None:
    assert [quantity(v) for v in (0, 4, 12.5, 100 / 3, 80.0)] == [
        "0",
        "4",
        "12500m",
        "33333m",
        "80",
    ]


PODS = [
    ("web-a", {"app": "web"}),
    ("web-b", {"app": "web"}),
    ("web-stale", {"app": "web"}),
    ("web-new", {"app": "web"}),
    ("api-a", {"app": "api"}),
]
SAMPLES = {
    "web-a": PodSample("web-a", waiting=6, leased=2, registered=2, received=NOW - 0.5),
    "web-b": PodSample("web-b", waiting=0, leased=1, registered=4, received=NOW - 1.0),
    "web-stale": PodSample("web-stale", waiting=9, leased=1, registered=1, received=NOW - 30),
    "api-a": PodSample("api-a", waiting=3, leased=0, registered=0, received=NOW),
}


def values(q: MetricQuery, selector: str = "app=web") -> dict[str, Any]:
    return value_list(q, PODS, SAMPLES, selector=selector, now=NOW, max_age=5.0)


def test_requests_waiting_per_pod_v1beta2() -> None:
    doc = values(MetricQuery(Version.V1BETA2, "shop", "*", MetricName.REQUESTS_WAITING))
    assert doc["kind"] == "MetricValueList"
    assert doc["apiVersion"] == "custom.metrics.k8s.io/v1beta2"
    # Only selected pods with a fresh report: no stale one, none never reported.
    assert [(i["describedObject"]["name"], i["value"]) for i in doc["items"]] == [
        ("web-a", "6"),
        ("web-b", "0"),
    ]
    item = doc["items"][0]
    assert item["metric"] == {"name": "backdial_requests_waiting"}
    assert item["describedObject"] == {
        "kind": "Pod",
        "namespace": "shop",
        "name": "web-a",
        "apiVersion": "/v1",
    }
    assert item["timestamp"] == "2027-01-15T07:59:59Z"  # the report time


def test_session_utilization_v1beta1() -> None:
    doc = values(MetricQuery(Version.V1BETA1, "shop", "*", MetricName.SESSION_UTILIZATION))
    assert [(i["describedObject"]["name"], i["value"]) for i in doc["items"]] == [
        ("web-a", "100"),
        ("web-b", "25"),
    ]
    assert doc["items"][0]["metricName"] == "backdial_session_utilization"
    # No session registered: saturated while requests wait.
    api = values(MetricQuery(Version.V1BETA2, "x", "*", MetricName.SESSION_UTILIZATION), "app=api")
    assert api["items"][0]["value"] == "100"


def test_single_pod_and_missing_pod() -> None:
    doc = values(MetricQuery(Version.V1BETA2, "shop", "web-b", MetricName.REQUESTS_WAITING), "")
    assert [i["describedObject"]["name"] for i in doc["items"]] == ["web-b"]
    for pod in ("web-stale", "web-new", "nope"):
        with pytest.raises(ApiError) as info:
            values(MetricQuery(Version.V1BETA2, "shop", pod, MetricName.REQUESTS_WAITING), "")
        assert info.value.code == 404


# -- aggregator authentication ----------------------------------------------------------------
CM = {
    "requestheader-client-ca-file": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
    "requestheader-allowed-names": '["front-proxy-client"]',
    "requestheader-username-headers": '["X-Remote-User"]',
    "requestheader-group-headers": '["X-Remote-Group"]',
    "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
}


def test_requestheader_config() -> None:
    cfg = requestheader_config(CM)
    assert cfg.allowed_names == ("front-proxy-client",)
    assert cfg.username_headers == ("X-Remote-User",)
    with pytest.raises(ValueError, match="no requestheader-client-ca-file"):
        requestheader_config({"client-ca-file": "x"})
    with pytest.raises(ValueError, match="not a JSON list"):
        requestheader_config({**CM, "requestheader-allowed-names": "front"})


def test_authenticate_the_front_proxy() -> None:
    cfg = requestheader_config(CM)
    headers = {"x-remote-user": ["system:hpa"], "x-remote-group": ["a", "b"]}
    assert authenticate(cfg, "front-proxy-client", headers) == Caller("system:hpa", ("a", "b"))
    for cn, hdrs, code in (
        (None, headers, 401),
        ("someone-else", headers, 403),
        ("front-proxy-client", {}, 401),
    ):
        with pytest.raises(ApiError) as info:
            authenticate(cfg, cn, hdrs)
        assert info.value.code == code
    anyone = requestheader_config({**CM, "requestheader-allowed-names": "[]"})
    assert authenticate(anyone, "whoever", headers).user == "system:hpa"


def test_access_review_and_cache() -> None:
    q = MetricQuery(Version.V1BETA2, "shop", "*", MetricName.REQUESTS_WAITING)
    review = access_review(Caller("u", ("g",)), q)
    assert review["spec"]["resourceAttributes"] == {
        "namespace": "shop",
        "verb": "get",
        "group": "custom.metrics.k8s.io",
        "version": "v1beta2",
        "resource": "pods",
        "subresource": "backdial_requests_waiting",
        "name": "",
    }
    cache = DecisionCache(ttl=10, limit=2)
    key = cache.key(Caller("u", ()), q)
    assert cache.get(key, 0) is None
    cache.put(key, True, 0)
    assert cache.get(key, 5) is True and cache.get(key, 11) is None
    for i in range(5):
        cache.put(("k", i), False, 20)
    assert len(cache._entries) <= 2
