"""Who is dialing: TokenReview of a pod-bound ServiceAccount token, cached.

An acceptor presents its projected token (audience ``backdial``) and names the pod it
claims to be in the stream path.  The API server's TokenReview says whether the token is
valid for that audience and, for a pod-bound token, which pod (name and uid) it is bound
to.  The claim must be exactly that pod: a token of another pod, or of a pod in another
namespace, is refused (403), and so is a token that is not bound to a pod at all.

Reviews are cached by a hash of the token (accepted ones for a minute, refused ones for a
few seconds, so a flood of bad tokens does not become a flood of TokenReviews), and at most
a few run at once.  The config server additionally checks the pod uid against its pod
index, so a cached identity of a deleted pod is refused at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from backdial.configstream import AUDIENCE

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"

Review = Callable[[str], Awaitable[Mapping[str, Any]]]  # token -> TokenReview status


class AuthError(Exception):
    """Refused: ``status`` is 401 (not authenticated) or 403 (not this pod)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    namespace: str
    pod: str
    pod_uid: str
    service_account: str


def identity_from_review(status: Mapping[str, Any], audience: str = AUDIENCE) -> Identity:
    """The pod a TokenReview status names, or AuthError."""
    if not status.get("authenticated"):
        reason = status.get("error") or "token not authenticated"
        raise AuthError(401, f"invalid token: {reason}")
    if audience not in (status.get("audiences") or []):
        raise AuthError(401, f"token is not for audience {audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username", ""))
    if not username.startswith(SA_PREFIX):
        raise AuthError(403, f"{username or 'the token'} is not a ServiceAccount")
    namespace, _, account = username[len(SA_PREFIX) :].partition(":")
    extra = user.get("extra") or {}
    names = extra.get(POD_NAME) or []
    uids = extra.get(POD_UID) or []
    if len(names) != 1 or len(uids) != 1:
        raise AuthError(403, "the token is not bound to a pod (use a projected token)")
    return Identity(namespace, str(names[0]), str(uids[0]), account)


def check_claim(identity: Identity, namespace: str, pod: str) -> None:
    if (identity.namespace, identity.pod) != (namespace, pod):
        raise AuthError(
            403,
            f"the token belongs to pod {identity.namespace}/{identity.pod}, not {namespace}/{pod}",
        )


class Authenticator:
    """Cached, concurrency-limited TokenReviews."""

    def __init__(
        self,
        review: Review,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        concurrency: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._review = review
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._gate = asyncio.Semaphore(concurrency)
        self._cache: dict[bytes, tuple[float, Identity | AuthError]] = {}
        self.reviews = 0  # TokenReviews actually sent

    async def authenticate(self, token: str, namespace: str, pod: str) -> Identity:
        """The token's pod if it is *namespace*/*pod*; AuthError otherwise."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is None or hit[0] <= now:
            async with self._gate:
                hit = self._cache.get(key)
                if hit is None or hit[0] <= self._clock():
                    hit = await self._fresh(token)
                    self._cache[key] = hit
                    self._prune()
        outcome = hit[1]
        if isinstance(outcome, AuthError):
            raise outcome
        check_claim(outcome, namespace, pod)
        return outcome

    async def _fresh(self, token: str) -> tuple[float, Identity | AuthError]:
        self.reviews += 1
        try:
            identity = identity_from_review(await self._review(token))
        except AuthError as exc:
            return (self._clock() + self._negative_ttl, exc)
        return (self._clock() + self._ttl, identity)

    def _prune(self) -> None:
        if len(self._cache) > 10_000:
            now = self._clock()
            for key in [k for k, (expiry, _) in self._cache.items() if expiry <= now]:
                del self._cache[key]
