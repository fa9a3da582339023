#!/usr/bin/env python3
"""Fetch the crates ``Cargo.lock`` pins from static.crates.io into a vendor directory.

    python3 vendor.py Cargo.lock vendor/ > vendor-config.toml

Older cargo (Debian bookworm's 1.63, the container image's builder) reads the crates.io
index as a git repository from GitHub; this fetches the ``.crate`` files themselves (the
download host every cargo uses), checks each against the checksum in ``Cargo.lock``, and
unpacks them as ``cargo vendor`` would, so the build runs ``--offline``.  Prints the
cargo configuration that points crates.io at the directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import tomllib
import urllib.request
from pathlib import Path

URL = "https://static.crates.io/crates/{name}/{name}-{version}.crate"


def fetch(lock: Path, out: Path) -> int:
    packages = tomllib.loads(lock.read_text())["package"]
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for pkg in packages:
        if not str(pkg.get("source", "")).startswith("registry+"):
            continue  # the crate being built
        name, version, checksum = pkg["name"], pkg["version"], pkg["checksum"]
        target = out / f"{name}-{version}"
        if (target / ".cargo-checksum.json").exists():
            continue
        with urllib.request.urlopen(URL.format(name=name, version=version), timeout=60) as r:
            data = r.read()
        if hashlib.sha256(data).hexdigest() != checksum:
            raise SystemExit(f"vendor.py: {name} {version}: checksum mismatch")
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            _unpack(tar, out, f"{name}-{version}")  # unpacks as <name>-<version>/
        # An empty file list: cargo checks the package checksum only.
        (target / ".cargo-checksum.json").write_text(json.dumps({"files": {}, "package": checksum}))
        n += 1
    return n


def _unpack(tar: tarfile.TarFile, out: Path, top: str) -> None:
    """Extract plain files and directories under *top* only (the image's Python 3.11.2
    predates ``extractall(filter="data")``, so the checks are done here)."""
    members = []
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if m.name.startswith("/") or ".." in parts or not parts or parts[0] != top:
            raise SystemExit(f"vendor.py: {top}: unexpected path {m.name!r} in the crate")
        if m.isfile() or m.isdir():
            m.mode = 0o755 if m.isdir() or m.mode & 0o100 else 0o644
            members.append(m)
    if hasattr(tarfile, "data_filter"):
        tar.extractall(out, members=members, filter="data")
    else:
        tar.extractall(out, members=members)


def main(argv: list[str]) -> int:
    lock, out = Path(argv[1]), Path(argv[2])
    n = fetch(lock, out)
    print(f"# {n} crates fetched into {out}", file=sys.stderr)
    print(
        '[source.crates-io]\nreplace-with = "vendored"\n\n'
        f'[source.vendored]\ndirectory = "{out.resolve()}"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
