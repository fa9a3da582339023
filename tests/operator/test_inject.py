"""Sidecar injection as pure data: the pod in, the injected pod and its JSONPatch out."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from backdial.operator.admission import ReviewError, review_response
from backdial.operator.inject import Decision, decide, drain_budget, inject, json_patch
from backdial.operator.injectsettings import (
    ANN_ACCEPTOR_RESOURCES,
    ANN_IMAGE,
    ANN_OPERATOR_CA,
    ANN_PORT_NAME,
    ANN_QUIET_PERIOD,
    ANN_SIDECAR_RESOURCES,
    ANN_WORKERS,
    InjectError,
    InjectSettings,
    load_settings,
    overridden,
)
from backdial.operator.probes import DRAIN_TOKEN_HEADER
from backdial.operator.webhookconfig import (
    WEBHOOK_NAMESPACE,
    WEBHOOK_POD,
    webhook_configuration,
    webhooks_called,
)

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SETTINGS = InjectSettings()


def demo_pod(**spec: Any) -> dict[str, Any]:
    """The design's minimal workload (§7), as the ReplicaSet controller creates it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "ghcr.io/backdial/backdial:0.2.0",
                    "args": ["serve", "backdial.demo:app", "--sessions", "4"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ],
            **spec,
        },
    }


def injected(pod: dict[str, Any], settings: InjectSettings = SETTINGS) -> dict[str, Any]:
    return inject(pod, settings, drain_token="tok", ca_pem=CA, version="9.9.9")


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(i for i in items if i["name"] == name)


def apply_patch(doc: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` on object members: all json_patch emits."""
    out = copy.deepcopy(doc)
    for op in patch:
        assert op["op"] == "add"
        *parents, last = op["path"].lstrip("/").split("/")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = op["value"]
    return out


def test_native_sidecars_acceptor_first_with_startup_probe() -> None:
    pod = injected(demo_pod(initContainers=[{"name": "migrate", "image": "x"}]))
    inits = pod["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["backdial-acceptor", "backdial-sidecar", "migrate"]
    acceptor, sidecar = inits[0], inits[1]
    assert acceptor["restartPolicy"] == sidecar["restartPolicy"] == "Always"
    assert acceptor["startupProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": 9901,
        "scheme": "HTTP",
    }
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["readinessProbe"]["httpGet"]["port"] == 9902
    assert "restartPolicy" not in inits[2]  # the user's init container is untouched


def test_listen_addresses_are_explicit_in_args() -> None:
    pod = injected(demo_pod())
    acceptor, sidecar = pod["spec"]["initContainers"][:2]
    assert acceptor["args"][:1] == ["acceptor"]
    assert "--admin" in acceptor["args"] and "0.0.0.0:9901" in acceptor["args"]
    uids = acceptor["args"].index("--register-uids")  # app containers run as other uids
    assert acceptor["args"][uids + 1] == "any" and "--control-uids" not in acceptor["args"]
    args = sidecar["args"]
    assert args[args.index("--listen") + 1] == "0.0.0.0:8080"
    assert args[args.index("--admin") + 1] == "0.0.0.0:9902"
    assert args[args.index("--run-dir") + 1] == "/var/run/backdial"


def test_traffic_port_moves_to_the_sidecar() -> None:
    pod = injected(demo_pod())
    app = pod["spec"]["containers"][0]
    sidecar = by_name(pod["spec"]["initContainers"], "backdial-sidecar")
    assert "ports" not in app
    assert by_name(sidecar["ports"], "http") == {
        "name": "http",
        "containerPort": 8080,
        "protocol": "TCP",
    }


def test_configured_port_name_and_default_port() -> None:
    pod = demo_pod()
    pod["spec"]["containers"][0]["ports"] = [
        {"name": "web", "containerPort": 8000},
        {"name": "metrics", "containerPort": 9100},
    ]
    out = injected(pod, InjectSettings(portName="web"))
    sidecar = by_name(out["spec"]["initContainers"], "backdial-sidecar")
    assert by_name(sidecar["ports"], "web")["containerPort"] == 8000
    assert out["spec"]["containers"][0]["ports"] == [{"name": "metrics", "containerPort": 9100}]
    # No port of that name: the sidecar takes the default port under that name.
    out = injected(pod)
    sidecar = by_name(out["spec"]["initContainers"], "backdial-sidecar")
    assert by_name(sidecar["ports"], "http")["containerPort"] == 8080
    assert "0.0.0.0:8080" in sidecar["args"]


def test_app_env_mounts_and_volumes() -> None:
    pod = demo_pod()
    pod["spec"]["containers"].append(
        {
            "name": "worker",
            "image": "x",
            "env": [{"name": "BACKDIAL_REGISTER", "value": "tcp://127.0.0.1:9"}],
        }
    )
    out = injected(pod)
    app, worker = out["spec"]["containers"]
    assert {"name": "BACKDIAL_REGISTER", "value": "unix:///var/run/backdial/register.sock"} in app[
        "env"
    ]
    assert worker["env"] == [{"name": "BACKDIAL_REGISTER", "value": "tcp://127.0.0.1:9"}]
    for c in [app, worker, *out["spec"]["initContainers"]]:
        assert {"name": "backdial-run", "mountPath": "/var/run/backdial"} in c["volumeMounts"]
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["backdial-run"] == {"name": "backdial-run", "emptyDir": {}}
    sources = volumes["backdial-token"]["projected"]["sources"]
    assert sources[0] == {
        "serviceAccountToken": {"audience": "backdial", "expirationSeconds": 3600, "path": "token"}
    }
    item = sources[1]["downwardAPI"]["items"][0]
    assert item["path"] == "ca.crt"
    assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{ANN_OPERATOR_CA}']"
    assert out["metadata"]["annotations"][ANN_OPERATOR_CA] == CA
    acceptor = out["spec"]["initContainers"][0]
    env = {e["name"]: e["value"] for e in acceptor["env"]}
    assert env["BACKDIAL_OPERATOR"] == "https://backdial-operator.backdial-system.svc:8444"
    assert env["BACKDIAL_OPERATOR_CA"] == "/var/run/secrets/backdial/ca.crt"
    assert env["BACKDIAL_TOKEN_FILE"] == "/var/run/secrets/backdial/token"
    assert {
        "name": "backdial-token",
        "mountPath": "/var/run/secrets/backdial",
        "readOnly": True,
    } in (acceptor["volumeMounts"])


def test_without_a_ca_no_ca_file_is_projected() -> None:
    out = inject(demo_pod(), SETTINGS, drain_token="t", ca_pem="", version="1")
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert len(volumes["backdial-token"]["projected"]["sources"]) == 1
    assert ANN_OPERATOR_CA not in out["metadata"]["annotations"]
    env = {e["name"] for e in out["spec"]["initContainers"][0]["env"]}
    assert "BACKDIAL_OPERATOR_CA" not in env


def test_restricted_security_context_and_resources() -> None:
    out = injected(demo_pod())
    for c in out["spec"]["initContainers"][:2]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"name": "backdial-tmp", "mountPath": "/tmp/backdial"} in c["volumeMounts"]
        assert {"name": "TMPDIR", "value": "/tmp/backdial"} in c["env"]
    assert out["spec"]["initContainers"][0]["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"}
    }


def test_http_and_tcp_probes_on_the_moved_port_are_rewritten() -> None:
    pod = demo_pod()
    app = pod["spec"]["containers"][0]
    app["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 3}
    app["livenessProbe"] = {
        "httpGet": {
            "path": "/live?x=1",
            "port": 8080,
            "httpHeaders": [{"name": "Host", "value": "a.b"}],
        }
    }
    app["startupProbe"] = {"tcpSocket": {"port": "http"}, "failureThreshold": 30}
    out = injected(pod)["spec"]["containers"][0]
    assert out["readinessProbe"] == {
        "httpGet": {"path": "/v1/app-probe?path=%2Fhealthz", "port": 9902, "scheme": "HTTP"},
        "periodSeconds": 3,
    }
    assert out["livenessProbe"]["httpGet"]["path"] == "/v1/app-probe?path=%2Flive%3Fx%3D1&host=a.b"
    assert out["startupProbe"] == {
        "httpGet": {"path": "/v1/app-probe?tcp=1", "port": 9902, "scheme": "HTTP"},
        "failureThreshold": 30,
    }


def test_other_probes_are_left_alone() -> None:
    pod = demo_pod()
    app = pod["spec"]["containers"][0]
    app["ports"].append({"name": "metrics", "containerPort": 9100})
    app["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "metrics"}}
    app["livenessProbe"] = {"exec": {"command": ["true"]}}
    app["startupProbe"] = {"grpc": {"port": 8080}}
    before = copy.deepcopy(app)
    out = injected(pod)["spec"]["containers"][0]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert out[kind] == before[kind]


def test_prestop_waits_for_the_drain_and_the_apps_own_is_kept() -> None:
    pod = demo_pod()
    pod["spec"]["containers"].append(
        {"name": "own", "image": "x", "lifecycle": {"preStop": {"sleep": {"seconds": 3}}}}
    )
    app, own = injected(pod)["spec"]["containers"]
    hook = app["lifecycle"]["preStop"]["httpGet"]
    assert hook["path"] == "/v1/drain" and hook["port"] == 9902
    assert hook["httpHeaders"] == [{"name": DRAIN_TOKEN_HEADER, "value": "tok"}]
    assert own["lifecycle"]["preStop"] == {"sleep": {"seconds": 3}}
    sidecar = injected(pod)["spec"]["initContainers"][1]
    assert {"name": "BACKDIAL_DRAIN_TOKEN", "value": "tok"} in sidecar["env"]


def test_drain_budget_fits_the_grace_period() -> None:
    assert drain_budget({}, 5.0) == (5.0, 23.0)
    assert drain_budget({"terminationGracePeriodSeconds": 60}, 10.0) == (10.0, 48.0)
    assert drain_budget({"terminationGracePeriodSeconds": 4}, 5.0) == (1.0, 1.0)
    assert drain_budget({"terminationGracePeriodSeconds": 0}, 5.0) == (0.0, 1.0)
    sidecar = injected(demo_pod(terminationGracePeriodSeconds=60))["spec"]["initContainers"][1]
    args = sidecar["args"]
    assert args[args.index("--drain-quiet-period") + 1] == "5"
    assert args[args.index("--drain-timeout") + 1] == "53"


def test_decide_opt_out_and_already_injected() -> None:
    pod = demo_pod()
    assert decide(pod) is Decision.INJECT
    pod["metadata"]["labels"]["backdial.dev/inject"] = "false"
    assert decide(pod) is Decision.OPTED_OUT
    assert decide(injected(demo_pod())) is Decision.ALREADY_INJECTED
    hand_made = demo_pod(initContainers=[{"name": "backdial-sidecar", "image": "x"}])
    assert decide(hand_made) is Decision.ALREADY_INJECTED


def test_patch_applied_gives_the_injected_pod() -> None:
    for pod in (demo_pod(), demo_pod(volumes=[{"name": "data", "emptyDir": {}}])):
        after = injected(pod)
        patch = json_patch(pod, after)
        assert apply_patch(pod, patch) == after
        assert {op["path"] for op in patch} == {
            "/metadata/labels",
            "/metadata/annotations",
            "/spec/initContainers",
            "/spec/containers",
            "/spec/volumes",
        }


def test_injection_does_not_touch_its_input() -> None:
    pod = demo_pod()
    before = copy.deepcopy(pod)
    injected(pod)
    assert pod == before


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({ANN_SIDECAR_RESOURCES: "{"}, "annotation backdial.dev/sidecar-resources: not JSON"),
        (
            {ANN_ACCEPTOR_RESOURCES: '{"requests": {"cpu": "lots"}}'},
            "annotation backdial.dev/acceptor-resources: requests",
        ),
        ({ANN_QUIET_PERIOD: "soon"}, "annotation backdial.dev/drain-quiet-period"),
        ({ANN_WORKERS: "0"}, "annotation backdial.dev/sidecar-workers"),
        ({ANN_PORT_NAME: "HTTP"}, "annotation backdial.dev/port-name"),
        ({ANN_IMAGE: ""}, "annotation backdial.dev/image"),
    ],
)
def test_bad_annotations_name_themselves(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(InjectError, match=message.replace(".", r"\.")):
        overridden(SETTINGS, annotations)


def test_annotation_overrides() -> None:
    s = overridden(
        SETTINGS,
        {
            ANN_IMAGE: "ghcr.io/backdial/backdial:dev",
            ANN_SIDECAR_RESOURCES: '{"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}',
            ANN_QUIET_PERIOD: "500ms",
            ANN_WORKERS: "2",
        },
    )
    out = injected(demo_pod(), s)
    sidecar = out["spec"]["initContainers"][1]
    assert (
        sidecar["image"]
        == out["spec"]["initContainers"][0]["image"]
        == ("ghcr.io/backdial/backdial:dev")
    )
    assert sidecar["resources"] == {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}
    args = sidecar["args"]
    assert args[args.index("--drain-quiet-period") + 1] == "0.5"
    assert args[args.index("--workers") + 1] == "2"
    assert overridden(SETTINGS, {"other": "x"}) is SETTINGS


@pytest.mark.parametrize(
    ("pod", "message"),
    [
        (demo_pod(volumes=[{"name": "backdial-run", "emptyDir": {}}]), "reserved for backdial"),
        (demo_pod(containers=[]), "no containers"),
        (
            demo_pod(containers=[{"name": "a", "image": "x", "ports": [{"containerPort": 9902}]}]),
            "sidecar admin",
        ),
        (
            demo_pod(
                containers=[
                    {"name": "a", "image": "x", "ports": [{"name": "http", "containerPort": 9901}]}
                ]
            ),
            "collides with the acceptor admin",
        ),
        (
            demo_pod(
                containers=[
                    {
                        "name": "a",
                        "image": "x",
                        "ports": [{"name": "http", "containerPort": 53, "protocol": "UDP"}],
                    }
                ]
            ),
            "must be TCP",
        ),
    ],
)
def test_pods_that_cannot_be_injected(pod: dict[str, Any], message: str) -> None:
    with pytest.raises(InjectError, match=message):
        injected(pod)


def review(pod: dict[str, Any], operation: str = "CREATE", kind: str = "Pod") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "operation": operation,
            "namespace": "shop",
            "object": pod,
        },
    }


def answer(rv: dict[str, Any]) -> dict[str, Any]:
    tokens = iter(["t1", "t2"])
    out = review_response(rv, SETTINGS, ca_pem=CA, version="1", new_token=lambda: next(tokens))
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == "u-1"
    response: dict[str, Any] = out["response"]
    return response


def test_admission_patches_and_double_injection_is_a_no_op() -> None:
    pod = demo_pod()
    response = answer(review(pod))
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    once = apply_patch(pod, patch)
    assert once["spec"]["initContainers"][1]["env"][-1]["value"] == "t1"
    again = answer(review(once))
    assert again == {"uid": "u-1", "allowed": True}


def test_admission_refuses_with_the_reason_and_passes_others() -> None:
    pod = demo_pod()
    pod["metadata"]["annotations"] = {ANN_WORKERS: "many"}
    response = answer(review(pod))
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "backdial.dev/sidecar-workers" in response["status"]["message"]
    assert answer(review(pod, operation="UPDATE")) == {"uid": "u-1", "allowed": True}
    assert answer(review({}, kind="Service")) == {"uid": "u-1", "allowed": True}
    pod["metadata"]["labels"]["backdial.dev/inject"] = "false"
    assert answer(review(pod)) == {"uid": "u-1", "allowed": True}


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {
            "kind": "AdmissionReview",
            "apiVersion": "admission.k8s.io/v1beta1",
            "request": {"uid": "x"},
        },
        {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": {}},
        {"kind": "Pod"},
    ],
)
def test_not_an_admission_review(bad: Any) -> None:
    with pytest.raises(ReviewError):
        review_response(bad, SETTINGS, ca_pem="", version="1", new_token=lambda: "t")


@pytest.mark.parametrize(
    ("ns", "pod", "called"),
    [
        ({"backdial.dev/inject": "enabled"}, {}, [WEBHOOK_NAMESPACE]),
        ({"backdial.dev/inject": "enabled"}, {"backdial.dev/inject": "true"}, [WEBHOOK_NAMESPACE]),
        ({"backdial.dev/inject": "enabled"}, {"backdial.dev/inject": "false"}, []),
        ({}, {}, []),
        ({}, {"backdial.dev/inject": "true"}, [WEBHOOK_POD]),
        ({"backdial.dev/inject": "disabled"}, {"backdial.dev/inject": "true"}, [WEBHOOK_POD]),
        ({}, {"backdial.dev/inject": "false"}, []),
        ({"kubernetes.io/metadata.name": "kube-system"}, {"backdial.dev/inject": "true"}, []),
        (
            {"kubernetes.io/metadata.name": "ops", "backdial.dev/inject": "enabled"},
            {"app": "backdial-operator"},
            [],
        ),
    ],
)
def test_webhook_selectors_truth_table(
    ns: dict[str, str], pod: dict[str, str], called: list[str]
) -> None:
    """Exactly one webhook for an opted-in pod, none for opted-out ones or system namespaces."""
    config = webhook_configuration("ops", b"CA")
    assert webhooks_called(config, ns, pod) == called


def test_webhook_configuration_shape() -> None:
    config = webhook_configuration("backdial-system", b"PEM")
    for w in config["webhooks"]:
        assert w["failurePolicy"] == "Fail" and w["sideEffects"] == "None"
        assert w["clientConfig"]["caBundle"] == base64.b64encode(b"PEM").decode()
        assert w["clientConfig"]["service"] == {
            "namespace": "backdial-system",
            "name": "backdial-webhook",
            "path": "/mutate-pods",
            "port": 443,
        }
        assert w["rules"][0]["operations"] == ["CREATE"]


def test_settings_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings(empty) == InjectSettings()
    good = tmp_path / "inject.yaml"
    good.write_text("image: ghcr.io/backdial/backdial:1.0\ndrainQuietPeriod: 2s\nportName: web\n")
    s = load_settings(good)
    assert (s.image, s.drain_quiet_period, s.port_name) == (
        "ghcr.io/backdial/backdial:1.0",
        2.0,
        "web",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("sidecarResources: {requests: {gpu: '1'}}\n")
    with pytest.raises(InjectError, match=r"bad\.yaml: sidecarResources\.requests: .*gpu"):
        load_settings(bad)
    with pytest.raises(InjectError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
