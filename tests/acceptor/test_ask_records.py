"""ASK and its answers on the wire (control revision 3), against a real acceptor.

The workers are raw control peers built from docs/protocol.md; the sessions are real
registrations.  A request that may not wait gets a session idle at the acceptor, or one
another worker held idle (asked back with RECALL ``now``), or a REFUSE; workers older
than revision 3 are never asked and may not ask.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.acceptor.conftest import PRE, RawWorker, metric_value
from tests.helpers import register, wait_for

from backdial import control

KEY = ("", "default")


def worker(run_dir: Path, revision: int | None = control.REVISION) -> RawWorker:
    peer = RawWorker(run_dir)
    hello = (
        control.Hello(os.getpid(), "raw")
        if revision is None
        else control.Hello(os.getpid(), "raw", revision)
    )
    peer.send(hello)
    config, _ = peer.recv(control.ConfigMsg)
    assert isinstance(config, control.ConfigMsg) and config.revision == control.REVISION
    return peer


def granted(peer: RawWorker) -> control.Granted:
    msg, fds = peer.recv(control.Grant)
    assert isinstance(msg, control.Grant) and len(fds) == len(msg.leases) == 1
    for fd in fds:
        os.close(fd)
    return msg.leases[0]


def test_an_ask_is_granted_from_idle_sessions_or_probed_or_refused(
    acceptor,  # type: ignore[no-untyped-def]
    run_dir: Path,
) -> None:
    _, admin, _ = acceptor("limits: {leasePrefetch: 0}\n")
    service = register(run_dir / "register.sock", PRE)[0]
    a, b = worker(run_dir), worker(run_dir)

    # Idle at the acceptor: granted at once, an ``asked`` entry (no WANT unit).
    a.send(control.Ask(*KEY, 1))
    lease = granted(a)
    assert lease.asked and not lease.prefetch and lease.slice == "default"

    # Held by A: B's ask makes the acceptor ask A for it now; A had it idle.
    b.send(control.Ask(*KEY, 1))
    probe, _ = a.recv(control.Recall)
    assert probe == control.Recall("demo", 1, "default", now=True)
    a.send(control.Release([control.Released(lease.session, control.ReleaseState.IDLE)], 1))
    assert granted(b).session == lease.session

    # Held by B and busy there: A's ask is refused once B answered it has nothing idle.
    a.send(control.Ask(*KEY, 2))
    probe, _ = b.recv(control.Recall)
    assert probe == control.Recall("demo", 1, "default", now=True)
    b.send(control.Release([], answers=1))
    refused, _ = a.recv(control.Refuse)
    assert refused == control.Refuse(*KEY, 2)
    wait_for(
        lambda: (
            metric_value(admin, 'backdial_acceptor_asks_total{result="refused"}') == 2
            and metric_value(admin, 'backdial_acceptor_asks_total{result="granted"}') == 2
            and metric_value(admin, "backdial_acceptor_ask_probes_total") == 2
        ),
        what="asks counted",
    )
    a.close()
    b.close()
    service.close()


def test_older_workers_are_never_probed_and_may_not_ask(
    acceptor,  # type: ignore[no-untyped-def]
    run_dir: Path,
) -> None:
    _, admin, _ = acceptor("limits: {leasePrefetch: 0}\n")
    service = register(run_dir / "register.sock", PRE)[0]
    old = worker(run_dir, revision=None)  # HELLO without a revision: 1
    old.send(control.Want(*KEY, 1))
    assert not granted(old).asked
    new = worker(run_dir)
    new.send(control.Ask(*KEY, 1))
    # It would not answer a RECALL now: the ask is refused without asking it.
    refused, _ = new.recv(control.Refuse)
    assert refused == control.Refuse(*KEY, 1)
    assert not any(isinstance(m, control.Recall) for m in old.pending())
    # An ASK from a worker below revision 3 breaks the protocol: disconnected.
    old.send(control.Ask(*KEY, 1))
    assert old.closed_by_peer()
    wait_for(
        lambda: metric_value(admin, 'backdial_acceptor_control_violations_total{kind="ask"}') == 1,
        what="the violation counted",
    )
    new.close()
    old.close()
    service.close()
