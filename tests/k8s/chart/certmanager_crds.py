"""Minimal stand-ins for cert-manager's CRDs, so the API server can dry-run the chart's
``Issuer`` and ``Certificate`` objects.

cert-manager itself cannot be installed here (its images come from a registry), so this is
the one stand-in of these tests: structural schemas that list exactly the fields the chart
uses, with their types and enums, and nothing else. Applied with ``--validate=strict``, an
unknown or misspelt field, a wrong type or a missing required field is refused, as it would
be by the real CRDs (which accept a superset of these fields).
"""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string"}
_ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "kind": _STR, "group": _STR},
}
_ISSUER_SPEC = {
    "type": "object",
    "properties": {
        "selfSigned": {"type": "object", "properties": {}},
        "ca": {"type": "object", "required": ["secretName"], "properties": {"secretName": _STR}},
    },
}
_CERTIFICATE_SPEC = {
    "type": "object",
    "required": ["secretName", "issuerRef"],
    "properties": {
        "secretName": _STR,
        "issuerRef": _ISSUER_REF,
        "commonName": _STR,
        "dnsNames": {"type": "array", "items": _STR},
        "isCA": {"type": "boolean"},
        "duration": _STR,
        "renewBefore": _STR,
        "usages": {
            "type": "array",
            "items": {
                "type": "string",
                "enum": [
                    "server auth",
                    "client auth",
                    "digital signature",
                    "key encipherment",
                    "cert sign",
                ],
            },
        },
        "privateKey": {
            "type": "object",
            "properties": {
                "algorithm": {"type": "string", "enum": ["RSA", "ECDSA", "Ed25519"]},
                "size": {"type": "integer"},
                "rotationPolicy": {"type": "string", "enum": ["Never", "Always"]},
            },
        },
    },
}


def _crd(kind: str, plural: str, scope: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cert-manager.io"},
        "spec": {
            "group": "cert-manager.io",
            "scope": scope,
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
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
                                "spec": spec,
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


CRDS = [
    _crd("Issuer", "issuers", "Namespaced", _ISSUER_SPEC),
    _crd("ClusterIssuer", "clusterissuers", "Cluster", _ISSUER_SPEC),
    _crd("Certificate", "certificates", "Namespaced", _CERTIFICATE_SPEC),
]
