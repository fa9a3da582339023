"""The self-managed CA and serving certificate: renewal rules and a real TLS handshake."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

from cryptography import x509

from backdial.operator import certs

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
NAMES = certs.service_names("backdial-system", ["127.0.0.1"])


def test_names_cover_every_service() -> None:
    for svc in certs.SERVICES:
        assert f"{svc}.backdial-system.svc" in NAMES
    assert "127.0.0.1" in NAMES and len(NAMES) == len(set(NAMES))


def test_renewal_keeps_the_ca_and_renews_the_serving_cert_when_due() -> None:
    first = certs.renew(None, NAMES, NOW)
    assert first is not None
    assert certs.renew(first, NAMES, NOW + datetime.timedelta(days=100)) is None
    due = certs.renew(first, NAMES, NOW + datetime.timedelta(days=250))  # past 2/3 of 365
    assert due is not None and due.ca == first.ca and due.cert != first.cert
    more = certs.renew(first, [*NAMES, "extra.example"], NOW)  # a missing name
    assert more is not None and more.ca == first.ca
    assert "extra.example" in certs.cert_names(x509.load_pem_x509_certificate(more.cert))
    late = certs.renew(first, NAMES, NOW + datetime.timedelta(days=3300))  # CA near its end
    assert late is not None and late.ca != first.ca
    foreign = certs.Material(first.ca, first.cert, first.key, b"")  # no CA key: not ours
    assert certs.renew(foreign, NAMES, NOW) is not None


def test_secret_round_trip() -> None:
    material = certs.renew(None, NAMES, NOW)
    assert material is not None
    body = certs.secret_body("backdial-system", material)
    assert body["type"] == "kubernetes.io/tls"
    assert certs.material_from_secret(body) == material
    assert certs.material_from_secret({"data": {"tls.crt": "x"}}) is None


def test_listeners_serve_the_current_certificate(tmp_path: Path) -> None:
    tls = certs.ServerTLS()
    first = certs.renew(None, NAMES, datetime.datetime.now(datetime.UTC))
    assert first is not None
    tls.update(first)
    ctx = tls.context()
    (tmp_path / "ca.crt").write_bytes(first.ca)

    async def handshake() -> bytes:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="backdial-operator.backdial-system.svc"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        server.close()
        return bytes(der)

    served = x509.load_der_x509_certificate(asyncio.run(handshake()))
    assert served == x509.load_pem_x509_certificate(first.cert)
    # A renewed certificate (same CA) is loaded into the same context for new handshakes.
    renewed = certs.renew(first, [*NAMES, "new.example"], datetime.datetime.now(datetime.UTC))
    assert renewed is not None
    assert tls.update(renewed) and not tls.update(renewed)
    served = x509.load_der_x509_certificate(asyncio.run(handshake()))
    assert served == x509.load_pem_x509_certificate(renewed.cert)


def test_dir_source_reads_cert_manager_files(tmp_path: Path) -> None:
    material = certs.renew(None, NAMES, NOW)
    assert material is not None
    for name, data in (
        ("ca.crt", material.ca),
        ("tls.crt", material.cert),
        ("tls.key", material.key),
    ):
        (tmp_path / name).write_bytes(data)
    tls = certs.ServerTLS()
    got = certs.DirSource(tmp_path, tls).sync()
    assert got.cert == material.cert and tls.material == got
