"""Supervision of one container: start, probes, restarts with back-off, graceful stop.

A :class:`ContainerRunner` owns a container's runs. Each run gets its startup probe (until
it passes: ``started``), then its readiness and liveness probes; a failed liveness or
startup probe stops the run gracefully and the restart policy decides what follows. A
stop (pod deletion) runs the ``preStop`` hook, sends SIGTERM, waits until the deadline and
then sends SIGKILL. The runner only updates its :class:`ContainerRecord` and tells the pod
(``changed``); the pod worker turns records into status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .handlers import run_handler
from .plan import ConfigError, ContainerKind, ContainerPlan, map_command
from .policy import Backoff, should_restart
from .probes import Action, ProbeKind, ProbeSpec, ProbeTracker, next_run, parse_handler, parse_probe
from .process import ContainerProcess, LaunchSpec
from .status import ContainerRecord

log = logging.getLogger("kubelet.containers")

#: A preStop hook that overran the deadline still leaves SIGTERM this long to work.
MIN_TERM_GRACE = 2.0
#: Waiting reason of a container the launcher could not set up (e.g. a missing mount source).
CREATE_CONTAINER_ERROR = "CreateContainerError"


class PodHost(Protocol):
    """What a runner needs from its pod."""

    pod_ip: str
    python: str
    backoff: Backoff

    @property
    def restart_policy(self) -> str: ...
    @property
    def termination_grace(self) -> float: ...

    def launch_spec(self, plan: ContainerPlan) -> LaunchSpec: ...
    def paths(self, plan: ContainerPlan) -> tuple[Path, Path]: ...  # (spec file, log file)
    def changed(self) -> None: ...
    async def config_changed(self, limit: float) -> None: ...
    def now(self) -> str: ...


@dataclass
class _Run:
    proc: ContainerProcess
    env: Mapping[str, str]
    exit: asyncio.Task[tuple[int, int]]


class ContainerRunner:
    """Runs one container of a pod until it is stopped or done for good."""

    def __init__(self, host: PodHost, plan: ContainerPlan, record: ContainerRecord) -> None:
        self.host = host
        self.plan = plan
        self.record = record
        self.started = asyncio.Event()  # the startup probe passed (once is enough)
        self.finished = asyncio.Event()  # no further run will happen
        self._stopping = False
        self._wake = asyncio.Event()
        self._run: _Run | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"container {self.plan.name}")

    # -- runs -------------------------------------------------------------------------------

    async def _launch(self) -> _Run | None:
        try:
            spec = self.host.launch_spec(self.plan)
        except ConfigError as exc:
            self.record.wait("CreateContainerConfigError", str(exc))
            self.host.changed()
            return None
        spec_file, log_file = self.host.paths(self.plan)
        proc = await ContainerProcess.start(spec, spec_file, log_file, self.host.python)
        self.record.run(proc.container_id, self.host.now())
        self.host.changed()
        return _Run(proc, spec.env, asyncio.create_task(proc.wait()))

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        crashes = 0
        try:
            while not self._stopping:
                run = await self._launch()
                if run is None:
                    await self.host.config_changed(limit=2.0)
                    continue
                self._run = run
                if self._stopping:  # stop() came while the run was being launched
                    run.proc.signal(signal.SIGKILL)
                began = loop.time()
                probing = asyncio.create_task(self._probe(run))
                exit_code, sig = await run.exit
                probing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probing
                kind = self.plan.kind
                crashes = self.host.backoff.crashes_after(crashes, loop.time() - began)
                delay = self.host.backoff.delay(crashes)
                failure = run.proc.setup_error()
                if failure:
                    # Never ran (a mount failed): retried with back-off whatever the
                    # restart policy, as the kubelet retries a container it cannot create.
                    self.record.wait(CREATE_CONTAINER_ERROR, failure)
                    self.host.changed()
                    if self._stopping:
                        break
                else:
                    self.record.terminate(exit_code, sig, self.host.now())
                    self.host.changed()
                    policy = self.host.restart_policy
                    if self._stopping or not should_restart(kind, policy, exit_code):
                        break
                    self.record.wait(
                        "CrashLoopBackOff", f"back-off {delay:g}s restarting {kind.value}"
                    )
                    self.host.changed()
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                if not self._stopping and not failure:
                    self.record.restart_count += 1
        finally:
            self.finished.set()

    # -- probes -----------------------------------------------------------------------------

    def _probe_spec(self, kind: ProbeKind) -> ProbeSpec | None:
        raw = self.plan.probe(kind.value)
        return parse_probe(kind, raw, self.plan.ports) if raw else None

    async def _check(self, run: _Run, spec: ProbeSpec) -> bool:
        handler = spec.handler
        argv: list[str] = []
        if handler.action is Action.EXEC:
            try:
                argv = run.proc.exec_argv(map_command(handler.command, self.host.python))
            except (ProcessLookupError, ConfigError):
                return False
        return await run_handler(
            handler, pod_ip=self.host.pod_ip, limit=spec.timeout, exec_argv=argv, env=run.env
        )

    async def _until_verdict(
        self, run: _Run, spec: ProbeSpec, on_change: Callable[[bool], bool]
    ) -> None:
        """Run ``spec`` periodically; stop when ``on_change`` (called on each verdict
        change) returns True."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(spec.initial_delay)
        tracker = ProbeTracker(spec)
        while True:
            began = loop.time()
            ok = await self._check(run, spec)
            if tracker.record(ok) and tracker.result is not None and on_change(tracker.result):
                return
            await asyncio.sleep(max(0.0, next_run(began, spec, loop.time()) - loop.time()))

    async def _probe(self, run: _Run) -> None:
        try:
            startup = self._probe_spec(ProbeKind.STARTUP)
            readiness = self._probe_spec(ProbeKind.READINESS)
            liveness = self._probe_spec(ProbeKind.LIVENESS)
        except ConfigError as exc:
            log.warning("%s: bad probe: %s", self.plan.name, exc)
            return
        if startup is not None:
            passed: list[bool] = []

            def startup_verdict(ok: bool) -> bool:
                passed.append(ok)
                return True

            await self._until_verdict(run, startup, startup_verdict)
            if not passed[-1]:
                await self._restart(run, "startup probe failed")
                return
        self.record.started = True
        self.started.set()
        if readiness is None:
            self.record.ready = True
        self.host.changed()
        loops = []
        if readiness is not None:

            def readiness_verdict(ok: bool) -> bool:
                self.record.ready = ok
                self.host.changed()
                return False

            loops.append(self._until_verdict(run, readiness, readiness_verdict))
        if liveness is not None:
            loops.append(self._until_verdict(run, liveness, lambda ok: not ok))
        if not loops:
            return
        if liveness is None:
            await asyncio.gather(*loops)
            return
        live = asyncio.ensure_future(loops[-1])
        others = [asyncio.ensure_future(c) for c in loops[:-1]]
        try:
            await live
        finally:
            for task in others:
                task.cancel()
        await self._restart(run, "liveness probe failed")

    async def _restart(self, run: _Run, why: str) -> None:
        log.info("%s: %s; killing the container", self.plan.name, why)
        loop = asyncio.get_running_loop()
        self.record.ready = False
        self.host.changed()
        # Shielded: the probe task is cancelled once the run has ended.
        await asyncio.shield(self._stop_run(run, loop.time() + self.host.termination_grace, True))

    # -- stopping ---------------------------------------------------------------------------

    async def _stop_run(self, run: _Run, deadline: float, pre_stop: bool) -> None:
        loop = asyncio.get_running_loop()
        hook = self.plan.pre_stop if pre_stop else None
        if hook is not None and not run.exit.done():
            with contextlib.suppress(ConfigError, asyncio.TimeoutError):
                handler = parse_handler(hook, self.plan.ports)
                argv: list[str] = []
                if handler.action is Action.EXEC:
                    with contextlib.suppress(ProcessLookupError):
                        argv = run.proc.exec_argv(map_command(handler.command, self.host.python))
                budget = max(0.1, deadline - loop.time())
                await asyncio.wait_for(
                    run_handler(
                        handler,
                        pod_ip=self.host.pod_ip,
                        limit=budget,
                        exec_argv=argv,
                        env=run.env,
                    ),
                    budget,
                )
            deadline = max(deadline, loop.time() + MIN_TERM_GRACE)
        run.proc.signal(signal.SIGTERM)
        done, _ = await asyncio.wait({run.exit}, timeout=max(0.0, deadline - loop.time()))
        if not done:
            run.proc.signal(signal.SIGKILL)
            await run.exit

    async def stop(self, deadline: float, *, pre_stop: bool = True) -> None:
        """Stop for good: no more restarts; the current run is stopped gracefully."""
        self._stopping = True
        self._wake.set()
        run = self._run
        if run is not None and not run.exit.done():
            await self._stop_run(
                run, deadline, pre_stop and self.plan.kind is not ContainerKind.INIT
            )
        if self._task is not None:
            await self._task
