"""A real, Docker-free Kubernetes control plane for backdial's tests.

The control plane is made of local processes, in the spirit of controller-runtime's envtest
but complete enough to run workloads:

* ``etcd`` (go.etcd.io/etcd/server/v3),
* ``kube-apiserver`` with RBAC, the aggregation layer (front-proxy certificates) and
  service-account token signing,
* ``kube-controller-manager`` (all default controllers, including the HPA controller),
* ``kube-scheduler``,
* ``kwok``, which fakes the kubelets of Node objects annotated ``kwok.x-k8s.io/node=fake``
  and moves their pods to ``Running`` using the stages in ``kwok/stages.yaml``.

Binaries come from ``build.sh`` (built from the Go module proxy into ``~/.cache/backdial``);
certificates are made with the ``openssl`` CLI. Everything listens on 127.0.0.1 only, on free
ports, and all state lives in one work directory.

Typical use::

    binaries = build()                      # builds what is missing, returns paths
    with Cluster(binaries) as cluster:      # starts and waits until nodes are Ready
        cluster.kubectl("get", "nodes")
        cluster.api.request("GET", "/api/v1/namespaces")

Only the Python standard library and PyYAML are used.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
KWOK_STAGES = HERE / "kwok" / "stages.yaml"

#: Annotation (key and value) marking the Node objects that kwok manages.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"

DEFAULT_NODE_NAMES: tuple[str, ...] = ("backdial-kwok-0",)
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_SERVICE_IP = "10.96.0.1"  # first address of DEFAULT_SERVICE_CIDR: the `kubernetes` svc
DEFAULT_POD_CIDR = "10.244.0.0/16"  # kwok writes pod IPs from here into pod status only
ADMIN_USER = "backdial-admin"
STATE_FILE = "state.json"

T = TypeVar("T")
LogFn = Callable[[str], None]


class HarnessError(RuntimeError):
    """The control plane could not be built, started or stopped."""


class ToolchainMissingError(HarnessError):
    """A tool needed to build or run the control plane (go, openssl, bash) is missing."""


def _stderr_log(message: str) -> None:
    print(f"[k8s-harness] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Locations and tools
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of backdial's caches: ``$BACKDIAL_CACHE_DIR`` or ``~/.cache/backdial``."""
    explicit = os.environ.get("BACKDIAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "backdial"


def default_state_dir() -> Path:
    """State directory of ``cluster up``: ``$BACKDIAL_CLUSTER_DIR`` or the cache's."""
    explicit = os.environ.get("BACKDIAL_CLUSTER_DIR")
    return Path(explicit).expanduser() if explicit else cache_root() / "cluster-state"


def find_go() -> str | None:
    """Path of the Go toolchain: ``$GO``, ``go`` on PATH, or ``/usr/local/go/bin/go``."""
    candidates = [os.environ.get("GO"), shutil.which("go"), "/usr/local/go/bin/go"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_prerequisites() -> list[str]:
    """Human-readable list of missing tools; empty when the harness can run."""
    missing: list[str] = []
    if find_go() is None:
        missing.append("Go toolchain (go on PATH, $GO or /usr/local/go/bin/go)")
    if shutil.which("openssl") is None:
        missing.append("openssl CLI (apt-get install openssl)")
    if shutil.which("bash") is None:
        missing.append("bash")
    return missing


@dataclass(frozen=True)
class Binaries:
    """Paths of the built control-plane and client binaries."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path

    @classmethod
    def from_tools(cls, tools: Mapping[str, str]) -> Binaries:
        """Build from a ``{"kube-apiserver": "/path", ...}`` mapping (build.sh's output)."""
        try:
            return cls(**{name.replace("-", "_"): Path(tools[name]) for name in TOOL_NAMES})
        except KeyError as exc:
            raise HarnessError(f"build.sh did not report a path for {exc.args[0]}") from exc

    def as_tools(self) -> dict[str, str]:
        """Inverse of :meth:`from_tools`."""
        return {name: str(getattr(self, name.replace("-", "_"))) for name in TOOL_NAMES}


TOOL_NAMES: tuple[str, ...] = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)


def build(
    *, print_only: bool = False, timeout: float = 3600.0, log: LogFn = _stderr_log
) -> Binaries:
    """Build (or find in the cache) every binary by running ``build.sh``.

    ``build.sh`` writes its progress and timings to stderr (passed through) and one
    ``tool=/path`` line per binary to stdout. With ``print_only`` nothing is built and a missing
    binary is an error. Raises :class:`ToolchainMissingError` without a Go toolchain.
    """
    go = find_go()
    if go is None:
        raise ToolchainMissingError(
            "no Go toolchain found (go on PATH, $GO or /usr/local/go/bin/go)"
        )
    bash = shutil.which("bash")
    if bash is None:
        raise ToolchainMissingError("bash is required to run build.sh")
    env = dict(os.environ, GO=go)
    args = [bash, str(BUILD_SCRIPT)] + (["--print-only"] if print_only else [])
    started = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"build.sh did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise HarnessError(f"build.sh failed with exit code {proc.returncode} (see stderr)")
    tools: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, sep, path = line.partition("=")
        if sep:
            tools[name.strip()] = path.strip()
    log(f"binaries ready in {time.monotonic() - started:.1f}s")
    return Binaries.from_tools(tools)


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


def poll(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.5,
    what: str = "condition",
) -> T:
    """Call ``probe`` until it returns something other than ``None``; return that.

    Exceptions raised by ``probe`` propagate. Raises :class:`TimeoutError` after ``timeout``
    seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _free_port(taken: set[int]) -> int:
    """A TCP port on 127.0.0.1 that is free right now and not in ``taken``."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise HarnessError("could not find a free port on 127.0.0.1")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":  # zombie: as good as gone
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
"""
_EC_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1"


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and its PEM private key."""

    cert: Path
    key: Path


class PKI:
    """Certificates and keys of one control plane, generated with the ``openssl`` CLI."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = CertPair(directory / "ca.crt", directory / "ca.key")
        self.front_proxy_ca = CertPair(directory / "front-proxy-ca.crt", directory / "fp-ca.key")
        self.apiserver = CertPair(directory / "apiserver.crt", directory / "apiserver.key")
        self.front_proxy_client = CertPair(
            directory / "front-proxy-client.crt", directory / "front-proxy-client.key"
        )
        self.admin = CertPair(directory / "admin.crt", directory / "admin.key")
        self.controller_manager = CertPair(
            directory / "controller-manager.crt", directory / "controller-manager.key"
        )
        self.scheduler = CertPair(directory / "scheduler.crt", directory / "scheduler.key")
        self.kwok = CertPair(directory / "kwok.crt", directory / "kwok.key")
        self.service_account_key = directory / "sa.key"
        self.service_account_pub = directory / "sa.pub"
        self._config = directory / "openssl.cnf"

    def _openssl(self, command: str) -> None:
        """Run ``openssl`` with ``command`` split on whitespace, inside the PKI directory.

        Every file is named relative to that directory, so no argument contains spaces.
        """
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ToolchainMissingError("the openssl CLI is required (apt-get install openssl)")
        proc = subprocess.run(
            [openssl, *command.split()],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise HarnessError(f"openssl {command} failed: {proc.stderr.strip()}")

    def _new_ca(self, pair: CertPair, common_name: str) -> None:
        self._openssl(
            f"req -x509 -new -nodes -config {self._config.name} {_EC_KEY}"
            f" -keyout {pair.key.name} -out {pair.cert.name} -days 3650"
            f" -subj /CN={common_name} -extensions ca"
        )

    def _new_leaf(
        self,
        pair: CertPair,
        ca: CertPair,
        subject: str,
        usage: str,
        alt_names: Sequence[str] = (),
    ) -> None:
        stem = pair.cert.stem
        csr, ext = f"{stem}.csr", f"{stem}.ext"
        lines = [
            "[leaf]",
            "basicConstraints = critical,CA:FALSE",
            "keyUsage = critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage = {usage}",
            "authorityKeyIdentifier = keyid",
        ]
        if alt_names:
            lines.append("subjectAltName = " + ",".join(alt_names))
        (self.dir / ext).write_text("\n".join(lines) + "\n")
        self._openssl(
            f"req -new -nodes -config {self._config.name} {_EC_KEY}"
            f" -keyout {pair.key.name} -out {csr} -subj {subject}"
        )
        self._openssl(
            f"x509 -req -in {csr} -CA {ca.cert.name} -CAkey {ca.key.name}"
            f" -set_serial 0x{secrets.token_hex(16)} -days 365"
            f" -extfile {ext} -extensions leaf -out {pair.cert.name}"
        )
        (self.dir / csr).unlink()
        (self.dir / ext).unlink()

    def generate(self, service_ip: str = DEFAULT_SERVICE_IP) -> None:
        """Create every certificate and key (CAs, serving, clients, service-account keys)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._config.write_text(_OPENSSL_CONFIG)
        self._new_ca(self.ca, "backdial-test-ca")
        self._new_ca(self.front_proxy_ca, "backdial-test-front-proxy-ca")
        self._new_leaf(
            self.apiserver,
            self.ca,
            "/CN=kube-apiserver",
            "serverAuth",
            [
                "IP:127.0.0.1",
                f"IP:{service_ip}",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ],
        )
        self._new_leaf(
            self.front_proxy_client, self.front_proxy_ca, "/CN=front-proxy-client", "clientAuth"
        )
        self._new_leaf(self.admin, self.ca, f"/O=system:masters/CN={ADMIN_USER}", "clientAuth")
        self._new_leaf(
            self.controller_manager, self.ca, "/CN=system:kube-controller-manager", "clientAuth"
        )
        self._new_leaf(self.scheduler, self.ca, "/CN=system:kube-scheduler", "clientAuth")
        # kwok updates node and pod status for many nodes, like a fleet of kubelets; it gets
        # cluster-admin through system:masters rather than per-node identities.
        self._new_leaf(self.kwok, self.ca, "/O=system:masters/CN=backdial-kwok", "clientAuth")
        sa_key, sa_pub = self.service_account_key.name, self.service_account_pub.name
        self._openssl(f"genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out {sa_key}")
        self._openssl(f"pkey -in {sa_key} -pubout -out {sa_pub}")
        for key in self.dir.glob("*.key"):
            key.chmod(0o600)


def write_kubeconfig(
    path: Path, server: str, ca: Path, client: CertPair, user: str = ADMIN_USER
) -> Path:
    """Write a self-contained kubeconfig (certificates embedded) for ``client``."""

    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode("ascii")

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "backdial",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert),
                    "client-key-data": b64(client.key),
                },
            }
        ],
        "contexts": [{"name": "backdial", "context": {"cluster": "backdial", "user": user}}],
        "current-context": "backdial",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------
# HTTPS access to the API server
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiResponse:
    """Status, headers and body of one API server response."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body.decode("utf-8"))

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8", "replace")


class ApiClient:
    """Minimal HTTPS client for the API server, authenticated by a client certificate."""

    def __init__(self, host: str, port: int, ca: Path, client: CertPair) -> None:
        self.host = host
        self.port = port
        self._context = ssl.create_default_context(cafile=str(ca))
        self._context.load_cert_chain(str(client.cert), str(client.key))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        impersonate_user: str | None = None,
        impersonate_groups: Iterable[str] = (),
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> ApiResponse:
        """Send one request; ``body`` (if not bytes/str) is sent as JSON.

        ``impersonate_user``/``impersonate_groups`` set the ``Impersonate-*`` headers, so the
        request is authorized as that user (the admin identity is allowed to impersonate).
        """
        payload: bytes | None
        if body is None:
            payload = None
        elif isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode("utf-8")
        else:
            payload = json.dumps(body).encode("utf-8")
        all_headers = {"Accept": "application/json"}
        if payload is not None:
            all_headers["Content-Type"] = content_type
        if impersonate_user:
            all_headers["Impersonate-User"] = impersonate_user
        all_headers.update(headers or {})
        conn = http.client.HTTPSConnection(
            self.host, self.port, context=self._context, timeout=timeout
        )
        try:
            if impersonate_groups:
                # http.client sends repeated headers when given via putheader.
                conn.putrequest(method, path)
                for key, value in all_headers.items():
                    conn.putheader(key, value)
                for group in impersonate_groups:
                    conn.putheader("Impersonate-Group", group)
                conn.putheader("Content-Length", str(len(payload or b"")))
                conn.endheaders(payload)
            else:
                conn.request(method, path, body=payload, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            return ApiResponse(response.status, data, dict(response.getheaders()))
        finally:
            conn.close()


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when its parent dies.

    SIGKILL rather than SIGTERM: all components would get the signal at once, and a
    kube-apiserver whose etcd is gone hangs in its graceful shutdown.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


@dataclass
class Process:
    """One control-plane process, in its own process group (its pid is the pgid)."""

    name: str
    argv: list[str]
    log: str
    pid: int = 0
    start_time: int = 0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def start(self, *, cwd: Path, env: Mapping[str, str], die_with_parent: bool) -> None:
        """Spawn the process, output appended to its log file."""
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only prctl() runs between fork and exec; harmless with threads.
                preexec_fn=_pdeathsig_preexec() if die_with_parent else None,
            )
        self.pid = self.popen.pid
        self.start_time = _proc_start_time(self.pid) or 0

    def alive(self) -> bool:
        """Whether this very process (same pid and start time) still runs."""
        if self.pid <= 0:
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        started = _proc_start_time(self.pid)
        return started is not None and self.start_time in (0, started)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process group, if the process is still ours and alive."""
        if not self.alive():
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - not our process group
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for exit; True if it is gone."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable description (without the Popen handle)."""
        return {
            "name": self.name,
            "argv": list(self.argv),
            "log": self.log,
            "pid": self.pid,
            "start_time": self.start_time,
        }


def stop_processes(groups: Sequence[Sequence[Process]], grace: float = 10.0) -> None:
    """Stop processes stage by stage: SIGTERM, wait ``grace`` seconds, then SIGKILL.

    Signals go to each process group only while its leader is verifiably the process that
    was started (pid and start time), so a recycled pid is never signalled.
    """
    for group in groups:
        for proc in group:
            proc.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in group:
            if not proc.wait(max(0.0, deadline - time.monotonic())):
                proc.signal_group(signal.SIGKILL)
                proc.wait(5.0)


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


# Clients of the API server first, then the API server, then its storage.
_STOP_ORDER: tuple[tuple[str, ...], ...] = (
    ("kwok", "kube-scheduler", "kube-controller-manager"),
    ("kube-apiserver",),
    ("etcd",),
)


@dataclass
class Endpoints:
    """Loopback ports of one control plane."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int


class Cluster:
    """A local control plane: etcd, kube-apiserver, controller-manager, scheduler and kwok.

    ``workdir`` (a new temporary directory by default) holds certificates, kubeconfigs, etcd's
    data and the ``logs/`` directory. Use as a context manager, or call :meth:`start` and
    :meth:`stop`. With ``die_with_parent`` (the default) the processes get SIGKILL from the
    kernel if the Python process dies without stopping them; without it they outlive this
    process and ``state_file`` (rewritten after every spawn) lets :meth:`load_state` find
    and stop them later.
    """

    def __init__(
        self,
        binaries: Binaries,
        workdir: Path | None = None,
        *,
        node_names: Sequence[str] = DEFAULT_NODE_NAMES,
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        service_ip: str = DEFAULT_SERVICE_IP,
        pod_cidr: str = DEFAULT_POD_CIDR,
        hpa_sync_period: str = "3s",
        die_with_parent: bool = True,
        state_file: Path | None = None,
        verbosity: int = 1,
        log: LogFn = _stderr_log,
    ) -> None:
        self.binaries = binaries
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="backdial-k8s-")) if workdir is None else workdir
        )
        self.node_names = tuple(node_names)
        self.service_cidr = service_cidr
        self.service_ip = service_ip
        self.pod_cidr = pod_cidr
        self.hpa_sync_period = hpa_sync_period
        self.die_with_parent = die_with_parent
        self.state_file = state_file
        self.verbosity = verbosity
        self.log = log
        self.pki = PKI(self.workdir / "pki")
        self.logs_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kube_cache_dir = self.workdir / "kube-cache"
        self.processes: dict[str, Process] = {}
        self.endpoints: Endpoints | None = None
        self._api: ApiClient | None = None

    # -- public helpers ------------------------------------------------------------------

    @property
    def server(self) -> str:
        """URL of the API server."""
        return f"https://127.0.0.1:{self._endpoints.apiserver}"

    @property
    def api(self) -> ApiClient:
        """HTTPS client authenticated as the cluster admin (group system:masters)."""
        if self._api is None:
            self._api = ApiClient(
                "127.0.0.1", self._endpoints.apiserver, self.pki.ca.cert, self.pki.admin
            )
        return self._api

    @property
    def kubectl_path(self) -> Path:
        """The built kubectl."""
        return self.binaries.kubectl

    @property
    def helm_path(self) -> Path:
        """The built helm."""
        return self.binaries.helm

    def env(self) -> dict[str, str]:
        """Environment for clients: ``os.environ`` plus ``KUBECONFIG`` and a PATH with
        kubectl/helm first."""
        path = os.pathsep.join(
            [
                str(self.binaries.kubectl.parent),
                str(self.binaries.helm.parent),
                os.environ.get("PATH", ""),
            ]
        )
        env = dict(
            os.environ,
            KUBECONFIG=str(self.kubeconfig),
            PATH=path,
            # kubectl's and helm's discovery/HTTP cache, else ~/.kube/cache/<host_port>.
            KUBECACHEDIR=str(self.kube_cache_dir),
        )
        # helm keeps caches/config under these; keep them inside the work directory.
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            env.setdefault(var, str(self.workdir / "helm" / sub))
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        as_user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster; raises on failure if ``check``."""
        argv = [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}"]
        if as_user:
            argv.append(f"--as={as_user}")
        return self._run([*argv, *args], input=input, check=check, timeout=timeout)

    def helm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built helm against this cluster; raises on failure if ``check``."""
        argv = [str(self.binaries.helm), f"--kubeconfig={self.kubeconfig}", *args]
        return self._run(argv, input=input, check=check, timeout=timeout)

    def _run(
        self,
        argv: list[str],
        *,
        input: str | None,
        check: bool,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise HarnessError(
                f"{Path(argv[0]).name} {' '.join(argv[2:])} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def apply(self, manifest: str | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
        """``kubectl apply -f -`` a YAML string, an object or a list of objects."""
        if isinstance(manifest, str):
            text = manifest
        elif isinstance(manifest, Mapping):
            text = yaml.safe_dump(dict(manifest))
        else:
            text = yaml.safe_dump_all([dict(item) for item in manifest])
        return self.kubectl("apply", "-f", "-", input=text).stdout

    def get_json(self, path: str) -> Any:
        """GET ``path`` as admin; raises :class:`HarnessError` unless 200."""
        response = self.api.request("GET", path)
        if response.status != 200:
            raise HarnessError(f"GET {path}: HTTP {response.status}: {response.text[:500]}")
        return response.json()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def _endpoints(self) -> Endpoints:
        if self.endpoints is None:
            raise HarnessError("the cluster has not been started")
        return self.endpoints

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(keep_logs=exc_type is not None)

    def start(self, timeout: float = 180.0, attempts: int = 2) -> None:
        """Start every component and wait until the API server is ready and nodes are Ready.

        Ports are picked free just before use; if a component still loses one to another
        process ("address already in use"), start-up is retried with new ports, up to
        ``attempts`` times in all. On failure everything started is stopped, the logs are kept
        (see :meth:`stop`) and :class:`HarnessError` names the log directory.
        """
        started = time.monotonic()
        deadline = started + timeout
        for attempt in range(1, attempts + 1):
            try:
                self._start(deadline)
                break
            except BaseException as exc:
                self.terminate(grace=3.0)  # first, so that the logs are complete
                if isinstance(exc, Exception) and attempt < attempts and self._port_clash():
                    first_line = str(exc).partition("\n")[0]
                    self.log(f"a port was taken meanwhile ({first_line}); retrying with new ports")
                    self._reset(attempt)
                    continue
                tails = "\n".join(
                    f"--- {name} (last lines) ---\n{_tail(Path(proc.log), 15)}"
                    for name, proc in self.processes.items()
                )
                kept = self._keep_logs()
                if not isinstance(exc, Exception):  # KeyboardInterrupt and friends
                    raise
                raise HarnessError(
                    f"control plane failed to start: {exc}\nlogs kept in {kept}\n{tails}"
                ) from exc
        self.log(f"control plane ready in {time.monotonic() - started:.1f}s at {self.server}")

    def _port_clash(self) -> bool:
        return any(
            "address already in use" in _tail(Path(proc.log), 200)
            for proc in self.processes.values()
        )

    def _reset(self, attempt: int) -> None:
        """Forget a failed attempt: processes, ports, etcd data; keep its logs aside."""
        self.processes.clear()
        self.endpoints = None
        self._api = None
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        if self.logs_dir.is_dir():
            self.logs_dir.rename(self.workdir / f"logs.attempt{attempt}")

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("start-up deadline exceeded")
        return remaining

    def _start(self, deadline: float) -> None:
        for sub in ("etcd", "run", "home"):
            (self.workdir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.pki.generate(self.service_ip)
        taken: set[int] = set()
        self.endpoints = Endpoints(
            etcd_client=_free_port(taken),
            etcd_peer=_free_port(taken),
            apiserver=_free_port(taken),
            controller_manager=_free_port(taken),
            scheduler=_free_port(taken),
        )
        write_kubeconfig(self.kubeconfig, self.server, self.pki.ca.cert, self.pki.admin)
        run = self.workdir / "run"
        write_kubeconfig(
            run / "controller-manager.kubeconfig",
            self.server,
            self.pki.ca.cert,
            self.pki.controller_manager,
            "system:kube-controller-manager",
        )
        write_kubeconfig(
            run / "scheduler.kubeconfig",
            self.server,
            self.pki.ca.cert,
            self.pki.scheduler,
            "system:kube-scheduler",
        )
        write_kubeconfig(
            run / "kwok.kubeconfig", self.server, self.pki.ca.cert, self.pki.kwok, "backdial-kwok"
        )

        self._spawn("etcd", self._etcd_args())
        poll(self._etcd_healthy, timeout=min(30.0, self._remaining(deadline)), what="etcd")
        self._spawn("kube-apiserver", self._apiserver_args())
        poll(
            self._apiserver_ready,
            timeout=self._remaining(deadline),
            interval=0.25,
            what="kube-apiserver /readyz",
        )
        self._spawn("kube-controller-manager", self._controller_manager_args())
        self._spawn("kube-scheduler", self._scheduler_args())
        self._spawn("kwok", self._kwok_args())
        for name in self.node_names:
            self._create_node(name)
        for name, port in (
            ("kube-controller-manager", self._endpoints.controller_manager),
            ("kube-scheduler", self._endpoints.scheduler),
        ):
            poll(
                functools.partial(self._component_healthy, name, port),
                timeout=self._remaining(deadline),
                what=f"{name} /healthz",
            )
        for name in self.node_names:
            poll(
                functools.partial(self._node_ready, name),
                timeout=self._remaining(deadline),
                what=f"node {name} Ready",
            )
        # The service-account controller must have made `default` before pods can be created.
        poll(
            self._default_service_account,
            timeout=self._remaining(deadline),
            what="the default ServiceAccount",
        )

    def stop(self, *, keep_logs: bool = False, grace: float = 10.0) -> Path | None:
        """Stop every process (SIGTERM, then SIGKILL after ``grace`` s).

        With ``keep_logs`` the ``logs/`` directory is kept (moved out of a temporary work
        directory into ``<cache>/logs/``) and its path returned. A work directory this object
        created is removed.
        """
        self.terminate(grace)
        if keep_logs:
            return self._keep_logs()
        self._cleanup()
        return None

    def terminate(self, grace: float = 10.0) -> None:
        """Stop every process but leave the work directory alone."""
        procs = self.processes
        stages = [[procs[n] for n in stage if n in procs] for stage in _STOP_ORDER]
        stop_processes(stages, grace)

    def _keep_logs(self) -> Path | None:
        kept: Path | None = None
        if self.logs_dir.is_dir():
            kept = _keep_logs(self.logs_dir) if self._own_workdir else self.logs_dir
            self.log(f"logs kept in {kept}")
        self._cleanup()
        return kept

    def _cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def alive(self) -> dict[str, bool]:
        """Which components are still running."""
        return {name: proc.alive() for name, proc in self.processes.items()}

    # -- state (for `cluster up` / `cluster down`) ---------------------------------------

    def save_state(self, path: Path) -> None:
        """Record what :meth:`load_state` needs to find and stop this cluster later."""
        state = {
            "version": 1,
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "endpoints": asdict(self._endpoints),
            "node_names": list(self.node_names),
            "binaries": self.binaries.as_tools(),
            "processes": [proc.to_state() for proc in self.processes.values()],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load_state(cls, path: Path, log: LogFn = _stderr_log) -> Cluster:
        """Rebuild a (detached) cluster handle from :meth:`save_state`'s file."""
        state = json.loads(path.read_text())
        cluster = cls(
            Binaries.from_tools(state["binaries"]),
            Path(state["workdir"]),
            node_names=state["node_names"],
            die_with_parent=False,
            log=log,
        )
        cluster.endpoints = Endpoints(**state["endpoints"])
        for item in state["processes"]:
            proc = Process(
                item["name"],
                list(item["argv"]),
                item["log"],
                int(item["pid"]),
                int(item["start_time"]),
            )
            cluster.processes[proc.name] = proc
        return cluster

    # -- internals -----------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        binary = {
            "etcd": self.binaries.etcd,
            "kube-apiserver": self.binaries.kube_apiserver,
            "kube-controller-manager": self.binaries.kube_controller_manager,
            "kube-scheduler": self.binaries.kube_scheduler,
            "kwok": self.binaries.kwok,
        }[name]
        env = dict(os.environ)
        for var in ("KUBECONFIG", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(var, None)
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        env["HOME"] = str(self.workdir / "home")  # kwok reads ~/.kwok/kwok.yaml if present
        proc = Process(name, [str(binary), *args], str(self.logs_dir / f"{name}.log"))
        proc.start(cwd=self.workdir, env=env, die_with_parent=self.die_with_parent)
        self.processes[name] = proc
        self.log(f"started {name} (pid {proc.pid})")
        if self.state_file is not None:
            # Recorded after every spawn, so `cluster down` can clean up even if start-up
            # is interrupted.
            self.save_state(self.state_file)

    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if not proc.alive():
            raise HarnessError(f"{name} exited early:\n{_tail(Path(proc.log))}")

    def _etcd_args(self) -> list[str]:
        ep = self._endpoints
        client = f"http://127.0.0.1:{ep.etcd_client}"
        peer = f"http://127.0.0.1:{ep.etcd_peer}"
        return [
            "--name=backdial",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=backdial={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",  # throw-away test data: durability is not needed
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        ep, pki = self._endpoints, self.pki
        return [
            f"--etcd-servers=http://127.0.0.1:{ep.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ep.apiserver}",
            f"--cert-dir={self.workdir / 'run'}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            f"--service-cluster-ip-range={self.service_cidr}",
            # The `kubernetes` Service would get 127.0.0.1 as endpoint, which Endpoints
            # validation rejects (loopback); nothing in-cluster needs to reach it here.
            "--endpoint-reconciler-type=none",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            # Aggregation layer: front-proxy client identity and request-header authn.
            f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
            f"--proxy-client-key-file={pki.front_proxy_client.key}",
            "--enable-aggregator-routing=true",
            "--profiling=false",
            f"--v={self.verbosity}",
        ]

    def _component_common_args(self, kubeconfig: Path, port: int, name: str) -> list[str]:
        cert_dir = self.workdir / "run" / f"{name}-certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        return [
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={cert_dir}",
            "--profiling=false",
            f"--v={self.verbosity}",
        ]

    def _controller_manager_args(self) -> list[str]:
        kubeconfig = self.workdir / "run" / "controller-manager.kubeconfig"
        pki = self.pki
        return [
            f"--kubeconfig={kubeconfig}",
            *self._component_common_args(
                kubeconfig, self._endpoints.controller_manager, "controller-manager"
            ),
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--root-ca-file={pki.ca.cert}",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--cluster-signing-cert-file={pki.ca.cert}",
            f"--cluster-signing-key-file={pki.ca.key}",
            f"--service-cluster-ip-range={self.service_cidr}",
            f"--horizontal-pod-autoscaler-sync-period={self.hpa_sync_period}",
        ]

    def _scheduler_args(self) -> list[str]:
        kubeconfig = self.workdir / "run" / "scheduler.kubeconfig"
        config = self.workdir / "run" / "scheduler-config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {"kubeconfig": str(kubeconfig)},
                    "leaderElection": {"leaderElect": False},
                }
            )
        )
        return [
            f"--config={config}",
            *self._component_common_args(kubeconfig, self._endpoints.scheduler, "scheduler"),
        ]

    def _kwok_args(self) -> list[str]:
        selector = f"{KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}"
        return [
            f"--kubeconfig={self.workdir / 'run' / 'kwok.kubeconfig'}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={selector}",
            "--node-lease-duration-seconds=40",
            # Fake pod IPs written into pod status; nothing is ever sent to them.
            f"--cidr={self.pod_cidr}",
        ]

    def _etcd_healthy(self) -> bool | None:
        self._check_alive("etcd")
        conn = http.client.HTTPConnection("127.0.0.1", self._endpoints.etcd_client, timeout=2)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            healthy = response.status == 200 and b'"true"' in response.read()
        except OSError:
            return None
        finally:
            conn.close()
        return True if healthy else None

    def _apiserver_ready(self) -> bool | None:
        self._check_alive("kube-apiserver")
        try:
            response = self.api.request("GET", "/readyz", timeout=5)
        except (OSError, http.client.HTTPException):
            return None
        return True if response.status == 200 else None

    def _component_healthy(self, name: str, port: int) -> bool | None:
        self._check_alive(name)
        # Self-signed serving certificate generated by the component itself.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
        try:
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        return True if ok else None

    def _create_node(self, name: str) -> None:
        resources = {"cpu": "32", "memory": "128Gi", "pods": "110"}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                },
            },
            # Deliberately not tainted, so ordinary pods schedule onto the fake node.
            "spec": {},
            "status": {"capacity": resources, "allocatable": resources},
        }
        response = self.api.request("POST", "/api/v1/nodes", node)
        if response.status not in (201, 409):
            raise HarnessError(f"creating node {name}: HTTP {response.status}: {response.text}")

    def _node_ready(self, name: str) -> bool | None:
        self._check_alive("kwok")
        response = self.api.request("GET", f"/api/v1/nodes/{name}")
        if response.status != 200:
            return None
        conditions = response.json().get("status", {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        return True if ready else None

    def _default_service_account(self) -> bool | None:
        self._check_alive("kube-controller-manager")
        response = self.api.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return True if response.status == 200 else None


def _keep_logs(logs_dir: Path, keep_last: int = 10) -> Path:
    """Move ``logs_dir`` to ``<cache>/logs/<timestamp>-<pid>``; prune old kept logs."""
    root = Path(os.environ.get("BACKDIAL_K8S_LOG_DIR") or cache_root() / "logs")
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    shutil.move(str(logs_dir), target)
    kept = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target
