"""The acceptor side of the config stream: claims, merging, the saved config."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from backdial.acceptor.operatorlink import (
    STATE_FILE,
    Applied,
    load_applied,
    merge,
    parse_operator_url,
    parse_pod,
    token_claims,
)
from backdial.policy import PolicyError


def jwt(payload: dict[str, object]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"e30.{body}.sig"


def test_token_claims() -> None:
    token = jwt({"kubernetes.io": {"namespace": "shop", "pod": {"name": "web-0", "uid": "u"}}})
    assert token_claims(token) == ("shop", "web-0")
    assert token_claims(jwt({"sub": "x"})) is None
    assert token_claims("not-a-jwt") is None


def test_flags() -> None:
    assert parse_operator_url("https://op.ns.svc:8444") == ("op.ns.svc", 8444)
    assert parse_operator_url("https://op") == ("op", 443)
    assert parse_pod("shop/web-0") == ("shop", "web-0")
    for bad in ("http://op:1", "https://op:x", "https://op/path"):
        with pytest.raises(ValueError):
            parse_operator_url(bad)
    with pytest.raises(ValueError):
        parse_pod("web-0")


def test_merge_keeps_pod_local_parts() -> None:
    base = {
        "routes": [{"name": "api", "service": "api", "pathPrefix": "/api/"}],
        "tokens": ["t"],
        "limits": {"leasePrefetch": 2, "maxSessions": 100},
    }
    part = {"slices": [{"name": "default", "share": 100}], "limits": {"maxSessions": 3}}
    policy = merge(base, part, "test")
    assert policy.limits.max_sessions == 3 and policy.limits.lease_prefetch == 2
    assert policy.tokens == ["t"] and policy.routes[0].name == "api"
    assert merge(base, None, "test").limits.max_sessions == 100
    with pytest.raises(PolicyError, match="shares"):
        merge(base, {"slices": [{"name": "default", "share": 50}], "limits": {}}, "test")


def test_saved_config(tmp_path: Path) -> None:
    assert load_applied(tmp_path) == Applied()
    applied = Applied(4, "v", "shop/web", {"slices": [], "limits": {"maxSessions": 2}})
    (tmp_path / STATE_FILE).write_text(applied.to_json())
    assert load_applied(tmp_path) == applied
    (tmp_path / STATE_FILE).write_text("{broken")
    assert load_applied(tmp_path) == Applied()  # reported and ignored, not fatal
