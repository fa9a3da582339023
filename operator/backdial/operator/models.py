"""The ``SessionSlice`` custom resource (``backdial.dev/v1alpha1``): spec and status models.

These pydantic models are the one schema of the resource: ``crd.py`` generates the
CustomResourceDefinition from them and the operator validates every object with them.
Slices, client matches, queues and limits *are* the data plane's models from
``backdial.policy`` (the acceptor's config file), so the CRD and the acceptor's config
cannot drift apart; the only narrowing is that a slice's ``match`` is one rule object
(structural schemas cannot say "object or list"), and ``limits.maxSessions`` comes from
``capacity`` instead of being set by hand.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backdial.policy import Limits, Match, Slice

GROUP = "backdial.dev"
VERSION = "v1alpha1"
KIND = "SessionSlice"
PLURAL = "sessionslices"
SINGULAR = "sessionslice"
SHORT_NAMES = ["ss"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"
INJECTED_LABEL = "backdial.dev/injected"  # set by the webhook on pods it injected
MAX_SLICES = 16


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _cel(*pairs: str) -> dict[str, Any]:
    """``x-kubernetes-validations`` for the CRD: (rule, message) pairs, checked by the
    API server for what pydantic constraints cannot express."""
    rules = [{"rule": r, "message": m} for r, m in zip(pairs[::2], pairs[1::2], strict=True)]
    return {"x-kubernetes-validations": rules}


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(_Model):
    """One matchExpressions entry, as in every Kubernetes label selector."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0"
            " : !has(self.values) || size(self.values) == 0",
            "In and NotIn need values; Exists and DoesNotExist take none",
        )
    )

    key: str = Field(min_length=1, max_length=317)
    operator: SelectorOperator
    values: list[str] = Field(default_factory=list, max_length=64)


class LabelSelector(_Model):
    """Pods of the SessionSlice's namespace that this resource configures."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, alias="matchExpressions", max_length=32
    )


class Capacity(_Model):
    """How many sessions each selected pod's acceptor admits."""

    sessions_per_pod: int = Field(
        ge=1,
        le=65536,
        alias="sessionsPerPod",
        description="Admission cap per pod: registrations beyond it get ERR limit.",
    )
    total_sessions: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        alias="totalSessions",
        description="Optional fleet budget, split over ready pods by largest remainder "
        "(never more than sessionsPerPod per pod).",
    )


class SliceSpec(Slice):
    """A client class with its share of every pod's sessions (the acceptor's Slice)."""

    match: Match | None = None  # one rule object (structural schemas have no unions)


class ScalingMetric(StrEnum):
    REQUESTS_WAITING = "requestsWaiting"
    SESSION_UTILIZATION = "sessionUtilization"


class ScaleTargetRef(_Model):
    api_version: str = Field(default="apps/v1", alias="apiVersion")
    kind: str = Field(default="Deployment")
    name: str = Field(min_length=1, max_length=253)


class ScalingTarget(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            "self.metric != 'sessionUtilization' || self.averageValue <= 100.0",
            "a sessionUtilization target is a percentage (at most 100)",
        )
    )

    metric: ScalingMetric
    average_value: float = Field(
        gt=0,
        alias="averageValue",
        description="Per pod: waiting requests, or percent of sessions leased.",
    )


class Autoscaling(_Model):
    """An HPA the operator owns, scaling the target on the pods' queue figures."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            "self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"
        )
    )

    scale_target_ref: ScaleTargetRef = Field(alias="scaleTargetRef")
    min_replicas: int = Field(default=1, ge=1, alias="minReplicas")
    max_replicas: int = Field(ge=1, alias="maxReplicas")
    target: ScalingTarget
    behavior: dict[str, Any] | None = Field(
        default=None, description="Passed to the HPA's spec.behavior unchanged."
    )


def _default_slices() -> list[SliceSpec]:
    return [SliceSpec(name="default", share=100)]


class SessionSliceSpec(_Model):
    selector: LabelSelector
    capacity: Capacity
    slices: list[SliceSpec] = Field(
        default_factory=_default_slices,
        min_length=1,
        max_length=MAX_SLICES,
        json_schema_extra={
            "x-kubernetes-list-type": "map",  # slice names are unique (the map key)
            "x-kubernetes-list-map-keys": ["name"],
            **_cel(
                "self.map(s, s.share).sum() <= 100",
                "slice shares must add up to at most 100",
                "self.filter(s, !has(s.match)).size() <= 1",
                "at most one slice may have no match (the default slice)",
            ),
        },
        description="Client classes; shares add up to at most 100 and the rest goes to "
        "the slice without match (one named 'default' is added if none has no match).",
    )
    limits: Limits | None = Field(
        default=None,
        description="Acceptor limits; maxSessions is not set here: capacity decides it.",
    )
    autoscaling: Autoscaling | None = None


class ConditionType(StrEnum):
    READY = "Ready"
    CONFIG_APPLIED = "ConfigApplied"
    DEGRADED = "Degraded"
    SCALING_ACTIVE = "ScalingActive"  # the HPA of spec.autoscaling, as its controller says


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    type: ConditionType
    status: ConditionStatus
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: str = Field(
        alias="lastTransitionTime", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int = Field(default=0, ge=0, alias="observedGeneration")


class SessionSliceStatus(_Model):
    observed_generation: int = Field(
        default=0, alias="observedGeneration", description="The generation this status is for."
    )
    selected_pods: int = Field(
        default=0,
        alias="selectedPods",
        description="Pods this SessionSlice configures (selected, not terminating, not "
        "owned by an older SessionSlice).",
    )
    ready_pods: int = Field(default=0, alias="readyPods", description="Selected pods Ready.")
    configured_pods: int = Field(
        default=0,
        alias="configuredPods",
        description="Ready pods whose acceptor acknowledged the current config.",
    )
    per_pod_sessions: int = Field(
        default=0, alias="perPodSessions", description="Largest per-pod cap in force."
    )
    registered_sessions: int = Field(
        default=0,
        alias="registeredSessions",
        description="Sessions registered, summed over the pods' latest reports.",
    )
    leased_sessions: int = Field(
        default=0, alias="leasedSessions", description="Sessions leased to sidecar workers."
    )
    requests_waiting: int = Field(
        default=0,
        alias="requestsWaiting",
        description="Requests waiting for a session (in sidecar workers and the acceptor).",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class SessionSlice(_Model):
    """A whole object as the API server returns it (metadata kept as plain data)."""

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: SessionSliceSpec
    status: SessionSliceStatus | None = None
