"""``cpupolicy``: the decision, AUTO per engine, and the switch on a real thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from backdial.sidecar.cpupolicy import CpuPolicy, CpuSwitch, wanted
from backdial.sidecar.stats import ProxyStats


def on_thread(fn: Callable[[], object]) -> object:
    """Run *fn* on a thread of its own: a policy set there leaves pytest's thread alone."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_batch_is_wanted_only_while_requests_wait_on_busy_cpus() -> None:
    assert wanted(CpuPolicy.BATCH, True, waited=False, held=False) is CpuPolicy.NORMAL
    assert wanted(CpuPolicy.BATCH, True, waited=True, held=False) is CpuPolicy.BATCH
    assert wanted(CpuPolicy.BATCH, True, waited=False, held=True) is CpuPolicy.BATCH
    # Requests wait, but the CPUs have idle time: the services wait on something else,
    # and a hand-off delayed behind their burst would leave sessions idle.
    assert wanted(CpuPolicy.BATCH, False, waited=True, held=True) is CpuPolicy.NORMAL
    assert wanted(CpuPolicy.NORMAL, True, waited=True, held=True) is CpuPolicy.NORMAL


def test_auto_is_batch_on_the_native_engine_only() -> None:
    assert CpuPolicy.AUTO.resolved(native=True) is CpuPolicy.BATCH
    assert CpuPolicy.AUTO.resolved(native=False) is CpuPolicy.NORMAL
    assert CpuPolicy.BATCH.resolved(native=False) is CpuPolicy.BATCH
    assert CpuPolicy.NORMAL.resolved(native=True) is CpuPolicy.NORMAL
    assert CpuSwitch(CpuPolicy.AUTO).queued is CpuPolicy.NORMAL  # the python engine's


def test_switch_follows_waiting_and_samples_on_the_calling_thread_only() -> None:
    stats = ProxyStats()

    def run() -> list[int]:
        switch = CpuSwitch(CpuPolicy.BATCH, stats)
        seen = [os.sched_getscheduler(0)]
        switch.waits()  # CPUs not known to be busy yet: no switch
        seen.append(os.sched_getscheduler(0))
        switch.sample(True, 1)  # saturated, requests waiting
        seen.append(os.sched_getscheduler(0))
        switch.waits()  # the queue emptied for a moment and fills again: still batch
        seen.append(os.sched_getscheduler(0))
        switch.sample(True, 0)  # requests waited in the window that ended: held
        seen.append(os.sched_getscheduler(0))
        switch.sample(True, 0)  # a whole window without waiting: normal
        seen.append(os.sched_getscheduler(0))
        switch.waits()
        seen.append(os.sched_getscheduler(0))
        switch.sample(False, 3)  # idle CPU time: normal although requests wait
        seen.append(os.sched_getscheduler(0))
        return seen

    b, o = os.SCHED_BATCH, os.SCHED_OTHER
    assert on_thread(run) == [o, o, b, b, b, o, b, o]
    assert stats.cpu_policy_switches == 4
    assert stats.cpu_policy_refused == 0
    assert os.sched_getscheduler(0) == o  # pytest's own thread untouched


def test_normal_never_calls_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("sched_setscheduler called")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    switch = CpuSwitch(CpuPolicy.NORMAL)
    for waiting in (1, 0, 7, 0):
        switch.sample(True, waiting)
        switch.waits()
    assert switch.applied is CpuPolicy.NORMAL


def test_a_refused_switch_turns_the_feature_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # No seccomp profile can be installed on the test process, so the kernel's refusal
    # (EPERM from a profile that forbids sched_setscheduler) is simulated here.
    calls: list[int] = []

    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        calls.append(policy)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    stats = ProxyStats()
    switch = CpuSwitch(CpuPolicy.BATCH, stats)
    switch.sample(True, 1)
    switch.sample(True, 0)
    switch.sample(True, 2)
    assert calls == [os.SCHED_BATCH]  # tried once, then off
    assert switch.queued is CpuPolicy.NORMAL and switch.applied is CpuPolicy.NORMAL
    assert (stats.cpu_policy_switches, stats.cpu_policy_refused) == (0, 1)
