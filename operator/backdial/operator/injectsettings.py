"""What the webhook injects: the operator's defaults and the per-pod annotation overrides.

``InjectSettings`` is the document the chart renders from its values (the
``inject`` block, camelCase keys) and the operator reads with ``--inject-config``;
every field has a default, so an empty file is valid.  A pod may override a few
of them with ``backdial.dev/*`` annotations (``overridden``); a bad annotation
is an ``InjectError`` naming it, which the webhook turns into a refused pod
rather than a silently different one.
"""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backdial.policy import Duration, validation_line

# -- Kubernetes names (design §7 fixes the first four) -------------------------------------------
INJECT_LABEL = "backdial.dev/inject"  # namespace: "enabled"; pod: "true" / "false"
NAMESPACE_ENABLED = "enabled"
INJECTED_LABEL = "backdial.dev/injected"  # set on every injected pod ("true")
ACCEPTOR = "backdial-acceptor"
SIDECAR = "backdial-sidecar"
RUN_VOLUME = "backdial-run"
RUN_DIR = "/var/run/backdial"
REGISTER_URL = f"unix://{RUN_DIR}/register.sock"
TOKEN_VOLUME = "backdial-token"  # SHAPES §2: projected, audience "backdial"
TOKEN_DIR = "/var/run/secrets/backdial"
TMP_VOLUME = "backdial-tmp"  # TMPDIR of the injected containers (read-only root filesystem)
# A directory of its own rather than all of /tmp: a mount over /tmp would also hide
# whatever a process node keeps under the host's /tmp.
TMP_DIR = "/tmp/backdial"

# -- annotations a pod may carry ---------------------------------------------------------------
ANN_IMAGE = "backdial.dev/image"
ANN_ACCEPTOR_RESOURCES = "backdial.dev/acceptor-resources"
ANN_SIDECAR_RESOURCES = "backdial.dev/sidecar-resources"
ANN_PORT_NAME = "backdial.dev/port-name"
ANN_QUIET_PERIOD = "backdial.dev/drain-quiet-period"
ANN_WORKERS = "backdial.dev/sidecar-workers"
# ... and the ones the webhook writes
ANN_OPERATOR_CA = "backdial.dev/operator-ca"  # read back by the downward API into ca.crt
ANN_VERSION = "backdial.dev/injected-version"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME


class InjectError(ValueError):
    """The pod cannot be injected as asked; the message names the field or annotation."""


class PullPolicy(enum.StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Resources(_Model):
    """A container's ``resources`` (quantities as Kubernetes writes them)."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict[str, str]) -> dict[str, str]:
        for name, quantity in value.items():
            if name not in ("cpu", "memory", "ephemeral-storage"):
                raise ValueError(f"unknown resource {name!r} (cpu, memory, ephemeral-storage)")
            if not isinstance(quantity, str) or not _QUANTITY.match(quantity):
                raise ValueError(f"{name}: invalid quantity {quantity!r}; use e.g. 100m or 64Mi")
        return value

    def to_k8s(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if self.limits:
            out["limits"] = dict(self.limits)
        return out


class InjectSettings(_Model):
    """Operator-wide injection defaults (chart values ``inject.*``)."""

    image: str = "ghcr.io/backdial/backdial:latest"
    image_pull_policy: PullPolicy = Field(
        default=PullPolicy.IF_NOT_PRESENT, alias="imagePullPolicy"
    )
    operator_url: str = Field(
        default="https://backdial-operator.backdial-system.svc:8444", alias="operatorUrl"
    )
    port_name: str = Field(default="http", alias="portName")
    default_port: int = Field(default=8080, ge=1, le=65535, alias="defaultPort")
    acceptor_admin_port: int = Field(default=9901, ge=1, le=65535, alias="acceptorAdminPort")
    sidecar_admin_port: int = Field(default=9902, ge=1, le=65535, alias="sidecarAdminPort")
    acceptor_resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "50m", "memory": "64Mi"}),
        alias="acceptorResources",
    )
    sidecar_resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "100m", "memory": "64Mi"}),
        alias="sidecarResources",
    )
    run_as_user: int = Field(default=65532, ge=1, alias="runAsUser")
    drain_quiet_period: Duration = Field(default=5.0, alias="drainQuietPeriod")
    sidecar_workers: int = Field(default=1, ge=1, le=64, alias="sidecarWorkers")
    token_expiration_seconds: int = Field(
        default=3600, ge=600, le=86400, alias="tokenExpirationSeconds"
    )

    @field_validator("port_name")
    @classmethod
    def _port_name(cls, value: str) -> str:
        if not _PORT_NAME.match(value):
            raise ValueError(f"invalid port name {value!r} (lower-case IANA service name)")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"invalid image reference {value!r}")
        return value


def settings_from_data(data: Any, source: str = "inject settings") -> InjectSettings:
    try:
        return InjectSettings.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise InjectError(validation_line(exc, source)) from None


def load_settings(path: str | Path) -> InjectSettings:
    """Read the YAML/JSON settings file; one clear line on error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InjectError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InjectError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return settings_from_data(data, str(path))


def overridden(settings: InjectSettings, annotations: dict[str, str]) -> InjectSettings:
    """*settings* with the pod's ``backdial.dev/*`` overrides applied (InjectError if bad)."""
    update: dict[str, Any] = {}
    if ANN_IMAGE in annotations:
        update["image"] = annotations[ANN_IMAGE]
    for ann, key in (
        (ANN_ACCEPTOR_RESOURCES, "acceptorResources"),
        (ANN_SIDECAR_RESOURCES, "sidecarResources"),
    ):
        if ann in annotations:
            try:
                update[key] = json.loads(annotations[ann])
            except json.JSONDecodeError as exc:
                raise InjectError(f"annotation {ann}: not JSON: {exc.msg}") from None
    if ANN_PORT_NAME in annotations:
        update["portName"] = annotations[ANN_PORT_NAME]
    if ANN_QUIET_PERIOD in annotations:
        update["drainQuietPeriod"] = annotations[ANN_QUIET_PERIOD]
    if ANN_WORKERS in annotations:
        update["sidecarWorkers"] = annotations[ANN_WORKERS]
    if not update:
        return settings
    data = settings.model_dump(by_alias=True, mode="json")
    data.update(update)
    try:
        return InjectSettings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        ann = {
            "image": ANN_IMAGE,
            "acceptorResources": ANN_ACCEPTOR_RESOURCES,
            "sidecarResources": ANN_SIDECAR_RESOURCES,
            "portName": ANN_PORT_NAME,
            "drainQuietPeriod": ANN_QUIET_PERIOD,
            "sidecarWorkers": ANN_WORKERS,
        }.get(key, key)
        rest = ".".join(str(p) for p in first["loc"][1:])
        raise InjectError(
            f"annotation {ann}{': ' + rest if rest else ''}: {first['msg']}"
        ) from None
