"""manifests/ is generated from the chart with default values; a test fails on drift."""

from __future__ import annotations

import os
import subprocess
import sys

import harness
import pytest
import yaml

from tests.helpers import ROOT
from tests.k8s.chart.chartlib import render

pytestmark = pytest.mark.k8s

MANIFESTS = ROOT / "manifests"


def test_backdial_yaml_is_the_chart_rendered_with_defaults(k8s_cluster: harness.Cluster) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "manifests"), "--check"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HELM=str(k8s_cluster.helm_path)),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    objs = [d for d in yaml.safe_load_all((MANIFESTS / "backdial.yaml").read_text()) if d]
    assert objs[0]["kind"] == "Namespace"
    assert objs[1:] == render(k8s_cluster, {"crds": {"enabled": False}}, "backdial-system")


def test_crds_yaml_is_what_the_chart_installs(k8s_cluster: harness.Cluster) -> None:
    """manifests/crds.yaml (`backdial crd`) and the chart's CRDs are the same objects."""
    from_chart = [
        o
        for o in render(k8s_cluster, {"crds": {"keep": False}}, "backdial-system")
        if o["kind"] == "CustomResourceDefinition"
    ]
    manifest = [d for d in yaml.safe_load_all((MANIFESTS / "crds.yaml").read_text()) if d]
    key = lambda o: o["metadata"]["name"]  # noqa: E731
    assert sorted(from_chart, key=key) == sorted(manifest, key=key)
    assert len(manifest) == 2
