"""Fixtures for tests of the container image (marker ``image``).

When any selected test is marked ``image``, ``scripts/image prepare`` runs once at the end of
collection (so no per-test timeout covers it): it installs Debian's ``docker.io`` when no
``dockerd`` exists, starts ``dockerd`` when no engine answers, makes the base image locally when
no registry can be reached (debootstrap rootfs cached under ``~/.cache/backdial/image``) and
builds the image (layers cached by the engine). A ``dockerd`` started this way is stopped at
the end of the session.

* ``BACKDIAL_SKIP_IMAGE=1``: skip these tests.
* ``BACKDIAL_IMAGE_REQUIRE=1`` (CI): a failed preparation fails the tests instead of skipping.
* ``BACKDIAL_IMAGE_BUILD_TIMEOUT``: seconds for the whole preparation (default 1800).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "image"
_PREPARED = pytest.StashKey[str | BaseException]()
_STARTED_ENGINE = pytest.StashKey[bool]()


def _prepare(config: pytest.Config) -> str:
    """Run ``scripts/image prepare``; return the image tag (raises with the log tail)."""
    log = Path(tempfile.gettempdir()) / "backdial-image-prepare.log"
    timeout = float(os.environ.get("BACKDIAL_IMAGE_BUILD_TIMEOUT") or 1800)
    with log.open("w") as fh:
        done = subprocess.run(
            [str(SCRIPT), "prepare"],
            stdout=subprocess.PIPE,
            stderr=fh,
            env=dict(os.environ, BACKDIAL_BUILD_LOG=str(log.with_suffix(".build.log"))),
            timeout=timeout,
            text=True,
            check=False,
        )
    config.stash[_STARTED_ENGINE] = "started" in done.stdout.split()
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"scripts/image prepare failed (exit {done.returncode}):\n{tail}")
    tag = subprocess.run(
        [str(SCRIPT), "tag"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return tag


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("BACKDIAL_SKIP_IMAGE") == "1":
        return
    if not any(item.get_closest_marker("image") for item in items):
        return
    sys.stderr.write("\n[image] preparing the engine, base image and image (scripts/image)\n")
    try:
        config.stash[_PREPARED] = _prepare(config)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        config.stash[_PREPARED] = exc


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.stash.get(_STARTED_ENGINE, False):
        subprocess.run([str(SCRIPT), "engine-stop"], check=False, timeout=60)


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest) -> str:
    """The tag of the freshly built image (skip or fail when it could not be built)."""
    if os.environ.get("BACKDIAL_SKIP_IMAGE") == "1":
        pytest.skip("BACKDIAL_SKIP_IMAGE=1")
    prepared = request.config.stash.get(_PREPARED, None)
    if prepared is None:
        pytest.skip("image not prepared (no `image` test selected at collection)")
    if isinstance(prepared, BaseException):
        if os.environ.get("BACKDIAL_IMAGE_REQUIRE") == "1":
            pytest.fail(f"image required (BACKDIAL_IMAGE_REQUIRE=1): {prepared}", pytrace=False)
        pytest.skip(f"no image: {prepared}")
    return prepared
