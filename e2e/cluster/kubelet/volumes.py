"""Pod volumes: which kind each is, the files of the file-backed ones, and writing them.

``emptyDir`` is a per-pod directory and ``hostPath`` a host directory, both bind-mounted
as they are. ``configMap``, ``secret``, ``downwardAPI`` and ``projected`` volumes are
rendered into files by :func:`volume_files` (pure) and written by :func:`write_atomic` the
way the kubelet does: into a fresh timestamped directory, published by swapping the
``..data`` symlink, so readers never see half an update. Service-account tokens of
projected volumes come from the caller (``tokens.py`` asks the TokenRequest API).
"""

from __future__ import annotations

import enum
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .plan import (
    ConfigError,
    Lookup,
    Obj,
    field_value,
    object_data,
    referenced,
    resource_value,
)

#: relative path → (content, file mode)
Files = dict[str, tuple[bytes, int]]


class VolumeType(enum.Enum):
    EMPTY_DIR = "emptyDir"
    HOST_PATH = "hostPath"
    CONFIG_MAP = "configMap"
    SECRET = "secret"
    DOWNWARD_API = "downwardAPI"
    PROJECTED = "projected"


def volume_type(volume: Obj) -> VolumeType:
    """The kind of ``volume``; :class:`ConfigError` for kinds the process node lacks."""
    for kind in VolumeType:
        if kind.value in volume:
            return kind
    other = sorted(k for k in volume if k != "name")
    raise ConfigError(
        f"volume {volume.get('name')!r}: {other} volumes are not supported on the process node"
    )


@dataclass(frozen=True)
class TokenSource:
    """A ``serviceAccountToken`` projection (audience "" = the API server's own)."""

    audience: str
    expiration: int
    path: str


def token_sources(volume: Obj) -> list[TokenSource]:
    """The service-account token projections of a projected volume."""
    sources = (volume.get("projected") or {}).get("sources") or []
    return [
        TokenSource(
            audience=t.get("audience") or "",
            expiration=int(t.get("expirationSeconds") or 3600),
            path=t["path"],
        )
        for s in sources
        if (t := s.get("serviceAccountToken"))
    ]


@dataclass(frozen=True)
class VolumeContext:
    """What rendering needs besides the volume."""

    pod: Obj
    pod_ip: str
    host_ip: str
    lookup: Lookup
    tokens: Mapping[TokenSource, str]


def _keyed(source: Obj, kind: str, ctx: VolumeContext, default_mode: int, name_key: str) -> Files:
    namespace = (ctx.pod.get("metadata") or {}).get("namespace", "default")
    optional = bool(source.get("optional"))
    obj = referenced(ctx.lookup, kind, namespace, source[name_key], optional)
    data = object_data(obj) if obj is not None else {}
    items = source.get("items")
    if not items:
        return {key: (value, default_mode) for key, value in data.items()}
    files: Files = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise ConfigError(f"{kind} {source[name_key]!r} has no key {item['key']!r}")
        files[item["path"]] = (data[item["key"]], int(item.get("mode") or default_mode))
    return files


def _downward(items: list[Obj], ctx: VolumeContext, default_mode: int) -> Files:
    files: Files = {}
    containers = {c["name"]: c for c in (ctx.pod.get("spec") or {}).get("containers") or []}
    for item in items:
        if "fieldRef" in item:
            path = item["fieldRef"]["fieldPath"]
            value = field_value(ctx.pod, path, ctx.pod_ip, ctx.host_ip)
        else:
            ref = item["resourceFieldRef"]
            container = containers.get(ref.get("containerName", ""), {})
            value = resource_value(container, ref["resource"], str(ref.get("divisor") or "1"))
        files[item["path"]] = (value.encode("utf-8"), int(item.get("mode") or default_mode))
    return files


def volume_files(volume: Obj, ctx: VolumeContext) -> Files | None:
    """The files of a file-backed volume, ``None`` for directory volumes."""
    kind = volume_type(volume)
    body: Obj = volume.get(kind.value) or {}
    mode = int(body.get("defaultMode") or 0o644)
    if kind is VolumeType.CONFIG_MAP:
        return _keyed(body, "ConfigMap", ctx, mode, "name")
    if kind is VolumeType.SECRET:
        return _keyed(body, "Secret", ctx, mode, "secretName")
    if kind is VolumeType.DOWNWARD_API:
        return _downward(body.get("items") or [], ctx, mode)
    if kind is not VolumeType.PROJECTED:
        return None
    files: Files = {}
    tokens = iter(token_sources(volume))
    for source in body.get("sources") or []:
        if "configMap" in source:
            files.update(_keyed(source["configMap"], "ConfigMap", ctx, mode, "name"))
        elif "secret" in source:
            files.update(_keyed(source["secret"], "Secret", ctx, mode, "name"))
        elif "downwardAPI" in source:
            files.update(_downward(source["downwardAPI"].get("items") or [], ctx, mode))
        elif "serviceAccountToken" in source:
            token_source = next(tokens)
            files[token_source.path] = (ctx.tokens[token_source].encode("ascii"), mode)
        else:
            raise ConfigError(f"projected source {sorted(source)} is not supported")
    return files


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

DATA_LINK = "..data"


def read_current(target: Path) -> Files | None:
    """The files currently published in ``target`` (None if nothing is)."""
    data = target / DATA_LINK
    if not data.is_dir():
        return None
    files: Files = {}
    for root, _dirs, names in os.walk(data, followlinks=True):
        for name in names:
            path = Path(root) / name
            files[str(path.relative_to(data))] = (path.read_bytes(), path.stat().st_mode & 0o777)
    return files


def write_atomic(target: Path, files: Files) -> bool:
    """Publish ``files`` in ``target``; False if they were already there."""
    target.mkdir(parents=True, exist_ok=True)
    if read_current(target) == files:
        return False
    fresh = Path(tempfile.mkdtemp(prefix="..", dir=target))
    fresh.chmod(0o755)
    for rel, (content, mode) in files.items():
        path = fresh / rel
        if path.resolve().parent != fresh and fresh not in path.resolve().parents:
            raise ConfigError(f"volume path {rel!r} escapes the volume")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    old = (target / DATA_LINK).resolve() if (target / DATA_LINK).is_symlink() else None
    tmp_link = target / "..data_tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(fresh.name)
    tmp_link.replace(target / DATA_LINK)
    tops = {rel.split("/", 1)[0] for rel in files}
    for entry in target.iterdir():
        if entry.name.startswith(".."):
            continue
        if entry.name not in tops and entry.is_symlink():
            entry.unlink()
    for top in tops:
        link = target / top
        if not link.is_symlink():
            link.symlink_to(f"{DATA_LINK}/{top}")
    if old is not None and old != fresh:
        shutil.rmtree(old, ignore_errors=True)
    return True
