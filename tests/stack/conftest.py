"""A data-plane stack of real processes for the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Proc, free_port, get_json, http_get, metric, wait_for


class Stack:
    def __init__(self, start: Callable[..., Proc], run_dir: Path) -> None:
        self._start = start
        self.run_dir = run_dir
        self.port = free_port()
        self.acceptor_admin = f"127.0.0.1:{free_port()}"
        self.sidecar_admin = f"127.0.0.1:{free_port()}"
        self.config_path = run_dir / "config.yaml"
        self.acceptor: Proc
        self.sidecar: Proc
        self.services: list[Proc] = []

    def acceptor_url(self, path: str) -> str:
        return f"http://{self.acceptor_admin}{path}"

    def sidecar_url(self, path: str) -> str:
        return f"http://{self.sidecar_admin}{path}"

    def registered(self) -> int:
        services = get_json(self.acceptor_url("/v1/state"))["services"]
        return sum(s["registered"] for s in services.values())

    def leased(self) -> int:
        """Sessions leased to sidecar workers now (the acceptor's count)."""
        services = get_json(self.acceptor_url("/v1/state"))["services"]
        return sum(s["leased"] for s in services.values())

    def generation(self) -> int:
        return int(get_json(self.acceptor_url("/v1/state"))["generation"])

    def waiting_in_sidecar(self) -> int:
        """Requests queued inside the sidecar worker(s) now (their own count)."""
        state = get_json(self.sidecar_url("/v1/state"))
        workers = state.get("workers", [state])
        return sum(sum(w["waiting"].values()) for w in workers)

    def sidecar_metric(self, name: str, **labels: str) -> float:
        return metric(http_get(self.sidecar_url("/metrics"))[1].decode(), name, **labels)

    def restart_acceptor(self) -> None:
        self.acceptor = self._start(
            "acceptor",
            "--run-dir",
            str(self.run_dir),
            "--admin",
            self.acceptor_admin,
            "--config",
            str(self.config_path),
            "--reload-interval",
            "0.1",
            name="acceptor",
        )
        wait_for(lambda: http_get(self.acceptor_url("/healthz"))[0] == 200, what="acceptor")

    def restart_sidecar(
        self,
        keep_old: bool = False,
        workers: int = 1,
        wait: bool = True,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        if keep_old:
            self.sidecar_admin = f"127.0.0.1:{free_port()}"
        self.sidecar = self._start(
            "sidecar",
            "--run-dir",
            str(self.run_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin",
            self.sidecar_admin,
            "--workers",
            str(workers),
            "--drain-timeout",
            "10",
            *extra,
            name="sidecar",
            env=env,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        wait_for(
            lambda: http_get(self.sidecar_url("/readyz"))[0] == 200,
            timeout=20,
            what="sidecar ready",
        )

    def service(self, instance: str, sessions: int, admin: str | None = None) -> Proc:
        args = [
            "serve",
            "backdial.demo:app",
            "--register",
            f"unix://{self.run_dir}/register.sock",
            "--sessions",
            str(sessions),
            "--service",
            "demo",
            "--instance",
            instance,
        ]
        if admin:
            args += ["--admin", admin]
        proc = self._start(*args, name=f"serve-{instance}", env={"BACKDIAL_INSTANCE": instance})
        self.services.append(proc)
        return proc

    def start(self, sessions: int, config: str = "", workers: int = 1) -> None:
        self.config_path.write_text(config or "slices: [{name: default, share: 100}]\n")
        self.restart_acceptor()
        if sessions:
            self.service("main", sessions)
            wait_for(lambda: self.registered() == sessions, what=f"{sessions} sessions")
            self.restart_sidecar(workers=workers)
        else:
            # Services come later; the sidecar is ready once they register.
            self.restart_sidecar(workers=workers, wait=False)

    def metric(self, name: str, **labels: str) -> float:
        return metric(http_get(self.acceptor_url("/metrics"))[1].decode(), name, **labels)

    def wait_metric(self, value: float, name: str, **labels: str) -> None:
        wait_for(lambda: self.metric(name, **labels) == value, what=f"{name}{labels} == {value}")


@pytest.fixture
def stack(procs: Callable[..., Proc], run_dir: Path) -> Iterator[Stack]:
    yield Stack(procs, run_dir)
