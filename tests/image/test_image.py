"""The container image, built by ``scripts/image`` and run by a real Docker engine.

Three containers of the one image (acceptor, sidecar, demo service) share a volume at
``/var/run/backdial`` the way the injected pod shares its emptyDir; each runs with a read-only
root filesystem, as the image's own non-root user, without capabilities, on the host network
bound to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import ROOT, free_port, http_get, wait_for

pytestmark = [pytest.mark.image]

UID = 65532
RUN_DIR = "/var/run/backdial"


def docker(*args: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {done.returncode}: {done.stderr}")
    return done.stdout


def project_version() -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def test_image_config_and_contents(image: str) -> None:
    config = json.loads(docker("image", "inspect", image))[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["backdial"]
    assert config.get("Healthcheck") is None, "probes belong to Kubernetes, not the image"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == project_version()
    assert labels["org.opencontainers.image.title"] == "backdial"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels["org.opencontainers.image.revision"])
    for key in ("source", "licenses", "created", "description", "base.name"):
        assert labels[f"org.opencontainers.image.{key}"], key

    # What the final stage holds: the interpreter and the project, no build tools or caches.
    probe = r"""
import importlib.util, json, os, shutil
print(json.dumps({
    "uid": os.getuid(),
    "tools": [t for t in ("pip", "pip3", "gcc", "cc", "make", "apt-get") if shutil.which(t)],
    "modules": [m for m in ("pip", "setuptools", "wheel", "ensurepip")
                if importlib.util.find_spec(m)],
    "apt_lists": os.listdir("/var/lib/apt/lists"),
    "pip_cache": os.path.exists("/root/.cache/pip"),
    "backdial": importlib.util.find_spec("backdial.cli") is not None,
}))
"""
    out = docker(
        "run",
        "--rm",
        "--read-only",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--entrypoint",
        "python3",
        image,
        "-c",
        probe,
    )
    facts = json.loads(out)
    # apt-get stays: it is part of the Debian base, not something the build added.
    assert facts == {
        "uid": UID,
        "tools": ["apt-get"],
        "modules": [],
        "apt_lists": [],
        "pip_cache": False,
        "backdial": True,
    }


@pytest.fixture
def run_volume(image: str) -> Iterator[tuple[str, list[str]]]:
    """A fresh named volume, and the containers started on it (removed afterwards)."""
    volume = f"backdial-test-{uuid.uuid4().hex[:10]}"
    docker("volume", "create", volume)
    containers: list[str] = []
    try:
        yield volume, containers
    finally:
        for name in containers:
            logs = subprocess.run(
                ["docker", "logs", "--tail", "30", name], capture_output=True, text=True
            )
            print(f"----- {name} -----\n{logs.stdout}{logs.stderr}")
        if containers:
            docker("rm", "--force", *containers, check=False)
        docker("volume", "rm", "--force", volume, check=False)


def test_acceptor_sidecar_demo_containers_serve_through_a_leased_session(
    image: str, run_volume: tuple[str, list[str]]
) -> None:
    volume, containers = run_volume
    acceptor_admin, listen, sidecar_admin = free_port(), free_port(), free_port()
    suffix = volume.removeprefix("backdial-test-")

    def run(role: str, *args: str) -> str:
        name = f"backdial-{role}-{suffix}"
        containers.append(name)
        docker(
            "run",
            "--detach",
            "--name",
            name,
            "--read-only",
            "--network",
            "host",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--mount",
            f"source={volume},target={RUN_DIR}",
            image,
            *args,
        )
        return name

    acceptor = run(
        "acceptor", "acceptor", "--run-dir", RUN_DIR, "--admin", f"127.0.0.1:{acceptor_admin}"
    )
    wait_for(
        lambda: http_get(f"http://127.0.0.1:{acceptor_admin}/healthz")[0] == 200,
        timeout=30,
        what="acceptor /healthz",
    )
    run(
        "sidecar",
        "sidecar",
        "--run-dir",
        RUN_DIR,
        "--listen",
        f"127.0.0.1:{listen}",
        "--admin",
        f"127.0.0.1:{sidecar_admin}",
    )
    run(
        "demo",
        "serve",
        "backdial.demo:app",
        "--sessions",
        "2",
        "--instance",
        "image-demo",
        "--register",
        f"unix://{RUN_DIR}/register.sock",
    )
    # Ready only once the demo's sessions are registered at the acceptor.
    wait_for(
        lambda: http_get(f"http://127.0.0.1:{sidecar_admin}/readyz")[0] == 200,
        timeout=30,
        what="sidecar /readyz",
    )

    hello = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{listen}/"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert hello.stdout == "hello from backdial\n"
    whoami = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{listen}/whoami"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(whoami.stdout)["instance"] == "image-demo"

    # The answers came over leased sessions: the acceptor granted leases.
    _, metrics, _ = http_get(f"http://127.0.0.1:{acceptor_admin}/metrics")
    granted = re.search(
        rb"^backdial_acceptor_leases_granted_total(?:\{[^}]*\})? (\S+)$", metrics, re.M
    )
    assert granted is not None and float(granted.group(1)) >= 1, metrics.decode()[-2000:]

    # Read-only root filesystem, non-root uid; the shared volume is where the sockets live.
    check = docker(
        "exec",
        acceptor,
        "python3",
        "-c",
        "import os, errno\n"
        "try:\n    open('/opt/backdial/x', 'w')\nexcept OSError as e:\n    err = e.errno\n"
        f"st = os.stat('{RUN_DIR}/register.sock')\n"
        "print(os.getuid(), errno.errorcode[err], st.st_uid)",
    )
    assert check.split() == [str(UID), "EROFS", str(UID)]
