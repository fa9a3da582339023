"""The generated CRDs: structural, in sync with the models, and their committed copies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from backdial.operator import crd, models

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = (
    "regenerate with: backdial crd > manifests/crds.yaml && "
    "backdial crd --chart-dir charts/backdial/templates/crds"
)


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += _walk(value, f"{path}.{key}")
        if "items" in node:
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    schema = crd.sessionslice_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = _walk(schema)
    assert len(nodes) > 60
    for path, node in nodes:
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & node.keys(), path
        assert "type" in node, path  # every node has a type
        if node.get("additionalProperties") is not None:
            assert isinstance(node["additionalProperties"], dict), path
            assert "properties" not in node, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"] and rule["message"], path
    spec = schema["properties"]["spec"]["properties"]
    # The operator sets maxSessions from capacity: a field users cannot write.
    owned = spec["limits"]["properties"]["maxSessions"]
    assert "default" not in owned and owned["x-kubernetes-validations"][0]["rule"] == "false"
    slices = spec["slices"]
    assert slices["x-kubernetes-list-map-keys"] == ["name"]  # unique names
    queue = slices["items"]["properties"]["queue"]["properties"]
    assert queue["timeout"]["type"] == "string" and queue["timeout"]["default"] == "1s"


def test_names_and_printer_columns() -> None:
    obj = crd.sessionslice_crd()
    names = obj["spec"]["names"]
    assert obj["metadata"]["name"] == "sessionslices.backdial.dev" == models.CRD_NAME
    assert (names["kind"], names["shortNames"]) == ("SessionSlice", ["ss"])
    version = obj["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Pods", "Sessions", "Waiting", "Ready", "Age"]


def test_duration_spelling() -> None:
    assert [crd.format_duration(s) for s in (1.0, 0.5, 120.0, 2.5, 5.0)] == [
        "1s",
        "500ms",
        "2m",
        "2.5s",
        "5s",
    ]


def test_committed_copies_match_the_models() -> None:
    manifest = (ROOT / "manifests" / "crds.yaml").read_text()
    assert manifest == crd.render(crd.all_crds()), REGENERATE
    chart_dir = ROOT / "charts" / "backdial" / "templates" / "crds"
    files = crd.chart_files()
    assert sorted(p.name for p in chart_dir.iterdir()) == sorted(files), REGENERATE
    for name, text in files.items():
        assert (chart_dir / name).read_text() == text, REGENERATE


def test_chart_template_switches() -> None:
    text = crd.chart_files()["sessionslices.backdial.dev.yaml"]
    assert text.startswith("{{- if .Values.crds.enabled }}\n")
    assert text.rstrip().endswith("{{- end }}")
    # Rendered with keep on (what helm does with the switches), it is the same CRD.
    rendered = "\n".join(
        line
        for line in text.splitlines()
        if not line.lstrip().startswith("{{-") and not line.startswith("#")
    )
    obj = yaml.safe_load(rendered)
    assert obj["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    obj["metadata"].pop("annotations")
    assert obj == crd.sessionslice_crd()


def test_cli_prints_both_crds() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backdial.cli", "crd"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["metadata"]["name"] for d in docs] == [
        "sessionslices.backdial.dev",
        "clusterkopfpeerings.kopf.dev",
    ]


def test_docs_field_table_is_current() -> None:
    doc = (ROOT / "docs" / "operator.md").read_text()
    begin, end = "<!-- BEGIN GENERATED: crd-fields -->\n", "<!-- END GENERATED: crd-fields -->"
    table = doc[doc.index(begin) + len(begin) : doc.index(end)]
    assert table == crd.field_table(), "refresh it: backdial crd --field-table"


def test_rbac_rule_files_match_rbac_py() -> None:
    from backdial.operator import rbac

    files = ROOT / "charts" / "backdial" / "files"
    for name, text in rbac.chart_files().items():
        assert (files / name).read_text() == text, "backdial crd --rbac-dir charts/backdial/files"
    assert yaml.safe_load(rbac.chart_files()["operator-clusterrole-rules.yaml"]) == (
        rbac.CLUSTER_RULES
    )
