"""TLS for the operator's listeners: a self-managed CA and serving certificate, or files.

Self-managed (the default): the CA and a serving certificate live in the Secret
``backdial-operator-tls`` of the operator's namespace (``tls.crt``, ``tls.key``, ``ca.crt``
and ``ca.key``).  The serving certificate names every Service that reaches the operator
(``backdial-operator`` for config streams, ``backdial-webhook``, ``backdial-metrics-api``)
plus any ``--tls-san``; it is renewed, signed by the same CA, when less than a third of
its lifetime is left or when a name is missing.  Replicas share the Secret: whoever finds
it missing or due creates or replaces it (optimistic concurrency on the resourceVersion;
the loser re-reads), and every replica re-reads it periodically, so they all serve the
current certificate.  The CA lives ten years; acceptors, the webhook configuration and
the APIService trust it (``ca.crt``).

cert-manager (``--tls-dir``): ``tls.crt``, ``tls.key`` and ``ca.crt`` are read from the
directory and re-read when they change; the operator never writes them.

Listeners keep one ``ssl.SSLContext`` each; a new certificate is loaded into the same
context, so new handshakes use it and open connections are not disturbed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backdial.operator.kube import Kube, KubeError

log = logging.getLogger("backdial.operator.certs")

SECRET_NAME = "backdial-operator-tls"
SERVICES = ("backdial-operator", "backdial-webhook", "backdial-metrics-api")
CA_DAYS = 3650
SERVING_DAYS = 365
UTC = datetime.UTC


@dataclass(frozen=True, slots=True)
class Material:
    """PEM texts; ``ca_key`` is empty when the CA is not ours (cert-manager)."""

    ca: bytes
    cert: bytes
    key: bytes
    ca_key: bytes = b""


def service_names(namespace: str, extra: Sequence[str] = ()) -> list[str]:
    """Every name the serving certificate must carry."""
    names: list[str] = []
    for svc in SERVICES:
        names += [
            svc,
            f"{svc}.{namespace}",
            f"{svc}.{namespace}.svc",
            f"{svc}.{namespace}.svc.cluster.local",
        ]
    return names + [n for n in extra if n not in names]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(now: datetime.datetime, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backdial-operator-ca")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_serving(
    ca_pem: bytes,
    ca_key_pem: bytes,
    names: Sequence[str],
    now: datetime.datetime,
    days: int = SERVING_DAYS,
) -> tuple[bytes, bytes]:
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _due(cert: x509.Certificate, now: datetime.datetime) -> bool:
    """Past two thirds of its lifetime (or not yet valid)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now < start or now >= start + (end - start) * 2 / 3


def cert_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def renew(
    current: Material | None, names: Sequence[str], now: datetime.datetime
) -> Material | None:
    """The material to store, or None when *current* is still good for *names*.

    The CA is kept while valid (acceptors and webhook configurations trust it); only the
    serving certificate is replaced when it is due or misses a name.
    """
    ca_pem, ca_key = (current.ca, current.ca_key) if current and current.ca_key else (b"", b"")
    if ca_pem:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        if now >= ca_cert.not_valid_after_utc - datetime.timedelta(days=SERVING_DAYS):
            ca_pem = b""  # too close to its end to sign a full-length serving certificate
    if not ca_pem:
        ca_pem, ca_key = make_ca(now)
    elif current is not None:
        cert = x509.load_pem_x509_certificate(current.cert)
        signed_by_ca = cert.issuer == x509.load_pem_x509_certificate(ca_pem).subject
        if signed_by_ca and not _due(cert, now) and set(names) <= cert_names(cert):
            return None
    cert_pem, key_pem = make_serving(ca_pem, ca_key, names, now)
    return Material(ca_pem, cert_pem, key_pem, ca_key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret_body(
    namespace: str, material: Material, owner: Mapping[str, str] | None = None
) -> dict[str, object]:
    """The Secret; with *owner* (the operator's ServiceAccount) it goes when that goes, so
    ``helm uninstall`` or ``kubectl delete -f manifests/`` leaves no CA key behind."""
    meta: dict[str, object] = {
        "name": SECRET_NAME,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "backdial", "app.kubernetes.io/component": "tls"},
    }
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": meta,
        "data": {
            "ca.crt": _b64(material.ca),
            "tls.crt": _b64(material.cert),
            "tls.key": _b64(material.key),
            "ca.key": _b64(material.ca_key),
        },
    }


def material_from_secret(secret: dict[str, object]) -> Material | None:
    data = secret.get("data")
    if not isinstance(data, dict):
        return None
    try:
        return Material(
            *(base64.b64decode(data[k]) for k in ("ca.crt", "tls.crt", "tls.key", "ca.key"))
        )
    except (KeyError, ValueError, TypeError):
        return None


class ServerTLS:
    """One SSL context per listener, reloaded in place when the material changes."""

    def __init__(self) -> None:
        self.material: Material | None = None
        self.contexts: list[ssl.SSLContext] = []
        self._dir = Path(tempfile.mkdtemp(prefix="backdial-tls-"))
        os.chmod(self._dir, 0o700)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.material is not None:
            self._load(ctx, self.material)
        self.contexts.append(ctx)
        return ctx

    def update(self, material: Material) -> bool:
        if material == self.material:
            return False
        for ctx in self.contexts:
            self._load(ctx, material)
        self.material = material
        return True

    def _load(self, ctx: ssl.SSLContext, material: Material) -> None:
        cert, key = self._dir / "tls.crt", self._dir / "tls.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(material.key)
        cert.write_bytes(material.cert)
        ctx.load_cert_chain(cert, key)


class SecretSource:
    """Keeps the self-managed Secret current and tells the listeners."""

    def __init__(self, kube: Kube, namespace: str, names: Sequence[str], tls: ServerTLS) -> None:
        self.kube, self.namespace, self.names, self.tls = kube, namespace, list(names), tls
        self.owner = kube.service_account_owner()
        self.path = f"/api/v1/namespaces/{namespace}/secrets/{SECRET_NAME}"

    async def sync(self) -> Material:
        """Read the Secret; create or renew it when missing or due; load it."""
        for _ in range(5):
            try:
                got = await self.kube.request("GET", self.path, ok=(200, 404))
            except KubeError as exc:
                raise KubeError(exc.status, f"cannot read Secret {SECRET_NAME}: {exc}") from exc
            secret = got.body if got.status == 200 and isinstance(got.body, dict) else None
            current = material_from_secret(secret) if secret else None
            fresh = renew(current, self.names, datetime.datetime.now(UTC))
            if fresh is None:
                assert current is not None
                self.tls.update(current)
                return current
            body = secret_body(self.namespace, fresh, self.owner)
            if secret is None:
                resp = await self.kube.request(
                    "POST", f"/api/v1/namespaces/{self.namespace}/secrets", body, ok=(201, 409)
                )
            else:
                meta = secret.get("metadata")
                version = meta.get("resourceVersion") if isinstance(meta, dict) else None
                body["metadata"]["resourceVersion"] = version  # type: ignore[index]
                resp = await self.kube.request("PUT", self.path, body, ok=(200, 409))
            if resp.status == 409:
                continue  # another replica won the race: use what it stored
            log.info(
                "TLS material %s in Secret %s",
                "created" if secret is None else "renewed",
                SECRET_NAME,
            )
            self.tls.update(fresh)
            return fresh
        raise KubeError(409, f"Secret {SECRET_NAME} kept changing; giving up for now")

    async def run(self, interval: float = 300.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sync()
            except KubeError as exc:
                log.warning("TLS Secret check failed (serving the previous certificate): %s", exc)


class DirSource:
    """cert-manager's files: read, and re-read when they change."""

    FILES = ("ca.crt", "tls.crt", "tls.key")

    def __init__(self, directory: Path, tls: ServerTLS) -> None:
        self.directory, self.tls = directory, tls
        self._stamp: tuple[float, ...] = ()

    def sync(self) -> Material:
        paths = [self.directory / f for f in self.FILES]
        try:
            stamp = tuple(p.stat().st_mtime for p in paths)
            material = Material(*(p.read_bytes() for p in paths))
        except OSError as exc:
            raise OSError(f"--tls-dir {self.directory}: {exc.strerror}: {exc.filename}") from exc
        if stamp != self._stamp:
            self._stamp = stamp
            self.tls.update(material)
        return material

    async def run(self, interval: float = 10.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.sync()
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS files unreadable (serving the previous certificate): %s", exc)
