"""The acceptor as a real process: registration, control socket, reload, admin.

The control-socket peer here is a raw SOCK_SEQPACKET client written against
docs/protocol.md (no backdial sidecar code), so these tests also check that
the protocol can be spoken from scratch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.acceptor.conftest import PRE, RawWorker, services
from tests.helpers import free_port, get_json, http_get, metric, register, wait_for

from backdial import control, wire


def test_registration_ok_and_state(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    socks = [register(run_dir / "register.sock", PRE) for _ in range(3)]
    for i, (_, reply) in enumerate(socks, 1):
        assert reply == wire.encode_ok(i, 1)
    state = get_json(f"http://{admin}/v1/state")
    assert state["services"]["demo"]["registered"] == 3
    assert state["services"]["demo"]["idle"] == 3
    assert [r["sessions"] for r in state["registrants"]] == [3]
    metrics = http_get(f"http://{admin}/metrics")[1].decode()
    assert metric(metrics, "backdial_sessions_registered", service="demo", slice="default") == 3


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"BDREG/2 service=demo instance=a\r\n", b"version"),
        (b"HELLO\r\n", b"malformed"),
        (b"BDREG/1 service=demo\r\n", b"malformed"),
        (b"BDREG/1 service=demo instance=a instance=b\r\n", b"malformed"),
        (b"BDREG/1 service=de mo instance=a\r\n", b"malformed"),
        (b"BDREG/1 service=demo instance=a colour=red\r\n", b"malformed"),
        (b"BDREG/1 service=demo instance=a\n", b"malformed"),
        (b"BDREG/1 service=d\xc3\xa9mo instance=a\r\n", b"malformed"),
        (b"BDREG/1 service=demo instance=a\r\nGET / HTTP/1.1\r\n", b"malformed"),
        (b"BDREG/1 service=" + b"x" * 2000 + b"\r\n", b"too-long"),
    ],
)
def test_bad_preambles_get_err_and_change_nothing(
    acceptor, run_dir: Path, line: bytes, code: bytes
) -> None:  # type: ignore[no-untyped-def]
    proc, admin, _ = acceptor()
    sock, reply = register(run_dir / "register.sock", line)
    assert reply.startswith(b"BDREG/1 ERR " + code + b" "), reply
    # Closed after the ERR (or reset, when the client had sent more than was read).
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(10) == b""
    assert services(admin) == {}
    # ... and the acceptor still works.
    assert register(run_dir / "register.sock", PRE)[1].startswith(b"BDREG/1 OK")
    assert proc.alive()


def test_preamble_timeout_and_tokens(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("tokens: [s3cret]\nlimits: {preambleTimeout: 300ms}\n")
    _, reply = register(run_dir / "register.sock", b"BDREG/1 serv")
    assert reply.startswith(b"BDREG/1 ERR timeout"), reply
    _, reply = register(run_dir / "register.sock", PRE)
    assert reply.startswith(b"BDREG/1 ERR auth"), reply
    _, reply = register(
        run_dir / "register.sock", b"BDREG/1 service=demo instance=a token=nope\r\n"
    )
    assert reply.startswith(b"BDREG/1 ERR auth"), reply
    _, reply = register(
        run_dir / "register.sock", b"BDREG/1 token=s3cret service=demo instance=a\r\n"
    )
    assert reply.startswith(b"BDREG/1 OK"), reply
    metrics = http_get(f"http://{admin}/metrics")[1].decode()
    assert metric(metrics, "backdial_acceptor_registrations_total", result="auth") == 2


def test_session_limits(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    acceptor("limits: {maxSessions: 3, maxSessionsPerRegistrant: 2}\n")
    keep = [register(run_dir / "register.sock", PRE) for _ in range(2)]
    assert all(r.startswith(b"BDREG/1 OK") for _, r in keep)
    assert register(run_dir / "register.sock", PRE)[1].startswith(b"BDREG/1 ERR limit")
    other = register(run_dir / "register.sock", b"BDREG/1 service=demo instance=b\r\n")
    assert other[1].startswith(b"BDREG/1 OK")
    third = register(run_dir / "register.sock", b"BDREG/1 service=demo instance=c\r\n")
    assert third[1].startswith(b"BDREG/1 ERR limit")


def test_tcp_registration(acceptor) -> None:  # type: ignore[no-untyped-def]
    _, admin, tcp = acceptor(tcp=True)
    sock = socket.create_connection(tcp, timeout=5)
    sock.sendall(PRE)
    assert sock.recv(100).startswith(b"BDREG/1 OK")
    assert services(admin)["demo"]["registered"] == 1


def test_dead_and_retired_sessions_are_dropped_alone(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    a = [register(run_dir / "register.sock", PRE)[0] for _ in range(3)]
    b = [
        register(run_dir / "register.sock", b"BDREG/1 service=demo instance=b\r\n")[0]
        for _ in range(2)
    ]
    a[0].close()
    a[1].sendall(wire.RETIRE_LINE)
    assert a[1].recv(10) == b""  # the acceptor closes a retired session
    wait_for(lambda: services(admin)["demo"]["registered"] == 3, what="drops")
    regs = {
        r["instance"]: r["sessions"] for r in get_json(f"http://{admin}/v1/state")["registrants"]
    }
    assert regs == {"a1": 1, "b": 2}
    for s in b:
        s.close()
    a[2].sendall(b"garbage")
    wait_for(lambda: services(admin)["demo"]["registered"] == 0, what="all gone")
    assert get_json(f"http://{admin}/v1/state")["registrants"] == []
    metrics = http_get(f"http://{admin}/metrics")[1].decode()
    assert metric(metrics, "backdial_acceptor_sessions_dropped_total", reason="retired") == 1
    assert metric(metrics, "backdial_acceptor_sessions_dropped_total", reason="protocol") == 1


def test_control_grant_release_and_http_over_leased_fd(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    service_side = [register(run_dir / "register.sock", PRE)[0] for _ in range(2)]
    worker = RawWorker(run_dir)
    worker.send(control.Hello(os.getpid(), "raw"))
    cfg, _ = worker.recv(control.ConfigMsg)
    assert isinstance(cfg, control.ConfigMsg) and cfg.workers == 1
    worker.send(control.Want("", "default", 1))
    grant, fds = worker.recv(control.Grant)
    assert isinstance(grant, control.Grant)
    assert len(fds) == len(grant.leases) >= 1
    lease = grant.leases[0]
    assert (lease.service, lease.slice, lease.requested) == ("demo", "default", "")
    # The descriptor really is the service's connected socket.
    leased = socket.socket(fileno=fds[0])
    leased.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    for s in service_side:
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            received += s.recv(100)
    assert received == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    state = services(admin)["demo"]
    assert state["slices"]["default"]["leased"] == len(grant.leases)
    leased.close()
    for extra in fds[1:]:
        os.close(extra)
    worker.send(control.Release([control.Released(le.session, "idle") for le in grant.leases]))
    wait_for(lambda: services(admin)["demo"]["idle"] == 2, what="release")


def test_killed_worker_leases_are_reclaimed(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    service_side = [register(run_dir / "register.sock", PRE)[0] for _ in range(3)]
    script = f"""
import os, socket, sys, time
from backdial import control, fdpass
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({str(run_dir / "control.sock")!r})
fdpass.send_record(s, control.encode(control.Hello(os.getpid(), "doomed")))
fdpass.send_record(s, control.encode(control.Want("", "default", 2)))
held = 0
while held < 2:
    rec, fds = fdpass.recv_record(s)
    held += len(fds)
print("held", held, flush=True)
time.sleep(60)
"""
    doomed = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert doomed.stdout is not None
        assert doomed.stdout.readline().startswith(b"held")
        wait_for(lambda: services(admin)["demo"]["leased"] >= 2, what="leases")
        time.sleep(0.2)  # let any prefetched grant land too
        leased = services(admin)["demo"]["leased"]
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    finally:
        doomed.kill()
    wait_for(lambda: services(admin)["demo"]["registered"] == 3 - leased, what="reclaim")
    # The reclaimed sessions were shut down: their services see end-of-file.
    eofs = 0
    for s in service_side:
        s.settimeout(0.5)
        try:
            if s.recv(10) == b"":
                eofs += 1
        except TimeoutError:
            pass
    assert eofs == leased
    metrics = http_get(f"http://{admin}/metrics")[1].decode()
    assert metric(metrics, "backdial_acceptor_sessions_dropped_total", reason="reclaimed") == leased


def test_config_reload_keeps_old_config_on_error(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    proc, admin, _ = acceptor("slices: [{name: default, share: 100}]\n")
    gen = get_json(f"http://{admin}/v1/state")["generation"]
    path = run_dir / "config.yaml"
    path.write_text("slices: [{name: default, share: 90}]\n")  # shares must add up to 100
    wait_for(
        lambda: 'result="error"} 1' in http_get(f"http://{admin}/metrics")[1].decode(),
        what="rejected reload",
    )
    assert get_json(f"http://{admin}/v1/state")["generation"] == gen
    assert "slice shares must add up to 100, not 90" in proc.output()
    path.write_text(
        "slices:\n- {name: mobile, share: 40, match: {userAgent: iPhone}}\n"
        "- {name: default, share: 60}\n"
    )
    wait_for(lambda: get_json(f"http://{admin}/v1/state")["generation"] == gen + 1, what="reload")
    os.kill(proc.pid, signal.SIGHUP)  # an unchanged file on SIGHUP changes nothing
    time.sleep(0.3)
    assert get_json(f"http://{admin}/v1/state")["generation"] == gen + 1


def _acceptor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backdial.cli", "acceptor", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_bad_config_file_at_start_exits_1_with_one_line(run_dir: Path) -> None:
    path = run_dir / "bad.yaml"
    path.write_text("slices: [{name: Default!, share: 100}]\n")
    admin = f"127.0.0.1:{free_port()}"
    out = _acceptor_cli("--run-dir", str(run_dir), "--config", str(path), "--admin", admin)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("backdial: error: ") and "slices.0.name" in lines[0]
    )
    path.write_text("slices: [oops\n")
    out = _acceptor_cli("--run-dir", str(run_dir), "--config", str(path), "--admin", admin)
    assert out.returncode == 1 and "not valid YAML" in out.stderr


def test_route_cli(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("routes: [{name: base, service: web}]\n")

    def route(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            # The default channel: the UNIX admin socket in the run directory.
            [sys.executable, "-m", "backdial.cli", "route", "--run-dir", str(run_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    out = route("add", "api", "--service", "api", "--path-prefix", "/api/")
    assert out.returncode == 0, out.stderr
    assert "api\thost=*\tpathPrefix=/api/\tservice=api" in out.stdout
    listed = route("list").stdout
    assert "base" in listed and "api" in listed
    bad = route("add", "x", "--service", "api", "--path-prefix", "nope")
    assert bad.returncode == 1 and "pathPrefix must start with '/'" in bad.stderr
    # Routes added by the CLI survive a reload of the file.
    (run_dir / "config.yaml").write_text(
        "routes: [{name: base, service: web}, {name: other, service: o}]\n"
    )
    wait_for(lambda: len(get_json(f"http://{admin}/v1/routes")["routes"]) == 3, what="reload")
    assert route("del", "api").returncode == 0
    assert route("del", "api").returncode == 1
    names = [r["name"] for r in get_json(f"http://{admin}/v1/routes")["routes"]]
    assert names == ["base", "other"]
