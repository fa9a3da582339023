"""The acceptor under test as a real process, and a control peer written from the spec."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from tests.helpers import free_port, get_json, http_get, metric, wait_for
from tests.helpers import series as parse_series

from backdial import control, fdpass

PRE = b"BDREG/1 service=demo instance=a1\r\n"


@pytest.fixture
def acceptor(procs, run_dir: Path):  # type: ignore[no-untyped-def]
    def start(config: str | None = None, tcp: bool = False, extra: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
        admin = f"127.0.0.1:{free_port()}"
        args = ["acceptor", "--run-dir", str(run_dir), "--admin", admin, "--reload-interval", "0.2"]
        args += extra
        if config is not None:
            path = run_dir / "config.yaml"
            path.write_text(config)
            args += ["--config", str(path)]
        reg_tcp = None
        if tcp:
            reg_tcp = ("127.0.0.1", free_port())
            args += ["--register-tcp", f"{reg_tcp[0]}:{reg_tcp[1]}"]
        proc = procs(*args, name="acceptor")
        wait_for(lambda: http_get(f"http://{admin}/healthz")[0] == 200, what="acceptor")
        return proc, admin, reg_tcp

    return start


def services(admin: str) -> dict:  # type: ignore[type-arg]
    return get_json(f"http://{admin}/v1/state")["services"]


class RawWorker:
    """A control-socket client built only from docs/protocol.md."""

    def __init__(self, run_dir: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(5)
        self.sock.connect(str(run_dir / "control.sock"))

    def send(self, msg: control.Message) -> None:
        fdpass.send_record(self.sock, control.encode(msg))

    def recv(self, kind: type) -> tuple[control.Message, list[int]]:  # type: ignore[type-arg]
        while True:
            record, fds = fdpass.recv_record(self.sock)
            assert record, "control socket closed"
            msg = control.decode(record)
            if isinstance(msg, kind):
                return msg, fds
            for fd in fds:
                os.close(fd)

    def send_raw(self, record: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        fdpass.send_record(self.sock, record, fds)

    def pending(self) -> list[control.Message]:
        """Every record already waiting on the socket (descriptors closed), oldest first."""
        out: list[control.Message] = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    record, fds = fdpass.recv_record(self.sock)
                except BlockingIOError:
                    return out
                for fd in fds:
                    os.close(fd)
                if not record:
                    return out
                out.append(control.decode(record))
        finally:
            self.sock.settimeout(5)

    def closed_by_peer(self) -> bool:
        """True once the acceptor has closed this connection (records before EOF are read)."""
        try:
            while True:
                record, fds = fdpass.recv_record(self.sock)
                for fd in fds:
                    os.close(fd)
                if not record:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def metric_value(admin: str, series: str) -> float:
    """One series (``name{label="value"}``) of the acceptor's /metrics (0 when absent)."""
    name, labels = parse_series(series)
    return metric(http_get(f"http://{admin}/metrics")[1].decode(), name, **labels)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
