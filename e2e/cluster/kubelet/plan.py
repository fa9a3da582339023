"""Pod spec → what the process node runs, as plain data and pure functions.

A pod's containers become :class:`ContainerPlan` objects (kind, image, mounts, probes...).
Each container's environment and argv are resolved against the pod, the objects it
references (looked up through a callback) and its pod IP, following the Kubernetes rules
(``envFrom`` then ``env``; ``$(VAR)`` references), plus one rule of our own: the hosts
``0.0.0.0``, ``127.0.0.1`` and ``localhost`` in argv and env values become the pod IP, so
each pod behaves as if it had its own loopback interface.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
#: ``lookup(kind, namespace, name)`` → the ConfigMap/Secret object, or None if absent.
Lookup = Callable[[str, str, str], Obj | None]


class ContainerKind(enum.Enum):
    """Where a container sits in the pod's lifecycle."""

    INIT = "init"  # initContainers entry: runs to completion, in order
    SIDECAR = "sidecar"  # initContainers entry with restartPolicy Always: a native sidecar
    APP = "app"  # containers entry


class ConfigError(Exception):
    """A container cannot be configured yet (e.g. a referenced ConfigMap is missing)."""


@dataclass(frozen=True)
class Mount:
    """One volumeMount of a container."""

    volume: str
    path: str
    sub_path: str = ""
    read_only: bool = False


@dataclass(frozen=True)
class ContainerPlan:
    """One container of a pod, as far as the process node is concerned."""

    name: str
    kind: ContainerKind
    image: str
    runnable: bool
    spec: Obj = field(repr=False, compare=False)
    mounts: tuple[Mount, ...] = ()

    @property
    def ports(self) -> dict[str, int]:
        """Named container ports (for probes and hooks that name a port)."""
        return {
            p["name"]: int(p["containerPort"]) for p in self.spec.get("ports") or [] if "name" in p
        }

    def probe(self, kind: str) -> Obj | None:
        """The raw ``startupProbe``/``readinessProbe``/``livenessProbe`` (``kind`` prefix)."""
        raw = self.spec.get(f"{kind}Probe")
        return raw if isinstance(raw, dict) else None

    @property
    def pre_stop(self) -> Obj | None:
        """The raw ``lifecycle.preStop`` handler."""
        raw = (self.spec.get("lifecycle") or {}).get("preStop")
        return raw if isinstance(raw, dict) else None


def image_repository(image: str) -> str:
    """``image`` without its tag and digest (``repo:tag@sha256:...`` → ``repo``)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def is_project_image(image: str, project_images: Sequence[str]) -> bool:
    """Whether ``image`` is one of the project's image repositories (any tag/digest)."""
    return image_repository(image) in {image_repository(p) for p in project_images}


def pod_containers(pod: Obj, project_images: Sequence[str]) -> list[ContainerPlan]:
    """The pod's containers in start order: init containers (sidecars among them), apps."""
    spec = pod.get("spec") or {}
    plans: list[ContainerPlan] = []
    for raw in spec.get("initContainers") or []:
        kind = ContainerKind.SIDECAR if raw.get("restartPolicy") == "Always" else ContainerKind.INIT
        plans.append(_plan(raw, kind, project_images))
    for raw in spec.get("containers") or []:
        plans.append(_plan(raw, ContainerKind.APP, project_images))
    return plans


def _plan(raw: Obj, kind: ContainerKind, project_images: Sequence[str]) -> ContainerPlan:
    image = str(raw.get("image") or "")
    mounts = tuple(
        Mount(
            volume=m["name"],
            path=m["mountPath"],
            sub_path=m.get("subPath") or "",
            read_only=bool(m.get("readOnly")),
        )
        for m in raw.get("volumeMounts") or []
    )
    return ContainerPlan(
        name=raw["name"],
        kind=kind,
        image=image,
        runnable=is_project_image(image, project_images),
        spec=raw,
        mounts=mounts,
    )


# --------------------------------------------------------------------------------------------
# The loopback rewrite and $(VAR) references
# --------------------------------------------------------------------------------------------

_LOOPBACK = re.compile(r"(?<![\w.\-])(?:0\.0\.0\.0|127\.0\.0\.1|localhost)(?![\w\-]|\.\w)")


def rewrite_loopback(text: str, pod_ip: str) -> str:
    """Replace the hosts ``0.0.0.0``, ``127.0.0.1`` and ``localhost`` in ``text`` by
    ``pod_ip`` (whole host names only: ``localhost.example`` or ``10.0.0.1`` stay)."""
    return _LOOPBACK.sub(pod_ip, text)


def expand_refs(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are substituted, undefined
    references stay as written, and ``$$`` is an escaped ``$``."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char != "$" or i + 1 == n:
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Referenced objects and downward API fields
# --------------------------------------------------------------------------------------------


def object_data(obj: Obj) -> dict[str, bytes]:
    """The data of a ConfigMap (``data`` + ``binaryData``) or Secret (``data``), as bytes."""
    result: dict[str, bytes] = {}
    if obj.get("kind") == "Secret":
        for key, value in (obj.get("data") or {}).items():
            result[key] = base64.b64decode(value or "")
        return result
    for key, value in (obj.get("binaryData") or {}).items():
        result[key] = base64.b64decode(value or "")
    for key, value in (obj.get("data") or {}).items():
        result[key] = str(value).encode("utf-8")
    return result


def referenced(lookup: Lookup, kind: str, namespace: str, name: str, optional: bool) -> Obj | None:
    """The referenced object; ``None`` if absent and optional; else :class:`ConfigError`."""
    obj = lookup(kind, namespace, name)
    if obj is None and not optional:
        raise ConfigError(f'{kind.lower()} "{name}" not found')
    return obj


def field_value(pod: Obj, path: str, pod_ip: str, host_ip: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath``."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return str(simple[path])


_CPU_DEFAULT = "8"
_MEMORY_DEFAULT = str(64 * 2**30)


def resource_value(container: Obj, resource: str, divisor: str = "1") -> str:
    """A downward-API ``resourceFieldRef`` (limits/requests of cpu, memory, ...), rounded
    up in units of ``divisor``; an unset limit is the node's capacity."""
    kind, _, name = resource.partition(".")
    quantity = ((container.get("resources") or {}).get(kind) or {}).get(name)
    if quantity is None:
        quantity = _CPU_DEFAULT if name == "cpu" else _MEMORY_DEFAULT
    value = parse_quantity(str(quantity)) / parse_quantity(divisor or "1")
    whole = int(value)
    return str(whole if whole == value else whole + 1)


_SUFFIXES = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(text: str) -> float:
    """A Kubernetes resource quantity (``100m``, ``64Mi``, ``2``) as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text.strip())
    if not match or (match.group(2) and match.group(2) not in _SUFFIXES):
        raise ConfigError(f"invalid quantity {text!r}")
    return float(match.group(1)) * _SUFFIXES.get(match.group(2), 1.0)


# --------------------------------------------------------------------------------------------
# Environment and argv
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodContext:
    """What env and argv resolution needs besides the container spec."""

    pod: Obj
    pod_ip: str
    host_ip: str
    base_env: Mapping[str, str]  # PATH, HOME, HOSTNAME...: the "image" environment
    service_env: Mapping[str, str]  # KUBERNETES_SERVICE_HOST...: set by the kubelet


_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def resolve_env(plan: ContainerPlan, ctx: PodContext, lookup: Lookup) -> dict[str, str]:
    """The container's environment; raises :class:`ConfigError` for a missing reference."""
    namespace = (ctx.pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {**ctx.base_env, **ctx.service_env}
    for source in plan.spec.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = source.get(key)
            if not ref:
                continue
            obj = referenced(lookup, kind, namespace, ref["name"], bool(ref.get("optional")))
            for name, raw in object_data(obj or {"kind": kind}).items():
                if _ENV_NAME.fullmatch(prefix + name):
                    env[prefix + name] = rewrite_loopback(
                        raw.decode("utf-8", "replace"), ctx.pod_ip
                    )
    for item in plan.spec.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            value = expand_refs(str(item.get("value", "")), env)
        else:
            found = _value_from(item["valueFrom"], plan, ctx, lookup, namespace)
            if found is None:
                continue  # optional reference that is absent: the variable is not set
            value = found
        env[name] = rewrite_loopback(value, ctx.pod_ip)
    env.update(ctx.service_env)  # never rewritten, never overridden: they point at the API
    return env


def _value_from(
    source: Obj, plan: ContainerPlan, ctx: PodContext, lookup: Lookup, namespace: str
) -> str | None:
    if "fieldRef" in source:
        return field_value(ctx.pod, source["fieldRef"]["fieldPath"], ctx.pod_ip, ctx.host_ip)
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        return resource_value(plan.spec, ref["resource"], str(ref.get("divisor") or "1"))
    for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
        ref = source.get(key)
        if not ref:
            continue
        optional = bool(ref.get("optional"))
        obj = referenced(lookup, kind, namespace, ref["name"], optional)
        data = object_data(obj) if obj is not None else {}
        if ref["key"] not in data:
            if optional:
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
        return data[ref["key"]].decode("utf-8", "replace")
    raise ConfigError(f"unsupported valueFrom {sorted(source)}")


#: The project image's entrypoint: ``backdial`` (run as ``<python> -m backdial.cli``).
PROJECT_ENTRYPOINT = ("backdial",)
_PYTHON = re.compile(r"python(3(\.\d+)?)?")


def resolve_argv(
    plan: ContainerPlan, env: Mapping[str, str], pod_ip: str, python: str
) -> list[str]:
    """The argv to exec: ``command`` (or the image's entrypoint) + ``args``, with
    ``$(VAR)`` expanded, the loopback rewrite applied, and ``backdial``/``python`` mapped
    to the project's interpreter. Other commands are looked up on the host PATH."""
    command = plan.spec.get("command")
    args = plan.spec.get("args") or []
    words = [*(command if command else PROJECT_ENTRYPOINT), *args]
    return map_command([rewrite_loopback(expand_refs(str(w), env), pod_ip) for w in words], python)


def map_command(words: Sequence[str], python: str) -> list[str]:
    """``backdial ...`` → ``<python> -m backdial.cli ...``; ``python``/``python3`` →
    the project's interpreter; anything else unchanged (found on the host PATH)."""
    if not words:
        raise ConfigError("empty command")
    head = os.path.basename(words[0])
    if head == "backdial":
        return [python, "-m", "backdial.cli", *words[1:]]
    if _PYTHON.fullmatch(head):
        return [python, *words[1:]]
    return list(words)


class IpPool:
    """Pod IPs from a CIDR (first usable: .2), handed out round-robin so a released
    address is reused as late as possible. ``claim`` may refuse an address (another
    cluster on the machine has it: ``addresses.AddressClaims``); it is skipped."""

    def __init__(
        self,
        cidr: str,
        claim: Callable[[str], bool] = lambda _address: True,
        unclaim: Callable[[str], None] = lambda _address: None,
    ) -> None:
        self._network = ipaddress.ip_network(cidr)
        self._offset = 2
        self._by_uid: dict[str, str] = {}
        self._claim, self._unclaim = claim, unclaim

    def allocate(self, uid: str) -> str:
        if uid in self._by_uid:
            return self._by_uid[uid]
        used = set(self._by_uid.values())
        size = self._network.num_addresses
        for _ in range(size):
            offset, self._offset = self._offset, self._offset + 1
            if self._offset >= size - 1:
                self._offset = 2
            address = str(self._network[offset])
            if address not in used and self._claim(address):
                self._by_uid[uid] = address
                return address
        raise ConfigError(
            f"no free pod IP left in {self._network} (other clusters on this machine may hold some)"
        )

    def release(self, uid: str) -> None:
        address = self._by_uid.pop(uid, None)
        if address is not None:
            self._unclaim(address)
