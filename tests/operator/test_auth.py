"""Token review results mapped to pods; the review cache.

The TokenReview itself is the API server's (tests/k8s/operator); here the review is a
plain function returning what the API server would, so the mapping and the caching can be
checked exactly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backdial.operator.auth import POD_NAME, POD_UID, Authenticator, AuthError, identity_from_review


def review(ns: str = "shop", pod: str = "web-0", **over: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "authenticated": True,
        "audiences": ["backdial"],
        "user": {
            "username": f"system:serviceaccount:{ns}:default",
            "extra": {POD_NAME: [pod], POD_UID: ["uid-1"]},
        },
    }
    status.update(over)
    return status


def test_identity_from_review() -> None:
    ident = identity_from_review(review())
    assert (ident.namespace, ident.pod, ident.pod_uid, ident.service_account) == (
        "shop",
        "web-0",
        "uid-1",
        "default",
    )


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ({"authenticated": False, "error": "expired"}, 401),
        (review(audiences=["other"]), 401),
        (review(user={"username": "alice", "extra": {}}), 403),
        (review(user={"username": "system:serviceaccount:shop:default", "extra": {}}), 403),
    ],
)
def test_refusals(status: dict[str, Any], code: int) -> None:
    with pytest.raises(AuthError) as err:
        identity_from_review(status)
    assert err.value.status == code


def test_cache_and_claims() -> None:
    now = [0.0]
    calls: list[str] = []

    async def fake_review(token: str) -> dict[str, Any]:
        calls.append(token)
        return review() if token == "good" else {"authenticated": False}

    async def scenario() -> None:
        auth = Authenticator(fake_review, ttl=60, negative_ttl=5, clock=lambda: now[0])
        assert (await auth.authenticate("good", "shop", "web-0")).pod == "web-0"
        assert (await auth.authenticate("good", "shop", "web-0")).pod == "web-0"
        for ns, pod in (("shop", "web-1"), ("other", "web-0")):
            with pytest.raises(AuthError) as err:  # a token of another pod or namespace
                await auth.authenticate("good", ns, pod)
            assert err.value.status == 403
        for _ in range(3):
            with pytest.raises(AuthError):
                await auth.authenticate("bad", "shop", "web-0")
        assert calls == ["good", "bad"]  # one review each, cached
        now[0] = 6.0
        with pytest.raises(AuthError):
            await auth.authenticate("bad", "shop", "web-0")
        now[0] = 61.0
        await auth.authenticate("good", "shop", "web-0")
        assert calls == ["good", "bad", "bad", "good"] and auth.reviews == 4

    asyncio.run(scenario())
