"""Only a pod's own token opens its config stream, and acceptors only trust the operator.

Tokens come from the real TokenRequest API; the operator checks them with the real
TokenReview API.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import uuid
from collections.abc import Iterator

import harness
import pytest

from backdial import configstream as cs
from backdial.operator import certs
from tests.helpers import wait_for
from tests.k8s.operator.opstack import OPERATOR_IP, OperatorEnv, sessionslice, token_request

pytestmark = pytest.mark.k8s


def open_stream(
    env: OperatorEnv, ns: str, pod: str, token: str | None, port: int | None = None
) -> tuple[int, str]:
    """Send the upgrade request; the HTTP status and error message of the answer."""
    ctx = ssl.create_default_context(cafile=str(env.ca))
    with (
        socket.create_connection((OPERATOR_IP, port or env.config_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=OPERATOR_IP) as sock,
    ):
        if token is None:
            head = cs.encode_request("op", ns, pod, "x").replace(
                b"Authorization: Bearer x\r\n", b""
            )
        else:
            head = cs.encode_request("op", ns, pod, token)
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head_end = data.index(b"\r\n\r\n") + 4
        status, headers = cs.parse_response(data[:head_end])
        body = data[head_end:]
        if status != 101:
            while len(body) < int(headers.get("content-length", "0")):
                body += sock.recv(4096)
        return status, cs.error_message(body) if status != 101 else ""


@pytest.fixture
def other_namespace(k8s_cluster: harness.Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    assert k8s_cluster.api.request("POST", "/api/v1/namespaces", body).status == 201
    yield name
    k8s_cluster.api.request("DELETE", f"/api/v1/namespaces/{name}")


def test_streams_need_the_pods_own_token(
    ops: OperatorEnv, k8s_namespace: str, other_namespace: str
) -> None:
    ns = k8s_namespace
    web0, web1 = ops.create_pods(ns, ["web-0", "web-1"], {"app": "web"})
    (stranger,) = ops.create_pods(other_namespace, ["web-0"], {"app": "web"})
    own = token_request(ops.cluster, ns, "default", pod=web0)
    cases = {
        "no token": (None, "web-0", 401),
        "garbage": ("not-a-token", "web-0", 401),
        "api audience": (
            token_request(ops.cluster, ns, "default", pod=web0, audience=None),
            "web-0",
            401,
        ),
        "not pod-bound": (token_request(ops.cluster, ns, "default"), "web-0", 403),
        "another pod's": (own, "web-1", 403),
        "other namespace's": (
            token_request(ops.cluster, other_namespace, "default", pod=stranger),
            "web-0",
            403,
        ),
        "its own": (own, "web-0", 101),
    }
    got = {name: open_stream(ops, ns, pod, token)[0] for name, (token, pod, _) in cases.items()}
    assert got == {name: want for name, (_, _, want) in cases.items()}
    assert open_stream(ops, ns, "web-1", own)[1] == (
        f"the token belongs to pod {ns}/web-0, not {ns}/web-1"
    )

    # An acceptor with another pod's token stays with its local config; the right one is
    # configured.
    ops.cluster.apply(
        sessionslice(
            "web",
            ns,
            {"selector": {"matchLabels": {"app": "web"}}, "capacity": {"sessionsPerPod": 2}},
        )
    )
    good = ops.start_stack(web0, sessions=1)
    bad = ops.start_stack(web1, sessions=1, token=own, BACKDIAL_POD=f"{ns}/web-1")
    wait_for(lambda: good.operator_state()["generation"] == 1, what="web-0 configured")
    wait_for(lambda: "HTTP 403" in bad.operator_state()["error"], what="web-1 refused")
    assert bad.operator_state()["generation"] == 0
    assert bad.state()["limits"]["maxSessions"] != 2


def test_acceptor_refuses_an_operator_it_does_not_trust(
    ops: OperatorEnv, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    (pod,) = ops.create_pods(ns, ["web-0"], {"app": "web"})
    spec = {"selector": {"matchLabels": {"app": "web"}}, "capacity": {"sessionsPerPod": 2}}
    ops.cluster.apply(sessionslice("web", ns, spec))
    stack = ops.start_stack(pod, sessions=1)
    wait_for(lambda: stack.operator_state()["generation"] == 1, what="configured")
    # Restarted trusting another CA: the operator's certificate is refused, nothing is
    # applied from it, and the acceptor serves with the config saved in its run directory.
    foreign = ops.workdir / "foreign-ca.crt"
    foreign.write_bytes(certs.make_ca(datetime.datetime.now(datetime.UTC))[0])
    assert stack.acceptor is not None
    stack.acceptor.stop()
    stack.procs.remove(stack.acceptor)
    ops.start_acceptor(stack, ca=foreign)
    wait_for(
        lambda: "CERTIFICATE_VERIFY_FAILED" in stack.operator_state()["error"],
        what="TLS verification failure",
    )
    assert not stack.operator_state()["connected"]
    assert stack.operator_state()["generation"] == 1
    assert stack.state()["limits"]["maxSessions"] == 2
