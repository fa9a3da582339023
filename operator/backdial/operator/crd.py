"""The CustomResourceDefinitions, generated from the pydantic models; ``backdial crd``.

pydantic's JSON schema is turned into a Kubernetes *structural* schema: references
inlined, ``Optional`` unwrapped, ``extra="forbid"`` left to the API server's pruning and
strict field validation, durations as strings checked by CEL, and the ``x-kubernetes-*``
extensions the models declare (list-map keys, CEL rules) kept.  Everything the API server
can check is checked there, so ``kubectl apply`` of a bad object fails with a 422 naming
the field; what only Python can check (regexes, CIDRs) becomes a permanent status
condition instead (``reconcile.py``).

The kopf peering CRD (``clusterkopfpeerings.kopf.dev``) is printed too: the operator's
replicas use it to agree which one acts (docs/operator.md, "High availability").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from backdial.operator import models
from backdial.policy import parse_duration
from backdial.runtime import ArgParser, ConfigError, fail

DURATION_RE = r"^[0-9]+(\.[0-9]+)?(ms|s|m)$"
_DURATION_MARK = "x-backdial-duration"
# Fields the operator sets itself: present in the schema (so they are not silently pruned
# when a client skips strict field validation) but refused with a message that says why.
OPERATOR_OWNED = {"Limits": {"maxSessions": "set by the operator: use capacity.sessionsPerPod"}}
_DROP = ("title", "additionalProperties", "$defs")


class _Generator(GenerateJsonSchema):
    """pydantic's generator, except that policy durations become marked strings."""

    def function_before_schema(
        self, schema: core_schema.BeforeValidatorFunctionSchema
    ) -> JsonSchemaValue:
        func = schema.get("function", {})
        if func.get("function") is parse_duration:
            return {"type": "string", _DURATION_MARK: True}
        return super().function_before_schema(schema)


def format_duration(seconds: float) -> str:
    """1.0 -> '1s', 0.5 -> '500ms', 120 -> '2m' (the CRD's duration spelling)."""
    if seconds and seconds * 1000 == int(seconds * 1000) and seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of *model* (validation mode, field aliases)."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_Generator)
    defs = raw.get("$defs", {})
    return _convert(raw, defs, model.__name__)


def _convert(node: dict[str, Any], defs: dict[str, Any], name: str = "") -> dict[str, Any]:
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref").rsplit("/", 1)[-1]
        return _convert({**defs[ref], **node}, defs, ref)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"{name}: a union is not structural: {branches}")
        if node.get("default") is None:
            node.pop("default", None)
        return _convert({**branches[0], **node}, defs, name)
    out: dict[str, Any] = {k: v for k, v in node.items() if k not in _DROP}
    if out.pop(_DURATION_MARK, False):
        out["maxLength"] = 16
        out["x-kubernetes-validations"] = [
            {
                "rule": f"self.matches('{DURATION_RE}')".replace("\\", "\\\\"),
                "message": "must be a duration such as 500ms, 2s or 1m",
            }
        ]
        if isinstance(out.get("default"), int | float):
            out["default"] = format_duration(float(out["default"]))
    for bound in ("Minimum", "Maximum"):  # JSON Schema 2020 -> OpenAPI 3.0 spelling
        if isinstance(out.get(f"exclusive{bound}"), int | float):
            out[bound.lower()] = out.pop(f"exclusive{bound}")
            out[f"exclusive{bound}"] = True
    kind = out.get("type")
    if kind == "object" and "properties" in node:
        owned = OPERATOR_OWNED.get(name, {})
        out["properties"] = {
            key: _convert(value, defs, f"{name}.{key}") for key, value in node["properties"].items()
        }
        for key, why in owned.items():
            prop = out["properties"][key]
            prop.pop("default", None)
            prop["x-kubernetes-validations"] = [{"rule": "false", "message": why}]
    elif kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra, defs, name)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _convert(node["items"], defs, name)
    return out


def sessionslice_crd() -> dict[str, Any]:
    """The ``sessionslices.backdial.dev`` CustomResourceDefinition."""
    spec = structural(models.SessionSliceSpec)
    spec["description"] = "Desired capacity and client slicing of the selected pods."
    status = structural(models.SessionSliceStatus)
    status["description"] = "What the selected pods report (written by the operator)."
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": models.CRD_NAME,
            "labels": {"app.kubernetes.io/name": "backdial"},
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "shortNames": list(models.SHORT_NAMES),
                "categories": ["backdial"],
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        _column("Pods", "integer", ".status.selectedPods", "Selected pods"),
                        _column(
                            "Sessions",
                            "integer",
                            ".status.registeredSessions",
                            "Sessions registered",
                        ),
                        _column("Waiting", "integer", ".status.requestsWaiting", "Waiting now"),
                        _column("Ready", "string", ready, "Every ready pod configured"),
                        _column("Age", "date", ".metadata.creationTimestamp", ""),
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Per-pod session capacity and client slicing "
                            "for the pods it selects (backdial).",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def _column(name: str, kind: str, path: str, description: str) -> dict[str, Any]:
    column = {"name": name, "type": kind, "jsonPath": path}
    if description:
        column["description"] = description
    return column


def peering_crd() -> dict[str, Any]:
    """kopf's ``ClusterKopfPeering``: replicas record their liveness in its status."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "clusterkopfpeerings.kopf.dev",
            "labels": {"app.kubernetes.io/name": "backdial"},
        },
        "spec": {
            "group": "kopf.dev",
            "scope": "Cluster",
            "names": {
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
                "kind": "ClusterKopfPeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [sessionslice_crd(), peering_crd()]


def render(crds: list[dict[str, Any]]) -> str:
    """Multi-document YAML with a generated-file header."""
    head = "# Generated by `backdial crd` from backdial.operator.models; do not edit.\n"
    docs = [yaml.safe_dump(crd, sort_keys=False, width=100) for crd in crds]
    return head + "---\n" + "---\n".join(docs)


def render_chart(crd: dict[str, Any]) -> str:
    """One CRD wrapped in the chart's ``crds.enabled`` / ``crds.keep`` switches."""
    body = yaml.safe_dump(crd, sort_keys=False, width=100)
    keep = (
        "  {{- if .Values.crds.keep }}\n"
        "  annotations:\n"
        "    helm.sh/resource-policy: keep\n"
        "  {{- end }}\n"
    )
    # The annotations go right under `metadata:` (its first key follows it).
    body = body.replace("metadata:\n", "metadata:\n" + keep, 1)
    return (
        "{{- if .Values.crds.enabled }}\n"
        "# Generated by `backdial crd --chart-dir` from backdial.operator.models; do not edit.\n"
        + body
        + "{{- end }}\n"
    )


def chart_files() -> dict[str, str]:
    """File name -> text of the CRD templates in ``charts/backdial/templates/crds/``."""
    return {f"{crd['metadata']['name']}.yaml": render_chart(crd) for crd in all_crds()}


def parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="backdial crd",
        description="Print the CustomResourceDefinitions (SessionSlice, and kopf's "
        "ClusterKopfPeering used by the operator's replicas), generated from the models.",
    )
    p.add_argument(
        "--chart-dir",
        help="instead of printing, write the Helm templates into DIR "
        "(charts/backdial/templates/crds)",
    )
    p.add_argument(
        "--rbac-dir",
        help="instead of printing, write the operator's RBAC rule lists into DIR "
        "(charts/backdial/files)",
    )
    p.add_argument(
        "--field-table",
        action="store_true",
        help="print the Markdown field reference (docs/operator.md) instead",
    )
    p.add_argument(
        "--only-sessionslice",
        action="store_true",
        help="print only sessionslices.backdial.dev",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        ns = parser().parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return fail(str(exc))
    if ns.chart_dir or ns.rbac_dir:
        if ns.rbac_dir:
            from backdial.operator import rbac  # imports the operator's runtime modules

            target, files = Path(ns.rbac_dir), rbac.chart_files()
        else:
            target, files = Path(ns.chart_dir), chart_files()
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (target / name).write_text(text)
        except OSError as exc:
            return fail(f"cannot write {target}: {exc.strerror}")
        return 0
    if ns.field_table:
        sys.stdout.write(field_table())
        return 0
    crds = [sessionslice_crd()] if ns.only_sessionslice else all_crds()
    sys.stdout.write(render(crds))
    return 0


def field_table() -> str:
    """Markdown reference of every spec and status field (docs/operator.md embeds it)."""
    schema = sessionslice_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rows = ["| field | type | default | rules |", "|---|---|---|---|"]

    def walk(node: dict[str, Any], path: str, required: bool) -> None:
        kind = node.get("type", "")
        if kind == "array":
            kind = f"[]{node['items'].get('type', '')}"
        elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
            kind = f"map[string]{node['additionalProperties'].get('type', '')}"
        rules = []
        if required:
            rules.append("required")
        for key, label in (
            ("minimum", "≥"),
            ("maximum", "≤"),
            ("minItems", "min items"),
            ("maxItems", "max items"),
            ("maxLength", "max length"),
        ):
            if key in node:
                strict = key == "minimum" and node.get("exclusiveMinimum")
                rules.append(f"{'>' if strict else label} {node[key]}")
        if "enum" in node:
            rules.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
        if "pattern" in node:
            rules.append(f"pattern `{node['pattern']}`")
        if node.get("x-kubernetes-list-type") == "map":
            rules.append("unique " + ", ".join(node["x-kubernetes-list-map-keys"]))
        rules += [r["message"] for r in node.get("x-kubernetes-validations", [])]
        if node.get("description"):
            rules.append(node["description"])
        default = node.get("default")
        shown = "" if default is None else f"`{json.dumps(default)}`"
        text = "; ".join(rules).replace("|", "\\|")
        rows.append(f"| `{path}` | {kind} | {shown} | {text} |")
        children = node.get("properties") or node.get("items", {}).get("properties") or {}
        needed = set(node.get("required") or node.get("items", {}).get("required") or [])
        prefix = f"{path}[]" if kind.startswith("[]") else path
        for key, child in children.items():
            walk(child, f"{prefix}.{key}", key in needed)

    for top in ("spec", "status"):
        walk(schema["properties"][top], top, top == "spec")
    return "\n".join(rows) + "\n"
