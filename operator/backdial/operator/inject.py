"""Sidecar injection as a pure function: pod in, injected pod and JSONPatch out.

The webhook (``webhook.py``) only decodes the AdmissionReview, calls
:func:`decide` and :func:`inject`, and encodes :func:`json_patch`.  What gets
injected (design §3, SHAPES §3):

* ``backdial-acceptor`` and ``backdial-sidecar`` as native sidecars, first in
  ``initContainers`` (acceptor first, with a startup probe, so the sidecar and
  the app start after it); the sidecar is ready on ``/readyz``;
* the ``backdial-run`` emptyDir at ``/var/run/backdial`` in every container,
  ``BACKDIAL_REGISTER`` in every app container;
* the projected ``backdial-token`` volume (SHAPES §2) plus the operator's CA,
  read back from a pod annotation by the downward API, for config delivery;
* the container port named ``http`` (configurable) moved to the sidecar, and
  app probes on that port rewritten by ``probes.py``;
* a ``preStop`` on app containers that waits for the sidecar's drain (see
  docs/operator.md "Drain");
* restricted ``securityContext`` and resource requests on what we add.

Every listen address is explicit in args (the process node rewrites ``0.0.0.0``
to the pod IP; compiled-in defaults would not be rewritten).
"""

from __future__ import annotations

import copy
import enum
from typing import Any

from backdial.operator.injectsettings import (
    ACCEPTOR,
    ANN_OPERATOR_CA,
    ANN_VERSION,
    INJECT_LABEL,
    INJECTED_LABEL,
    REGISTER_URL,
    RUN_DIR,
    RUN_VOLUME,
    SIDECAR,
    TMP_DIR,
    TMP_VOLUME,
    TOKEN_DIR,
    TOKEN_VOLUME,
    InjectError,
    InjectSettings,
)
from backdial.operator.probes import drain_hook, rewrite_probes

DRAIN_TOKEN_ENV = "BACKDIAL_DRAIN_TOKEN"
DEFAULT_GRACE = 30  # Kubernetes' default terminationGracePeriodSeconds
EXIT_MARGIN = 2.0  # seconds left after the sidecar's drain for the app to exit

Pod = dict[str, Any]


class Decision(enum.Enum):
    INJECT = "inject"
    OPTED_OUT = "opted-out"  # pod label backdial.dev/inject=false
    ALREADY_INJECTED = "already-injected"


def decide(pod: Pod) -> Decision:
    """Whether to inject a pod the webhook was called for.

    The opt-in itself (namespace label, or pod label ``"true"``) is the webhook
    configuration's selectors (``webhookconfig.py``); this repeats the opt-out
    so a misconfigured selector cannot inject an opted-out pod, and makes
    re-invocation and already-injected pods a no-op.
    """
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(INJECT_LABEL) == "false":
        return Decision.OPTED_OUT
    spec = pod.get("spec") or {}
    names = {c.get("name") for c in (spec.get("initContainers") or [])} | {
        c.get("name") for c in (spec.get("containers") or [])
    }
    if labels.get(INJECTED_LABEL) == "true" or ACCEPTOR in names or SIDECAR in names:
        return Decision.ALREADY_INJECTED
    return Decision.INJECT


def _restricted(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _http_probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port, "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def _run_mount() -> dict[str, Any]:
    return {"name": RUN_VOLUME, "mountPath": RUN_DIR}


def _common_env() -> list[dict[str, Any]]:
    return [
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "TMPDIR", "value": TMP_DIR},
    ]


def _acceptor(s: InjectSettings, with_ca: bool) -> dict[str, Any]:
    env = [
        *_common_env(),
        {"name": "BACKDIAL_OPERATOR", "value": s.operator_url},
        {"name": "BACKDIAL_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
    ]
    if with_ca:
        env.append({"name": "BACKDIAL_OPERATOR_CA", "value": f"{TOKEN_DIR}/ca.crt"})
    port = s.acceptor_admin_port
    return {
        "name": ACCEPTOR,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy.value,
        "restartPolicy": "Always",
        # App containers may run as any uid; the run-dir emptyDir is the pod's own, so
        # register.sock admits every process of the pod (control.sock stays the
        # acceptor's own uid: the sidecar runs as it; docs/security.md).
        "args": [
            *("acceptor", "--run-dir", RUN_DIR, "--admin", f"0.0.0.0:{port}"),
            *("--register-uids", "any"),
        ],
        "env": env,
        "ports": [{"name": "acceptor-admin", "containerPort": port, "protocol": "TCP"}],
        # The app must not start before register.sock exists: native sidecars count as
        # started only once their startup probe passes.
        "startupProbe": _http_probe("/healthz", port, 1, 60),
        "livenessProbe": _http_probe("/healthz", port, 10, 3),
        "resources": s.acceptor_resources.to_k8s(),
        "securityContext": _restricted(s.run_as_user),
        "volumeMounts": [
            _run_mount(),
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": TMP_DIR},
        ],
    }


def _sidecar(
    s: InjectSettings, port: dict[str, Any], drain_timeout: float, quiet: float, token: str
) -> dict[str, Any]:
    admin = s.sidecar_admin_port
    return {
        "name": SIDECAR,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy.value,
        "restartPolicy": "Always",
        "args": [
            "sidecar",
            "--run-dir",
            RUN_DIR,
            "--listen",
            f"0.0.0.0:{port['containerPort']}",
            "--admin",
            f"0.0.0.0:{admin}",
            "--workers",
            str(s.sidecar_workers),
            "--drain-timeout",
            _seconds(drain_timeout),
            "--drain-quiet-period",
            _seconds(quiet),
        ],
        "env": [*_common_env(), {"name": DRAIN_TOKEN_ENV, "value": token}],
        "ports": [port, {"name": "sidecar-admin", "containerPort": admin, "protocol": "TCP"}],
        "readinessProbe": _http_probe("/readyz", admin, 2, 1),
        "livenessProbe": _http_probe("/healthz", admin, 10, 3),
        "resources": s.sidecar_resources.to_k8s(),
        "securityContext": _restricted(s.run_as_user),
        "volumeMounts": [_run_mount(), {"name": TMP_VOLUME, "mountPath": TMP_DIR}],
    }


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _volumes(s: InjectSettings, with_ca: bool) -> list[dict[str, Any]]:
    sources: list[dict[str, Any]] = [
        {
            "serviceAccountToken": {
                "audience": "backdial",
                "expirationSeconds": s.token_expiration_seconds,
                "path": "token",
            }
        }
    ]
    if with_ca:
        field = f"metadata.annotations['{ANN_OPERATOR_CA}']"
        sources.append(
            {"downwardAPI": {"items": [{"path": "ca.crt", "fieldRef": {"fieldPath": field}}]}}
        )
    return [
        {"name": RUN_VOLUME, "emptyDir": {}},
        {"name": TMP_VOLUME, "emptyDir": {}},
        {"name": TOKEN_VOLUME, "projected": {"sources": sources}},
    ]


def _take_port(containers: list[dict[str, Any]], s: InjectSettings) -> dict[str, Any]:
    """Remove the traffic port from the app container that declares it; return it."""
    for c in containers:
        ports = c.get("ports") or []
        for i, p in enumerate(ports):
            if p.get("name") == s.port_name:
                del ports[i]
                if not ports:
                    c.pop("ports", None)
                moved = dict(p)
                moved.setdefault("protocol", "TCP")
                if moved["protocol"] != "TCP":
                    raise InjectError(f"port {s.port_name!r} must be TCP, not {moved['protocol']}")
                return moved
    return {"name": s.port_name, "containerPort": s.default_port, "protocol": "TCP"}


def _check_ports(containers: list[dict[str, Any]], s: InjectSettings, traffic: int) -> None:
    ours = {s.acceptor_admin_port: "acceptor admin", s.sidecar_admin_port: "sidecar admin"}
    if traffic in ours:
        raise InjectError(f"traffic port {traffic} collides with the {ours[traffic]} port")
    if len(ours) < 2:
        raise InjectError("acceptorAdminPort and sidecarAdminPort must differ")
    for c in containers:
        for p in c.get("ports") or []:
            number = p.get("containerPort")
            if number in ours or number == traffic:
                what = ours.get(number, "traffic")
                raise InjectError(
                    f"container {c.get('name')!r} declares port {number}, which backdial's "
                    f"{what} port uses"
                )
        for m in c.get("volumeMounts") or []:
            if m.get("mountPath") in (RUN_DIR, TOKEN_DIR):
                raise InjectError(
                    f"container {c.get('name')!r} already mounts something at {m['mountPath']}"
                )


def drain_budget(spec: dict[str, Any], quiet: float) -> tuple[float, float]:
    """(quiet period, in-flight drain timeout) that fit the pod's grace period."""
    grace = spec.get("terminationGracePeriodSeconds")
    grace = DEFAULT_GRACE if grace is None else float(grace)
    quiet = max(0.0, min(quiet, grace - EXIT_MARGIN - 1.0))
    return quiet, max(1.0, grace - quiet - EXIT_MARGIN)


def inject(pod: Pod, s: InjectSettings, *, drain_token: str, ca_pem: str, version: str) -> Pod:
    """The injected copy of *pod* (InjectError when it cannot be injected)."""
    out = copy.deepcopy(pod)
    meta = out.setdefault("metadata", {})
    spec = out.setdefault("spec", {})
    containers: list[dict[str, Any]] = spec.get("containers") or []
    if not containers:
        raise InjectError("the pod has no containers")
    volumes = spec.setdefault("volumes", [])
    clash = {RUN_VOLUME, TMP_VOLUME, TOKEN_VOLUME} & {v.get("name") for v in volumes}
    if clash:
        raise InjectError(f"volume name {sorted(clash)[0]!r} is reserved for backdial")

    port = _take_port(containers, s)
    _check_ports(containers + (spec.get("initContainers") or []), s, port["containerPort"])
    quiet, drain_timeout = drain_budget(spec, s.drain_quiet_period)
    with_ca = bool(ca_pem.strip())

    for c in containers:
        env = c.setdefault("env", [])
        if not any(e.get("name") == "BACKDIAL_REGISTER" for e in env):
            env.append({"name": "BACKDIAL_REGISTER", "value": REGISTER_URL})
        c.setdefault("volumeMounts", []).append(_run_mount())
        rewrite_probes(c, port, s.port_name, s.sidecar_admin_port)
        lifecycle = c.setdefault("lifecycle", {})
        # An app's own preStop is kept (documented: it then has to wait for the drain).
        lifecycle.setdefault("preStop", drain_hook(s.sidecar_admin_port, drain_token))

    ours = [_acceptor(s, with_ca), _sidecar(s, port, drain_timeout, quiet, drain_token)]
    spec["initContainers"] = ours + (spec.get("initContainers") or [])
    volumes.extend(_volumes(s, with_ca))
    meta.setdefault("labels", {})[INJECTED_LABEL] = "true"
    annotations = meta.setdefault("annotations", {})
    annotations[ANN_VERSION] = version
    if with_ca:
        annotations[ANN_OPERATOR_CA] = ca_pem
    return out


_PATCHED = (
    ("/metadata/labels", ("metadata", "labels")),
    ("/metadata/annotations", ("metadata", "annotations")),
    ("/spec/initContainers", ("spec", "initContainers")),
    ("/spec/containers", ("spec", "containers")),
    ("/spec/volumes", ("spec", "volumes")),
)


def json_patch(before: Pod, after: Pod) -> list[dict[str, Any]]:
    """RFC 6902 ``add`` operations for every top-level field :func:`inject` changes.

    ``add`` on an existing member replaces it, so each op is correct whether or
    not the field was there; whole fields keep the patch obviously right.
    """
    ops: list[dict[str, Any]] = []
    for pointer, (top, key) in _PATCHED:
        old = (before.get(top) or {}).get(key)
        new = (after.get(top) or {}).get(key)
        if new is not None and new != old:
            ops.append({"op": "add", "path": pointer, "value": new})
    return ops
