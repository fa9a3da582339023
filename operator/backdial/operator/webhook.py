"""The mutating webhook's HTTPS listener (aiohttp): ``POST /mutate-pods``.

A thin shell over ``admission.review_response``: parse the AdmissionReview,
answer it, log refusals.  Settings and the CA to inject are read through
callables on every request, so a reloaded settings file or a rotated CA takes
effect for the next pod.  Served by every operator replica (not only the
peering leader): admission must not wait for a leader.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
from collections.abc import Callable

from aiohttp import web

from backdial.operator.admission import ReviewError, review_response
from backdial.operator.injectsettings import InjectSettings
from backdial.operator.webhookconfig import WEBHOOK_PATH

log = logging.getLogger("backdial.operator.webhook")

MAX_REVIEW = 8 << 20  # a pod spec with large annotations still fits; the API server caps at 3 MiB


class Webhook:
    def __init__(
        self,
        settings: Callable[[], InjectSettings],
        ca_pem: Callable[[], str],
        version: str,
    ) -> None:
        self.settings, self.ca_pem, self.version = settings, ca_pem, version
        self.reviewed = 0
        self.refused = 0

    async def mutate(self, request: web.Request) -> web.Response:
        try:
            review = json.loads(await request.read())
            answer = review_response(
                review,
                self.settings(),
                ca_pem=self.ca_pem(),
                version=self.version,
                new_token=lambda: secrets.token_urlsafe(24),
            )
        except (ValueError, ReviewError) as exc:  # JSONDecodeError is a ValueError
            return web.json_response({"error": str(exc)}, status=400)
        self.reviewed += 1
        response = answer["response"]
        if not response["allowed"]:
            self.refused += 1
            log.warning("refused pod in %s: %s", _where(review), response["status"]["message"])
        return web.json_response(answer)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REVIEW)
        app.router.add_post(WEBHOOK_PATH, self.mutate)
        return app


def _where(review: dict[str, object]) -> str:
    request = review.get("request")
    return str(request.get("namespace", "?")) if isinstance(request, dict) else "?"


async def serve(
    app: web.Application, host: str, port: int, ctx: ssl.SSLContext | None
) -> web.AppRunner:
    """Start *app* on HOST:PORT (TLS when *ctx*); ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True).start()
    return runner
