"""Credentials of one control plane: the PKI (CAs, serving and client certificates,
service-account keys) made with the ``openssl`` CLI, and kubeconfigs embedding them."""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from util import HarnessError, ToolchainMissingError

DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_SERVICE_IP = "10.96.0.1"  # first address of DEFAULT_SERVICE_CIDR: the `kubernetes` svc
ADMIN_USER = "backdial-admin"

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
"""
_EC_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1"


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM private key."""

    cert: Path
    key: Path


class PKI:
    """Certificates and keys of one control plane, generated with the ``openssl`` CLI."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = CertPair(directory / "ca.crt", directory / "ca.key")
        self.front_proxy_ca = CertPair(directory / "front-proxy-ca.crt", directory / "fp-ca.key")
        self.apiserver = CertPair(directory / "apiserver.crt", directory / "apiserver.key")
        self.front_proxy_client = CertPair(
            directory / "front-proxy-client.crt", directory / "front-proxy-client.key"
        )
        self.admin = CertPair(directory / "admin.crt", directory / "admin.key")
        self.controller_manager = CertPair(
            directory / "controller-manager.crt", directory / "controller-manager.key"
        )
        self.scheduler = CertPair(directory / "scheduler.crt", directory / "scheduler.key")
        self.kwok = CertPair(directory / "kwok.crt", directory / "kwok.key")
        self.kubelet = CertPair(directory / "kubelet.crt", directory / "kubelet.key")
        self.service_account_key = directory / "sa.key"
        self.service_account_pub = directory / "sa.pub"
        self._config = directory / "openssl.cnf"

    def _openssl(self, command: str) -> None:
        """Run ``openssl`` with ``command`` split on whitespace, inside the PKI directory.

        Every file is named relative to that directory, so no argument contains spaces.
        """
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ToolchainMissingError("the openssl CLI is required (apt-get install openssl)")
        proc = subprocess.run(
            [openssl, *command.split()],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise HarnessError(f"openssl {command} failed: {proc.stderr.strip()}")

    def _new_ca(self, pair: CertPair, common_name: str) -> None:
        self._openssl(
            f"req -x509 -new -nodes -config {self._config.name} {_EC_KEY}"
            f" -keyout {pair.key.name} -out {pair.cert.name} -days 3650"
            f" -subj /CN={common_name} -extensions ca"
        )

    def _new_leaf(
        self,
        pair: CertPair,
        ca: CertPair,
        subject: str,
        usage: str,
        alt_names: Sequence[str] = (),
    ) -> None:
        stem = pair.cert.stem
        csr, ext = f"{stem}.csr", f"{stem}.ext"
        lines = [
            "[leaf]",
            "basicConstraints = critical,CA:FALSE",
            "keyUsage = critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage = {usage}",
            "authorityKeyIdentifier = keyid",
        ]
        if alt_names:
            lines.append("subjectAltName = " + ",".join(alt_names))
        (self.dir / ext).write_text("\n".join(lines) + "\n")
        self._openssl(
            f"req -new -nodes -config {self._config.name} {_EC_KEY}"
            f" -keyout {pair.key.name} -out {csr} -subj {subject}"
        )
        self._openssl(
            f"x509 -req -in {csr} -CA {ca.cert.name} -CAkey {ca.key.name}"
            f" -set_serial 0x{secrets.token_hex(16)} -days 365"
            f" -extfile {ext} -extensions leaf -out {pair.cert.name}"
        )
        (self.dir / csr).unlink()
        (self.dir / ext).unlink()

    def generate(self, service_ip: str = DEFAULT_SERVICE_IP) -> None:
        """Create every certificate and key (CAs, serving, clients, service-account keys)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._config.write_text(_OPENSSL_CONFIG)
        self._new_ca(self.ca, "backdial-test-ca")
        self._new_ca(self.front_proxy_ca, "backdial-test-front-proxy-ca")
        self._new_leaf(
            self.apiserver,
            self.ca,
            "/CN=kube-apiserver",
            "serverAuth",
            [
                "IP:127.0.0.1",
                f"IP:{service_ip}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ],
        )
        self._new_leaf(
            self.front_proxy_client, self.front_proxy_ca, "/CN=front-proxy-client", "clientAuth"
        )
        self._new_leaf(self.admin, self.ca, f"/O=system:masters/CN={ADMIN_USER}", "clientAuth")
        self._new_leaf(
            self.controller_manager, self.ca, "/CN=system:kube-controller-manager", "clientAuth"
        )
        self._new_leaf(self.scheduler, self.ca, "/CN=system:kube-scheduler", "clientAuth")
        # kwok updates node and pod status for many nodes, like a fleet of kubelets; it gets
        # cluster-admin through system:masters rather than per-node identities.
        self._new_leaf(self.kwok, self.ca, "/O=system:masters/CN=backdial-kwok", "clientAuth")
        # The process kubelet reads every ConfigMap/Secret/EndpointSlice and requests tokens
        # for any ServiceAccount; like kwok it is cluster-admin rather than a Node identity.
        self._new_leaf(
            self.kubelet, self.ca, "/O=system:masters/CN=backdial-process-kubelet", "clientAuth"
        )
        sa_key, sa_pub = self.service_account_key.name, self.service_account_pub.name
        self._openssl(f"genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out {sa_key}")
        self._openssl(f"pkey -in {sa_key} -pubout -out {sa_pub}")
        for key in self.dir.glob("*.key"):
            key.chmod(0o600)


def write_kubeconfig(
    path: Path, server: str, ca: Path, client: CertPair, user: str = ADMIN_USER
) -> Path:
    """Write a self-contained kubeconfig (certificates embedded) for ``client``."""

    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode("ascii")

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "backdial",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert),
                    "client-key-data": b64(client.key),
                },
            }
        ],
        "contexts": [{"name": "backdial", "context": {"cluster": "backdial", "user": user}}],
        "current-context": "backdial",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
