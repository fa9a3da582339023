"""Container processes of the process kubelet, for real but without a cluster: namespaces,
bind mounts, signal forwarding, exit codes, no leftovers, exec and HTTP/TCP handlers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from kubelet.handlers import run_handler
from kubelet.probes import Action, Handler
from kubelet.process import BindMount, ContainerProcess, LaunchSpec, missing_tools

T = TypeVar("T")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(missing_tools()) or sys.platform != "linux",
    reason="needs root and util-linux unshare/nsenter (as on the process node)",
)


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), 30)

    return asyncio.run(bounded())


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for a file the container writes (polled: there is no event to wait on)."""
    for _ in range(1500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met within 30 s")


def _spec(tmp: Path, code: str, mounts: list[BindMount] | None = None) -> LaunchSpec:
    return LaunchSpec(
        argv=[sys.executable, "-c", code],
        env={"PATH": os.environ["PATH"], "MARK": "m1"},
        cwd="/",
        hostname="pod-a",
        mounts=mounts or [],
    )


async def _start(tmp: Path, name: str, spec: LaunchSpec) -> ContainerProcess:
    return await ContainerProcess.start(spec, tmp / f"{name}.json", tmp / f"{name}.log")


def test_mounts_hostname_env_and_exit_code(tmp_path: Path) -> None:
    shared = tmp_path / "vol"
    shared.mkdir()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.42.0.9\tsvc.ns.svc\n")
    target = f"/run/backdial-kubelet-{uuid.uuid4().hex[:8]}/vol"
    code = (
        "import os, socket\n"
        f"open('{target}/out', 'w').write(socket.gethostname() + ' ' + os.environ['MARK'])\n"
        "print(open('/etc/hosts').read(), os.getpid(), flush=True)\n"
        "raise SystemExit(3)\n"
    )
    mounts = [BindMount(str(hosts), "/etc/hosts"), BindMount(str(shared), target)]

    async def scenario() -> tuple[int, int]:
        proc = await _start(tmp_path, "c", _spec(tmp_path, code, mounts))
        return await proc.wait()

    assert _run(scenario) == (3, 0)
    assert (shared / "out").read_text() == "pod-a m1"
    log = (tmp_path / "c.log").read_text()
    assert "svc.ns.svc" in log and log.split()[-1] == "2"  # PID 2: the launcher is PID 1
    assert "svc.ns.svc" not in Path("/etc/hosts").read_text()  # the host's file is untouched
    # The missing mount point was made in the container's own layer, not on the host.
    assert not Path(target).parent.exists()


def test_a_mount_that_hides_another_source_does_not_break_it(tmp_path: Path) -> None:
    """An emptyDir over a directory holding another volume's source (the injected /tmp
    volume over the pod directory in the host's /tmp) once made the launcher create the
    other mount point as a *file* on the host, which broke every later pod."""
    over, hidden = tmp_path / "volumes" / "tmp", tmp_path / "volumes" / "run"
    over.mkdir(parents=True)
    hidden.mkdir()
    (hidden / "mark").write_text("seen")
    target = f"/run/backdial-kubelet-{uuid.uuid4().hex[:8]}"
    code = f"print(open('{target}/mark').read(), sorted(__import__('os').listdir('{tmp_path}')))"
    # In this order, the first mount covers the directory that holds the second's source.
    mounts = [BindMount(str(over), str(tmp_path)), BindMount(str(hidden), target)]

    async def scenario() -> tuple[int, int]:
        return await (await _start(tmp_path / "volumes", "c", _spec(tmp_path, code, mounts))).wait()

    assert _run(scenario) == (0, 0), (tmp_path / "volumes" / "c.log").read_text()
    assert "seen []" in (tmp_path / "volumes" / "c.log").read_text()
    assert not os.path.lexists(target)


def test_a_missing_mount_source_fails_the_setup_and_creates_nothing(tmp_path: Path) -> None:
    target = f"/run/backdial-kubelet-{uuid.uuid4().hex[:8]}/data"
    code = "print('ran', flush=True)"
    mounts = [BindMount(str(tmp_path / "no-such-volume"), target)]

    async def scenario() -> tuple[tuple[int, int], str]:
        proc = await _start(tmp_path, "c", _spec(tmp_path, code, mounts))
        return await proc.wait(), proc.setup_error()

    (code_and_signal, error) = _run(scenario)
    assert code_and_signal == (126, 0)
    assert error == f"mount source {tmp_path / 'no-such-volume'} does not exist"
    assert "ran" not in (tmp_path / "c.log").read_text()
    assert not os.path.lexists(Path(target).parent)


def test_sigterm_reaches_the_command_and_kill_leaves_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "orphan.pid"
    duration = f"1000.{uuid.uuid4().int % 10**9}"  # tells our sleeper from any other
    # The command starts a detached grandchild, then ignores SIGTERM.
    code = (
        "import os, signal, subprocess, sys, time\n"
        f"p = subprocess.Popen(['sleep', '{duration}'], start_new_session=True)\n"
        f"open('{marker}', 'w').write(str(p.pid))\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('TERM', flush=True))\n"
        "print('up', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )

    async def scenario() -> tuple[int, int]:
        proc = await _start(tmp_path, "c", _spec(tmp_path, code))
        log = tmp_path / "c.log"
        await _until(lambda: "up" in log.read_text())
        (sleeper,) = _sleepers(duration)  # the detached grandchild runs
        pidfd = os.pidfd_open(int(sleeper.name))
        proc.signal(signal.SIGTERM)
        await _until(lambda: "TERM" in log.read_text())
        assert not proc.exited
        proc.signal(signal.SIGKILL)
        result = await proc.wait()
        # The grandchild lived in the container's PID namespace: it dies with it. (The
        # kernel kills the rest of the namespace once its init, the launcher, is gone,
        # which may be a moment after `unshare` itself was reaped: wait for that exit.)
        await _exited(pidfd)
        return result

    assert _run(scenario) == (137, 9)
    assert _sleepers(duration) == []


async def _exited(pidfd: int) -> None:
    """The process behind *pidfd* ended (a pidfd turns readable then)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, 10)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _sleepers(duration: str) -> list[Path]:
    """Host processes running ``sleep <duration>``."""
    argv = f"sleep\x00{duration}\x00"
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p) == argv]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_text()
    except OSError:
        return ""


def test_unhandled_sigterm_ends_the_command_with_143(tmp_path: Path) -> None:
    code = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"

    async def scenario() -> tuple[int, int]:
        proc = await _start(tmp_path, "c", _spec(tmp_path, code))
        await _until(lambda: "up" in (tmp_path / "c.log").read_text())
        proc.signal(signal.SIGTERM)
        return await proc.wait()

    assert _run(scenario) == (143, 15)


def test_missing_executable_exits_127(tmp_path: Path) -> None:
    spec = LaunchSpec(["no-such-binary-xyz"], {"PATH": "/usr/bin"}, "/", "p", [])

    async def scenario() -> tuple[int, int]:
        return await (await _start(tmp_path, "c", spec)).wait()

    assert _run(scenario)[0] == 127
    assert "cannot run 'no-such-binary-xyz'" in (tmp_path / "c.log").read_text()


def test_handlers_http_tcp_and_exec_in_the_container(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    # A new top-level directory: the container gets a root of its own, which exec probes
    # (nsenter) must see too.
    target = f"/backdial-kubelet-{uuid.uuid4().hex[:8]}/probe"
    server = (
        "import http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/ok' else 500); self.end_headers()\n"
        "s = http.server.HTTPServer(('127.42.0.250', 0), H)\n"
        f"open('{target}/port', 'w').write(str(s.server_port))\n"
        "s.serve_forever()\n"
    )
    spec = _spec(tmp_path, server, [BindMount(str(volume), target)])

    async def scenario() -> list[bool]:
        proc = await _start(tmp_path, "c", spec)
        await _until(lambda: (volume / "port").exists() and bool((volume / "port").read_text()))
        port = int((volume / "port").read_text())
        ip = "127.42.0.250"

        async def check(handler: Handler, argv: list[str] | None = None) -> bool:
            return await run_handler(
                handler,
                pod_ip=ip,
                limit=2.0,
                exec_argv=argv or [],
                env={"PATH": os.environ["PATH"]},
            )

        results = [
            await check(Handler(Action.HTTP, port=port, path="/ok")),
            await check(Handler(Action.HTTP, port=port, path="/bad")),
            await check(Handler(Action.TCP, port=port)),
            await check(Handler(Action.TCP, port=1)),
            await check(Handler(Action.EXEC), proc.exec_argv(["test", "-f", f"{target}/port"])),
            await check(Handler(Action.EXEC), proc.exec_argv(["test", "-f", f"{target}/nope"])),
        ]
        proc.signal(signal.SIGKILL)
        await proc.wait()
        return results

    assert _run(scenario) == [True, False, True, False, True, False]
    assert not os.path.lexists(Path(target).parent)  # only inside the container
