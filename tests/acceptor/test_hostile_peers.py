"""The acceptor against faulty and hostile peers (issue 12): each test replays an attack.

Peers are raw sockets speaking docs/protocol.md, the acceptor a real process.
Each test fails on the code before the fix: the fault it replays then wedged,
leaked or re-routed something.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.acceptor.conftest import PRE, RawWorker, fd_count, metric_value, services
from tests.helpers import free_port, get_json, http_get, register, wait_for

from backdial import control, wire

BAD_STATS = [
    {"x": "nan-string"},
    {"x": float("nan")},  # json.dumps writes NaN, which json.loads accepts
    {"x": -1},
    {"x": [1]},
]


def _lease_one(run_dir: Path) -> RawWorker:
    worker = RawWorker(run_dir)
    worker.send(control.Hello(os.getpid(), "hostile"))
    worker.send(control.Want("", "default", 1))
    _, fds = worker.recv(control.Grant)
    for fd in fds:
        os.close(fd)
    return worker


@pytest.mark.parametrize("counters", BAD_STATS, ids=["string", "nan", "negative", "list"])
def test_malformed_stats_disconnects_the_peer_and_reclaims_its_leases(
    acceptor, run_dir: Path, counters: dict[str, object]
) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("limits: {leasePrefetch: 0}\n")
    socks = [register(run_dir / "register.sock", PRE)[0] for _ in range(3)]
    for round_ in range(3):  # each round used to strand one more session
        worker = _lease_one(run_dir)
        wait_for(lambda: services(admin)["demo"]["leased"] == 1, what="a lease")
        body = json.dumps({"counters": counters}).encode()
        worker.send_raw(bytes((control.VERSION, control.Kind.STATS)) + body)
        assert worker.closed_by_peer(), f"round {round_}: bad STATS was accepted"
        worker.close()
        # Nothing stays leased to a worker that is gone: the session was reclaimed.
        wait_for(lambda: not get_json(f"http://{admin}/v1/state")["workers"], what="gone")
        assert services(admin)["demo"]["leased"] == 0
    assert services(admin)["demo"]["registered"] == 0  # all three reclaimed (shut down)
    assert all(s.recv(10) == b"" for s in socks)


def test_stats_with_odd_keys_never_break_metrics(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    worker = RawWorker(run_dir)
    worker.send(control.Hello(os.getpid(), "odd"))
    odd = {"rejected|x": 1, "rejected": 2, "rejected|default|bogus": 3, "wait_bucket|x": 4}
    worker.send(control.Stats({**odd, "rejected|default|timeout": 5}))
    wait_for(
        lambda: (
            metric_value(
                admin, 'backdial_requests_rejected_total{slice="default",reason="timeout"}'
            )
            == 5
        ),
        what="the well-formed counter",
    )
    text = http_get(f"http://{admin}/metrics")[1].decode()
    assert "bogus" not in text and 'slice="x"' not in text  # odd keys make no labels
    worker.close()
    wait_for(lambda: not get_json(f"http://{admin}/v1/state")["workers"], what="gone")
    assert http_get(f"http://{admin}/metrics")[0] == 200


def test_listen_with_a_non_socket_fd_leaks_nothing(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    proc, admin, _ = acceptor()
    worker = RawWorker(run_dir)
    worker.send(control.Hello(os.getpid(), "leaky"))
    worker.recv(control.ConfigMsg)
    before = fd_count(proc.pid)
    read_end, write_end = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(20):
            fd = (read_end, write_end, udp.fileno())[i % 3]
            worker.send_raw(control.encode(control.Listen(f"127.0.0.1:{i + 1}")), [fd])
        wait_for(
            lambda: (
                metric_value(admin, 'backdial_acceptor_control_violations_total{kind="listen_fd"}')
                == 20
            ),
            what="20 refused descriptors",
        )
        wait_for(lambda: fd_count(proc.pid) == before, what=f"{before} descriptors")
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        udp.close()
        worker.close()


def test_a_peer_that_stops_reading_is_disconnected(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    proc, admin, _ = acceptor()
    worker = RawWorker(run_dir)
    worker.send(control.Hello(os.getpid(), "deaf"))
    address = f"127.0.0.1:{free_port()}"
    baseline = fd_count(proc.pid)
    # Every LISTENER reply carries a duplicate of the listening socket; never read them.
    sent = 0
    try:
        for _ in range(4000):
            worker.send(control.Listen(address))
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass  # disconnected while we were still sending: what the test wants
    wait_for(
        lambda: (
            metric_value(admin, 'backdial_acceptor_control_violations_total{kind="not_reading"}')
            == 1
        ),
        what="the deaf peer disconnected",
    )
    assert sent > 1024
    # Its queued duplicates went with it: one listener more than before, no pile.
    wait_for(lambda: fd_count(proc.pid) <= baseline + 1, what="queued descriptors closed")
    worker.close()


def test_hello_flood_does_not_dilute_the_serving_worker(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("slices: [{name: default, share: 100, queue: {maxWaiting: 100}}]\n")
    real = RawWorker(run_dir)
    real.send(control.Hello(os.getpid(), "real"))
    real.send(control.Listen(f"127.0.0.1:{free_port()}"))
    real.recv(control.Listener)
    flood = []
    for i in range(150):
        peer = RawWorker(run_dir)
        peer.send(control.Hello(os.getpid(), f"flood-{i}"))
        flood.append(peer)
    wait_for(
        lambda: len(get_json(f"http://{admin}/v1/state")["workers"]) == 151, what="151 workers"
    )
    configs = [m for m in real.pending() if isinstance(m, control.ConfigMsg)]
    assert configs, "no CONFIG after the flood"
    assert (configs[-1].workers, configs[-1].index) == (1, 0)  # the whole maxWaiting
    for peer in flood:
        peer.close()
    real.close()


def test_control_connections_are_bounded(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor()
    peers = [RawWorker(run_dir) for _ in range(260)]
    for peer in peers:
        peer.send(control.Hello(os.getpid(), "many"))
    wait_for(
        lambda: (
            metric_value(admin, 'backdial_acceptor_control_violations_total{kind="workers"}') == 4
        ),
        what="4 refused",
    )
    assert len(get_json(f"http://{admin}/v1/state")["workers"]) == 256
    for peer in peers:
        peer.close()


def test_silent_control_peers_are_dropped(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("limits: {preambleTimeout: 200ms}\n")
    silent = RawWorker(run_dir)
    assert silent.closed_by_peer()
    assert metric_value(admin, 'backdial_acceptor_control_violations_total{kind="hello"}') == 1
    silent.close()


def test_want_is_bounded(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("slices: [{name: default, share: 100, queue: {maxWaiting: 100}}]\n")
    greedy = RawWorker(run_dir)
    greedy.send(control.Hello(os.getpid(), "greedy"))
    greedy.send(control.Want("", "default", 1_000_000))
    wait_for(lambda: get_json(f"http://{admin}/v1/state")["queue_depth"] == 100, what="clamped")
    assert (
        metric_value(admin, 'backdial_acceptor_control_violations_total{kind="want_clamped"}') == 1
    )
    # Beyond any possible queue: a protocol error.
    greedy.send_raw(
        bytes((control.VERSION, control.Kind.WANT))
        + b'{"service": "", "slice": "default", "n": 1000001}'
    )
    assert greedy.closed_by_peer()
    greedy.close()
    # Distinct keys are bounded too.
    spread = RawWorker(run_dir)
    spread.send(control.Hello(os.getpid(), "spread"))
    for i in range(300):
        try:
            spread.send(control.Want(f"svc{i}", "default", 1))
        except (BrokenPipeError, ConnectionResetError):
            break
    assert spread.closed_by_peer()
    assert metric_value(admin, 'backdial_acceptor_control_violations_total{kind="want_keys"}') == 1
    spread.close()


def _as_other_user(script: str) -> subprocess.CompletedProcess[str]:
    """Run *script* in a child that dropped to uid/gid 65534 (nobody) first."""
    # Modules first: the interpreter's files need not be readable by nobody.
    prelude = "import os, socket; os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=30
    )


def test_sockets_are_private_by_default(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    acceptor()
    for name in ("register.sock", "control.sock"):
        assert os.stat(run_dir / name).st_mode & 0o777 == 0o600, name


def test_peer_uids_are_checked(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # Allow only a uid that is not ours: our own connections must be refused.
    other = "4242" if os.getuid() != 4242 else "4343"
    _, admin, _ = acceptor(extra=("--register-uids", other, "--control-uids", other))
    for name in ("register.sock", "control.sock"):
        assert os.stat(run_dir / name).st_mode & 0o777 == 0o666, name
    _, reply = register(run_dir / "register.sock", b"")  # refused before any preamble
    assert reply.startswith(b"BDREG/1 ERR auth"), reply
    worker = RawWorker(run_dir)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        worker.send(control.Hello(os.getpid(), "intruder"))
    assert worker.closed_by_peer()
    worker.close()
    assert metric_value(admin, 'backdial_acceptor_peers_refused_total{socket="register"}') == 1
    assert metric_value(admin, 'backdial_acceptor_peers_refused_total{socket="control"}') == 1
    assert services(admin) == {} and get_json(f"http://{admin}/v1/state")["workers"] == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused_by_peer_credentials(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # Mode 0666 (two uids allowed) lets nobody connect; SO_PEERCRED still refuses it.
    _, admin, _ = acceptor(extra=("--control-uids", "self,4242", "--register-uids", "self,4242"))
    os.chmod(run_dir, 0o755)
    out = _as_other_user(
        f"s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect({str(run_dir)!r} + "
        "'/register.sock')\n"
        "print(s.recv(200))\n"  # refused at accept: ERR auth without reading a preamble
        f"c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); c.connect({str(run_dir)!r} + "
        "'/control.sock')\n"
        "print(repr(c.recv(100)))\n"
    )
    assert out.returncode == 0, out.stderr
    assert "ERR auth" in out.stdout and out.stdout.strip().endswith("b''"), out.stdout
    assert metric_value(admin, 'backdial_acceptor_peers_refused_total{socket="control"}') == 1
    # The acceptor's own uid is still welcome.
    assert register(run_dir / "register.sock", PRE)[1].startswith(b"BDREG/1 OK")


def test_service_names_are_forgotten_and_bounded(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("limits: {maxServices: 8, forgetServicesAfter: 600s}\n")
    live = [register(run_dir / "register.sock", PRE)[0]]  # one service stays
    sizes = []
    for i in range(300):
        name = f"svc-{i}"
        sock, reply = register(run_dir / "register.sock", wire.Preamble(name, "a").encode())
        assert reply.startswith(b"BDREG/1 OK"), (i, reply)
        sock.close()
        wait_for(lambda n=name: services(admin).get(n, {}).get("registered") == 0, what="drop")  # type: ignore[misc]
        if i in (20, 299):
            sizes.append(len(http_get(f"http://{admin}/metrics")[1]))
    assert len(services(admin)) <= 8
    text = http_get(f"http://{admin}/metrics")[1].decode()
    assert len(set(re.findall(r'service="([^"]+)"', text))) <= 8
    assert sizes[1] - sizes[0] < 100  # only counter digits grew, not the names seen
    # Eight live services fill the table: a ninth name is refused, not added.
    for i in range(7):
        live.append(
            register(run_dir / "register.sock", wire.Preamble(f"live-{i}", "a").encode())[0]
        )
    _, reply = register(run_dir / "register.sock", wire.Preamble("ninth", "a").encode())
    assert reply.startswith(b"BDREG/1 ERR limit"), reply
    for s in live:
        s.close()


def test_unused_service_names_expire(acceptor, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, admin, _ = acceptor("limits: {forgetServicesAfter: 0s}\n")
    for i in range(5):
        sock, _ = register(run_dir / "register.sock", wire.Preamble(f"gone-{i}", "a").encode())
        sock.close()
    wait_for(lambda: services(admin) == {}, what="expired services")
    assert metric_value(admin, "backdial_acceptor_services_forgotten_total") == 5
    assert "gone-" not in http_get(f"http://{admin}/metrics")[1].decode()
