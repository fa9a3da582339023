"""Keep the operator's CA in the webhook configuration and the metrics APIServices.

The API server verifies the operator's serving certificate against the
``caBundle`` of ``MutatingWebhookConfiguration/backdial-injector`` and of the
``v1beta2``/``v1beta1.custom.metrics.k8s.io`` APIServices.  The chart creates
those objects without a bundle (or cert-manager's CA injector fills it); with
the self-managed CA the operator patches its CA in at start and whenever it
changes.  :func:`bundle_patches` is the pure part: which JSON patch each
object needs (none when it already carries the CA).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from backdial.operator.metricsapi import GROUP, Version
from backdial.operator.webhookconfig import CONFIG_NAME

log = logging.getLogger("backdial.operator.cabundle")

WEBHOOK_CONFIG_PATH = (
    f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{CONFIG_NAME}"
)
APISERVICE_PATHS = tuple(
    f"/apis/apiregistration.k8s.io/v1/apiservices/{v.value}.{GROUP}" for v in Version
)

# request(method, path, body) -> the decoded object; raises with .status 404 when absent.
Request = Callable[[str, str, Any], Awaitable[Any]]
TARGETS = 1 + len(APISERVICE_PATHS)


def _b64(ca_pem: bytes) -> str:
    return base64.b64encode(ca_pem).decode()


def webhook_patch(config: Mapping[str, Any], ca_pem: bytes) -> list[dict[str, Any]]:
    """JSON patch setting every webhook's ``clientConfig.caBundle`` (``test`` guards the list)."""
    want = _b64(ca_pem)
    ops: list[dict[str, Any]] = []
    for i, hook in enumerate(config.get("webhooks") or []):
        if (hook.get("clientConfig") or {}).get("caBundle") != want:
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": want})
    return ops


def apiservice_patch(service: Mapping[str, Any], ca_pem: bytes) -> list[dict[str, Any]]:
    want = _b64(ca_pem)
    spec = service.get("spec") or {}
    if spec.get("caBundle") == want:
        return []
    ops: list[dict[str, Any]] = [{"op": "add", "path": "/spec/caBundle", "value": want}]
    if spec.get("insecureSkipTLSVerify"):
        ops.append({"op": "remove", "path": "/spec/insecureSkipTLSVerify"})
    return ops


async def patch_bundles(request: Request, ca_pem: bytes) -> tuple[int, int]:
    """Patch every object that lacks *ca_pem*; returns (objects found, objects patched).

    Objects that do not exist (the chart did not install the webhook, or not
    the APIService) are skipped: the operator does not create them.
    """
    found = patched = 0
    targets: list[tuple[str, Callable[[Mapping[str, Any], bytes], list[dict[str, Any]]]]] = [
        (WEBHOOK_CONFIG_PATH, webhook_patch),
        *((path, apiservice_patch) for path in APISERVICE_PATHS),
    ]
    for path, build in targets:
        try:
            obj = await request("GET", path, None)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                continue
            raise
        found += 1
        ops = build(obj, ca_pem)
        if ops:
            await request("PATCH", path, ops)
            patched += 1
            log.info("CA bundle set on %s", path.rsplit("/", 1)[1])
    return found, patched
