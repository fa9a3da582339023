"""Unit tests of the process kubelet's pure parts (no cluster): pod spec → plan, env and
argv resolution with the loopback rewrite, volumes, /etc/hosts, status, probes, restarts."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from kubelet import PROCESS_PLACEMENT, place_on_process_node
from kubelet.addresses import AddressClaims
from kubelet.hosts import render_hosts, service_map
from kubelet.plan import (
    ConfigError,
    ContainerKind,
    IpPool,
    PodContext,
    expand_refs,
    is_project_image,
    pod_containers,
    resolve_argv,
    resolve_env,
    rewrite_loopback,
)
from kubelet.policy import Backoff, should_restart
from kubelet.probes import Action, ProbeKind, ProbeTracker, next_run, parse_probe
from kubelet.status import ContainerRecord, PodFacts, pod_conditions, pod_phase, pod_status
from kubelet.tokens import refresh_at, token_request
from kubelet.volumes import (
    TokenSource,
    VolumeContext,
    read_current,
    token_sources,
    volume_files,
    write_atomic,
)

IMAGES = ("ghcr.io/backdial/backdial",)
PY = "/opt/py/bin/python"


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "uid": "u-1",
            "labels": {"app": "web"},
            "annotations": {"a": "b"},
        },
        "spec": {"nodeName": "backdial-proc-0", "serviceAccountName": "sa", **spec},
    }


def _objects(*objs: dict[str, Any]) -> Any:
    store = {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs}
    return lambda kind, ns, name: store.get((kind, ns, name))


CM = {
    "kind": "ConfigMap",
    "metadata": {"namespace": "shop", "name": "cfg"},
    "data": {"MODE": "fast", "URL": "http://localhost:9000/x", "bad key": "x"},
}
SECRET = {
    "kind": "Secret",
    "metadata": {"namespace": "shop", "name": "sec"},
    "data": {"TOKEN": base64.b64encode(b"s3cret").decode()},
}


def _ctx(pod: dict[str, Any]) -> PodContext:
    return PodContext(
        pod=pod,
        pod_ip="127.42.0.7",
        host_ip="127.0.0.1",
        base_env={"PATH": "/usr/bin"},
        service_env={"KUBERNETES_SERVICE_HOST": "127.0.0.1"},
    )


# -- images and kinds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "runs"),
    [
        ("ghcr.io/backdial/backdial", True),
        ("ghcr.io/backdial/backdial:0.2.0", True),
        ("ghcr.io/backdial/backdial@sha256:abc", True),
        ("ghcr.io/backdial/backdial:1@sha256:abc", True),
        ("ghcr.io/backdial/backdial-extra:1", False),
        ("nginx:1.27", False),
        ("localhost:5000/backdial", False),
    ],
)
def test_project_image_matches_any_tag_or_digest(image: str, runs: bool) -> None:
    assert is_project_image(image, IMAGES) is runs


def test_containers_come_in_start_order_with_kinds() -> None:
    pod = _pod(
        initContainers=[
            {"name": "setup", "image": "ghcr.io/backdial/backdial"},
            {"name": "side", "image": "ghcr.io/backdial/backdial", "restartPolicy": "Always"},
        ],
        containers=[{"name": "app", "image": "nginx"}],
    )
    plans = pod_containers(pod, IMAGES)
    assert [(p.name, p.kind, p.runnable) for p in plans] == [
        ("setup", ContainerKind.INIT, True),
        ("side", ContainerKind.SIDECAR, True),
        ("app", ContainerKind.APP, False),
    ]


def test_placement_merges_into_a_pod_spec() -> None:
    spec = place_on_process_node({"nodeSelector": {"x": "y"}, "tolerations": [{"key": "k"}]})
    assert spec["nodeSelector"] == {"x": "y", "backdial.dev/node-kind": "process"}
    assert spec["tolerations"][1] == PROCESS_PLACEMENT["tolerations"][0]


# -- rewriting and expansion ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8080", "127.42.0.7:8080"),
        ("--listen=127.0.0.1:80", "--listen=127.42.0.7:80"),
        ("http://localhost:9000/x", "http://127.42.0.7:9000/x"),
        ("localhost", "127.42.0.7"),
        ("10.0.0.1:80", "10.0.0.1:80"),
        ("127.0.0.12:80", "127.0.0.12:80"),
        ("localhost.example.com", "localhost.example.com"),
        ("mylocalhost", "mylocalhost"),
        ("a 0.0.0.0 b localhost.", "a 127.42.0.7 b 127.42.0.7."),
    ],
)
def test_loopback_rewrite_touches_whole_hosts_only(text: str, expected: str) -> None:
    assert rewrite_loopback(text, "127.42.0.7") == expected


def test_var_references_expand_like_kubernetes() -> None:
    env = {"A": "1", "B": "two"}
    assert expand_refs("$(A)-$(B)", env) == "1-two"
    assert expand_refs("$(C)", env) == "$(C)"
    assert expand_refs("$$(A)", env) == "$(A)"
    assert expand_refs("cost $5 $(A", env) == "cost $5 $(A"


# -- env and argv --------------------------------------------------------------------------


def test_env_resolves_sources_in_kubernetes_order() -> None:
    container = {
        "name": "app",
        "image": IMAGES[0],
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CM_"}],
        "env": [
            {"name": "CM_MODE", "value": "slow"},
            {"name": "LISTEN", "value": "0.0.0.0:$(PORT)"},
            {"name": "PORT", "value": "8080"},
            {"name": "LISTEN2", "value": "0.0.0.0:$(PORT)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "APP",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
            },
            {"name": "TOK", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
            {
                "name": "GONE",
                "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
            {"name": "KUBERNETES_SERVICE_HOST", "value": "evil"},
        ],
    }
    pod = _pod(containers=[container])
    plan = pod_containers(pod, IMAGES)[0]
    env = resolve_env(plan, _ctx(pod), _objects(CM, SECRET))
    assert env["CM_MODE"] == "slow"  # env overrides envFrom
    assert env["CM_URL"] == "http://127.42.0.7:9000/x"  # rewritten
    assert "CM_bad key" not in env
    assert env["LISTEN"] == "127.42.0.7:$(PORT)"  # PORT not yet defined
    assert env["LISTEN2"] == "127.42.0.7:8080"
    assert (env["POD"], env["IP"], env["APP"], env["TOK"]) == (
        "web-1",
        "127.42.0.7",
        "web",
        "s3cret",
    )
    assert "GONE" not in env
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"  # the kubelet's own wins
    assert env["PATH"] == "/usr/bin"


def test_missing_reference_is_a_config_error() -> None:
    container = {
        "name": "app",
        "image": IMAGES[0],
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "NOPE"}}}],
    }
    pod = _pod(containers=[container])
    with pytest.raises(ConfigError, match="NOPE"):
        resolve_env(pod_containers(pod, IMAGES)[0], _ctx(pod), _objects(SECRET))
    container["env"] = [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "k"}}}]
    with pytest.raises(ConfigError, match='configmap "x" not found'):
        resolve_env(pod_containers(pod, IMAGES)[0], _ctx(pod), _objects())


@pytest.mark.parametrize(
    ("command", "args", "argv"),
    [
        (
            None,
            ["serve", "m:app", "--listen", "0.0.0.0:8080"],
            [PY, "-m", "backdial.cli", "serve", "m:app", "--listen", "127.42.0.7:8080"],
        ),
        (["backdial", "operator"], [], [PY, "-m", "backdial.cli", "operator"]),
        (["python3", "-c", "print(1)"], [], [PY, "-c", "print(1)"]),
        (["/usr/bin/python"], ["x.py"], [PY, "x.py"]),
        (["sh", "-c", "echo $(PORT) localhost"], [], ["sh", "-c", "echo 8080 127.42.0.7"]),
    ],
)
def test_argv_maps_the_project_entrypoint(
    command: list[str] | None, args: list[str], argv: list[str]
) -> None:
    container: dict[str, Any] = {"name": "app", "image": IMAGES[0], "args": args}
    if command:
        container["command"] = command
    plan = pod_containers(_pod(containers=[container]), IMAGES)[0]
    assert resolve_argv(plan, {"PORT": "8080"}, "127.42.0.7", PY) == argv


def test_ip_pool_hands_out_distinct_addresses_and_reuses_late() -> None:
    pool = IpPool("127.42.0.0/29")  # usable offsets 2..6
    first = [pool.allocate(f"u{i}") for i in range(5)]
    assert first == [f"127.42.0.{i}" for i in range(2, 7)]
    assert pool.allocate("u0") == "127.42.0.2"  # stable per pod
    with pytest.raises(ConfigError):
        pool.allocate("u9")
    pool.release("u1")
    assert pool.allocate("u9") == "127.42.0.3"


def test_two_clusters_on_one_machine_never_share_a_pod_ip(tmp_path: Path) -> None:
    """Each kubelet locks the addresses it hands out in a directory shared by the machine
    (flock: the lock goes when the kubelet does), and skips those another one holds."""
    mine, theirs = AddressClaims(tmp_path), AddressClaims(tmp_path)
    pool = IpPool("127.42.0.0/29", mine.claim, mine.release)
    other = IpPool("127.42.0.0/29", theirs.claim, theirs.release)
    assert [pool.allocate("a"), pool.allocate("b")] == ["127.42.0.2", "127.42.0.3"]
    assert [other.allocate("x"), other.allocate("y")] == ["127.42.0.4", "127.42.0.5"]
    pool.release("a")
    assert other.allocate("z") == "127.42.0.6"
    assert other.allocate("w") == "127.42.0.2"  # released by the first cluster
    with pytest.raises(ConfigError, match="other clusters"):
        pool.allocate("c")  # .3 is its own; every other address is taken
    theirs.close()  # the other kubelet exits: its addresses are free again
    assert pool.allocate("c") in {"127.42.0.2", "127.42.0.4", "127.42.0.5", "127.42.0.6"}


# -- volumes -------------------------------------------------------------------------------

KUBE_API_ACCESS = {
    "name": "kube-api-access-x",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {
                "configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }
            },
            {
                "downwardAPI": {
                    "items": [
                        {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                    ]
                }
            },
        ],
    },
}
ROOT_CA = {
    "kind": "ConfigMap",
    "metadata": {"namespace": "shop", "name": "kube-root-ca.crt"},
    "data": {"ca.crt": "PEM"},
}


def _vctx(pod: dict[str, Any], *objs: dict[str, Any]) -> VolumeContext:
    sources = token_sources(KUBE_API_ACCESS)
    return VolumeContext(
        pod, "127.42.0.7", "127.0.0.1", _objects(*objs), {s: "tok" for s in sources}
    )


def test_default_service_account_volume_renders_token_ca_and_namespace() -> None:
    pod = _pod()
    assert token_sources(KUBE_API_ACCESS) == [TokenSource("", 3607, "token")]
    files = volume_files(KUBE_API_ACCESS, _vctx(pod, ROOT_CA))
    assert files == {
        "token": (b"tok", 0o644),
        "ca.crt": (b"PEM", 0o644),
        "namespace": (b"shop", 0o644),
    }


def test_configmap_and_secret_volumes_and_missing_objects() -> None:
    pod = _pod()
    cm = {
        "name": "c",
        "configMap": {"name": "cfg", "items": [{"key": "MODE", "path": "m/mode", "mode": 0o600}]},
    }
    assert volume_files(cm, _vctx(pod, CM)) == {"m/mode": (b"fast", 0o600)}
    secret = {"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o400}}
    assert volume_files(secret, _vctx(pod, SECRET)) == {"TOKEN": (b"s3cret", 0o400)}
    with pytest.raises(ConfigError):
        volume_files(secret, _vctx(pod))
    optional = {"name": "s", "secret": {"secretName": "sec", "optional": True}}
    assert volume_files(optional, _vctx(pod)) == {}
    assert volume_files({"name": "e", "emptyDir": {}}, _vctx(pod)) is None
    with pytest.raises(ConfigError, match="not supported"):
        volume_files({"name": "p", "persistentVolumeClaim": {"claimName": "x"}}, _vctx(pod))


def test_downward_api_volume_lists_labels() -> None:
    volume = {
        "name": "d",
        "downwardAPI": {
            "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
        },
    }
    assert volume_files(volume, _vctx(_pod())) == {"labels": (b'app="web"', 0o644)}


def test_atomic_write_publishes_through_the_data_link(tmp_path: Path) -> None:
    assert write_atomic(tmp_path, {"a": (b"1", 0o644), "d/b": (b"2", 0o600)})
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "d" / "b").read_bytes() == b"2"
    assert (tmp_path / "a").is_symlink()
    assert not write_atomic(tmp_path, {"a": (b"1", 0o644), "d/b": (b"2", 0o600)})
    assert write_atomic(tmp_path, {"a": (b"3", 0o644)})
    assert (tmp_path / "a").read_bytes() == b"3" and not (tmp_path / "d").exists()
    assert read_current(tmp_path) == {"a": (b"3", 0o644)}
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("..") and p.is_dir()]) == 2


def test_token_request_is_bound_to_the_pod_and_refreshed_at_80_percent() -> None:
    body = token_request(_pod(), TokenSource("backdial", 3600, "token"))
    assert body["spec"]["boundObjectRef"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "web-1",
        "uid": "u-1",
    }
    assert body["spec"]["audiences"] == ["backdial"]
    assert "audiences" not in token_request(_pod(), TokenSource("", 3607, "t"))["spec"]
    assert refresh_at(1000.0, 4600.0) == pytest.approx(3880.0)
    assert refresh_at(0.0, 10 * 86400.0) == 86400.0


# -- /etc/hosts ----------------------------------------------------------------------------


def _slice(ns: str, svc: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "endpoints": list(endpoints),
    }


def test_hosts_map_services_to_ready_endpoints() -> None:
    slices = [
        _slice(
            "backdial-system",
            "backdial-operator",
            {"addresses": ["127.42.0.3"], "conditions": {"ready": True}},
            {"addresses": ["127.42.0.4"], "conditions": {"ready": False}},
        ),
        _slice("shop", "db", {"addresses": ["127.42.0.9"], "hostname": "db-0"}),
        {"metadata": {"namespace": "x"}, "endpoints": []},
    ]
    services = service_map(slices)
    text = render_hosts(
        pod_name="web-1",
        pod_namespace="shop",
        pod_ip="127.42.0.7",
        apiserver_ip="127.0.0.1",
        services=services,
    )
    lines = text.splitlines()
    assert "127.42.0.7\tlocalhost web-1" in lines
    assert (
        "127.42.0.3\tbackdial-operator.backdial-system.svc.cluster.local "
        "backdial-operator.backdial-system.svc backdial-operator.backdial-system"
    ) in lines
    assert not any(line.startswith("127.42.0.4") for line in lines)
    assert "127.42.0.9\tdb.shop.svc.cluster.local db.shop.svc db.shop db" in lines
    assert "127.42.0.9\tdb-0.db.shop.svc.cluster.local db-0.db.shop.svc" in lines
    assert any(line.startswith("127.0.0.1\tkubernetes.default.svc.cluster.local") for line in lines)
    assert not any(" localhost" in line and line.startswith("::1") for line in lines)


# -- status --------------------------------------------------------------------------------


def _rec(name: str, kind: ContainerKind) -> ContainerRecord:
    return ContainerRecord(name, kind, IMAGES[0])


def test_phase_follows_init_and_app_containers() -> None:
    init, app = _rec("i", ContainerKind.INIT), _rec("a", ContainerKind.APP)
    assert pod_phase([init, app], "Always").value == "Pending"
    init.run("id1", "t0")
    init.terminate(1, 0, "t1")
    assert pod_phase([init, app], "Never").value == "Failed"
    assert pod_phase([init, app], "Always").value == "Pending"
    init.run("id2", "t2")
    init.terminate(0, 0, "t3")
    app.run("id3", "t4")
    assert pod_phase([init, app], "Always").value == "Running"
    app.terminate(143, 15, "t5")
    assert pod_phase([init, app], "Never").value == "Failed"
    app.wait("CrashLoopBackOff")  # restarting
    assert pod_phase([init, app], "Always").value == "Running"
    app.run("id4", "t6")
    app.terminate(0, 0, "t7")
    assert pod_phase([init, app], "OnFailure").value == "Succeeded"


def test_conditions_count_sidecars_and_readiness_gates() -> None:
    side, app = _rec("s", ContainerKind.SIDECAR), _rec("a", ContainerKind.APP)
    side.run("1", "t")
    app.run("2", "t")
    app.ready = True

    def status(**kw: Any) -> dict[str, str]:
        return {
            c["type"]: c["status"] for c in pod_conditions([side, app], sandbox_ready=True, **kw)
        }

    assert status()["Initialized"] == "False"
    side.started = True
    assert status()["Initialized"] == "True"
    assert status()["ContainersReady"] == "False"  # the sidecar is not ready yet
    side.ready = True
    assert status()["Ready"] == "True"
    gated = status(readiness_gates=["x/ok"], gate_status={"x/ok": "False"})
    assert (gated["ContainersReady"], gated["Ready"]) == ("True", "False")


def test_pod_status_keeps_transition_times_and_foreign_conditions() -> None:
    app = _rec("a", ContainerKind.APP)
    app.run("backdial-proc://1", "t0")
    pod = _pod(containers=[{"name": "a"}])
    pod["status"] = {
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t-1"},
            {"type": "Ready", "status": "False", "lastTransitionTime": "t-1"},
        ]
    }
    facts = PodFacts("127.42.0.7", "127.0.0.1", "t0", True)
    status = pod_status(pod, [app], facts, "t9")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["PodScheduled"]["lastTransitionTime"] == "t-1"
    assert conditions["Ready"]["lastTransitionTime"] == "t-1"  # still False
    assert conditions["PodReadyToStartContainers"]["lastTransitionTime"] == "t9"
    assert status["podIPs"] == [{"ip": "127.42.0.7"}]
    entry = status["containerStatuses"][0]
    assert entry["state"] == {"running": {"startedAt": "t0"}}
    app.terminate(137, 9, "t1")
    app.wait("CrashLoopBackOff", "back-off 1s")
    entry = pod_status(pod, [app], facts, "t9")["containerStatuses"][0]
    assert entry["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert entry["lastState"]["terminated"]["exitCode"] == 137
    assert entry["lastState"]["terminated"]["signal"] == 9


# -- probes and restarts -------------------------------------------------------------------


def test_probe_parsing_and_thresholds() -> None:
    spec = parse_probe(
        ProbeKind.READINESS,
        {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
        {"http": 8080},
    )
    assert (spec.handler.action, spec.handler.port, spec.handler.path) == (
        Action.HTTP,
        8080,
        "/ready",
    )
    assert (spec.timeout, spec.success_threshold) == (1.0, 1)
    tracker = ProbeTracker(spec)
    assert tracker.record(True) and tracker.result is True
    assert not tracker.record(False) and tracker.result is True  # one failure is not enough
    assert tracker.record(False) and tracker.result is False
    assert next_run(10.0, spec, 10.5) == 12.0
    assert next_run(10.0, spec, 13.0) == 13.0
    with pytest.raises(ConfigError):
        parse_probe(ProbeKind.LIVENESS, {"tcpSocket": {"port": "nope"}}, {})


def test_restart_policy_and_backoff() -> None:
    assert should_restart(ContainerKind.SIDECAR, "Never", 0)
    assert not should_restart(ContainerKind.INIT, "Always", 0)
    assert should_restart(ContainerKind.INIT, "OnFailure", 1)
    assert not should_restart(ContainerKind.INIT, "Never", 1)
    assert should_restart(ContainerKind.APP, "Always", 0)
    assert not should_restart(ContainerKind.APP, "OnFailure", 0)
    assert should_restart(ContainerKind.APP, "OnFailure", 2)
    assert not should_restart(ContainerKind.APP, "Never", 2)
    backoff = Backoff(base=1.0, cap=5.0, reset_after=60.0)
    assert [backoff.delay(n) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.crashes_after(3, ran_for=2.0) == 4
    assert backoff.crashes_after(3, ran_for=61.0) == 1
