"""The worker's scheduling policy follows its queue (``--queued-cpu-policy``).

While a request waits for a session and the worker's CPUs have no idle time, a worker
on ``batch`` runs ``SCHED_BATCH`` so that its wake-ups do not preempt the services; as
soon as nothing waits it is back on ``SCHED_OTHER``.  ``auto`` (the default) is
``batch`` on the native engine and ``normal`` on the python engine; ``normal`` never
switches.

Real acceptor, sidecar and demo service processes.  The sidecar is confined to one CPU
(it inherits the test's affinity, set for its start) that a busy-looping process keeps
saturated, so the CPU is really contended.  The policy is read from the kernel
(``sched_getscheduler`` of the worker's loop thread, the process's main thread with
``--workers 1``), the waiting count from the worker's own ``/v1/state``.  That an idle
CPU keeps the worker normal is checked in tests/sidecar/test_cpupolicy.py: here the
machine's other load could fill any CPU.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from backdial.sidecar import engine
from tests.helpers import get_json, wait_for
from tests.stack.conftest import Stack

pytestmark = pytest.mark.slow

NATIVE = engine.choose(os.environ.get("BACKDIAL_ENGINE", "auto"))[0] is engine.Kind.NATIVE
CONFIG = "slices: [{name: default, share: 100, queue: {maxWaiting: 8, timeout: 60s}}]\n"
HOLD = "/delay?ms=4000"  # holds the one session while the test looks (a bound, not a pace)


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=90)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def policy_of(pid: int) -> int:
    return os.sched_getscheduler(pid)


@pytest.fixture
def busy_cpu() -> Iterator[int]:
    """One CPU of ours, kept without idle time by a busy loop for the test."""
    cpu = max(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        yield cpu
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.parametrize(
    ("given", "batch"),
    [
        ("batch", True),
        ("normal", False),
        ("auto", NATIVE),
    ],
)
def test_worker_runs_batch_only_while_requests_wait(
    stack: Stack, busy_cpu: int, given: str, batch: bool
) -> None:
    stack.config_path.write_text(CONFIG)
    stack.restart_acceptor()
    stack.service("main", 1)
    wait_for(lambda: stack.registered() == 1, what="1 session")
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {busy_cpu})  # the sidecar inherits it
    try:
        stack.restart_sidecar(extra=("--queued-cpu-policy", given))
    finally:
        os.sched_setaffinity(0, mine)
    pid = int(get_json(stack.sidecar_url("/v1/state"))["pid"])
    assert policy_of(pid) == os.SCHED_OTHER

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # The first request holds the only session; the second waits in the worker.
        held = pool.submit(get, stack.port, HOLD)
        wait_for(lambda: get_json(stack.sidecar_url("/v1/state"))["busy"] == 1, what="busy")
        waiting = pool.submit(get, stack.port, "/")
        wait_for(lambda: stack.waiting_in_sidecar() == 1, what="one request waiting")
        if batch:  # at the next sample of the CPU (every cpuload.WINDOW)
            wait_for(lambda: policy_of(pid) == os.SCHED_BATCH, what="SCHED_BATCH")
        else:
            assert policy_of(pid) == os.SCHED_OTHER

        # The held request ends: the waiting one is served on the same session, the queue
        # is empty, and the worker is back to normal.
        assert held.result(timeout=60) == 200
        assert waiting.result(timeout=60) == 200
    wait_for(lambda: stack.waiting_in_sidecar() == 0, what="nothing waiting")
    wait_for(lambda: policy_of(pid) == os.SCHED_OTHER, what="back to SCHED_OTHER")
    # Every wait counted: there and back (the first request may have waited for the
    # worker's first grant too); none at all when the policy stays normal.
    switches = stack.sidecar_metric("backdial_sidecar_cpu_policy_switches_total")
    if batch:
        assert switches >= 2 and switches % 2 == 0
    else:
        assert switches == 0
    assert stack.sidecar_metric("backdial_sidecar_cpu_policy_refused_total") == 0
