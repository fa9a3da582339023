"""``backdial acceptor`` settings: every one a flag and a ``BACKDIAL_*`` variable.

Declared with ``backdial.options`` (so ``--help`` and ``docs/configuration.md``
list each setting's variable and default, and a bad value is one line); the
groups the acceptor's parts take (``SocketTrust``, ``AdminAccess``, the
operator link) are derived from the flat settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backdial.acceptor.operatorlink import LinkSettings, parse_operator_url, parse_pod
from backdial.acceptor.server import SocketTrust
from backdial.adminauth import AdminAccess
from backdial.options import (
    hostport,
    log_level,
    option,
    optional_hostport,
    optional_path,
    path,
    seconds,
    words,
)
from backdial.trust import Uids


def uids(raw: str) -> Uids:
    return Uids.parse(raw, "allowed uids")


def operator_url(raw: str) -> tuple[str, int] | None:
    return parse_operator_url(raw) if raw.strip() else None


def pod(raw: str) -> tuple[str, str] | None:
    return parse_pod(raw) if raw.strip() else None


def host_names(raw: str) -> tuple[str, ...]:
    return tuple(name.lower() for name in words(raw))


@dataclass(frozen=True, slots=True)
class AcceptorSettings:
    run_dir: Path = option(
        "--run-dir",
        parse=path,
        default="/var/run/backdial",
        help="directory for register.sock, control.sock and admin.sock",
    )
    config: Path | None = option(
        "--config",
        parse=optional_path,
        help="slices/routes/limits file, YAML or JSON; without it one default slice takes "
        "every request",
    )
    admin: tuple[str, int] = option(
        "--admin",
        parse=hostport,
        default="127.0.0.1:9901",
        help="HOST:PORT for /metrics, /healthz, /readyz, /v1/state, /v1/routes. Read-only "
        "without credentials; route edits need the token, or the UNIX socket "
        "<run-dir>/admin.sock",
    )
    admin_token_file: Path | None = option(
        "--admin-token-file",
        parse=optional_path,
        help="file holding the bearer token that allows route edits over TCP, re-read on use "
        "(without it only admin.sock may edit)",
    )
    admin_hosts: tuple[str, ...] = option(
        "--admin-hosts",
        parse=host_names,
        default="",
        help="extra Host names accepted for edits over TCP, comma-separated (IP addresses and "
        "localhost always are)",
    )
    register_tcp: tuple[str, int] | None = option(
        "--register-tcp", parse=optional_hostport, help="also accept registrations on HOST:PORT"
    )
    register_uids: Uids = option(
        "--register-uids",
        parse=uids,
        default="self",
        help="uids (or user names, comma-separated) allowed to connect to register.sock, or "
        "'any'; self is the acceptor's own uid. In a pod: 'any', so app containers running "
        "as other users can register",
    )
    control_uids: Uids = option(
        "--control-uids",
        parse=uids,
        default="self",
        help="uids allowed on control.sock and admin.sock: they can lease every session",
    )
    reload_interval: float = option(
        "--reload-interval",
        parse=seconds,
        default="1",
        help="seconds between config file change checks; 0 disables polling (SIGHUP always "
        "reloads)",
    )
    operator_url: tuple[str, int] | None = option(
        "--operator",
        parse=operator_url,
        env="OPERATOR",
        help="https://HOST[:PORT] of the operator's config endpoint: dial it and apply the "
        "SessionSlice config it sends (docs/operator.md)",
    )
    operator_ca: Path | None = option(
        "--operator-ca",
        parse=optional_path,
        help="CA bundle that signed the operator's certificate (default: the system's)",
    )
    token_file: Path = option(
        "--token-file",
        parse=path,
        default="/var/run/secrets/backdial/token",
        help="projected ServiceAccount token (audience backdial), re-read on every connect",
    )
    pod: tuple[str, str] | None = option(
        "--pod",
        parse=pod,
        help="NAMESPACE/NAME of this pod, as the token must prove (default: the pod the "
        "token is bound to)",
    )
    log_level: str = log_level()

    @property
    def trust(self) -> SocketTrust:
        return SocketTrust(register=self.register_uids, control=self.control_uids)

    @property
    def access(self) -> AdminAccess:
        return AdminAccess(token_file=self.admin_token_file, hosts=frozenset(self.admin_hosts))

    @property
    def operator(self) -> LinkSettings | None:
        """The operator link, when ``--operator`` is set."""
        if self.operator_url is None:
            return None
        host, port = self.operator_url
        return LinkSettings(host, port, self.operator_ca, self.token_file, self.pod)
