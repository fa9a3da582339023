"""Pod IPs claimed machine-wide, so two test clusters on one machine never share one.

Every process node hands out pod IPs from the same loopback range by default, and several
clusters may run on one machine at the same time (a developer's next to another's, a second
cluster in the same test session). A pod whose address another cluster's pod already uses
cannot bind its ports, or, worse, shares them. So each address a kubelet hands out is claimed
first: an exclusive ``flock`` on a file named after the address in a directory every kubelet
of the machine uses. The kernel drops the lock when the kubelet closes the file or exits,
however it exits, so nothing is left to clean up; the files themselves stay (empty).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

#: Where every kubelet of the machine claims its pod IPs (``--address-claims``).
DEFAULT_CLAIMS_DIR = Path(tempfile.gettempdir()) / "backdial-pod-ips"


class AddressClaims:
    """The pod IPs this kubelet holds, each locked in the machine-wide directory."""

    def __init__(self, directory: Path = DEFAULT_CLAIMS_DIR) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._held: dict[str, int] = {}

    def claim(self, address: str) -> bool:
        """Lock *address* for this kubelet; False when another kubelet holds it."""
        if address in self._held:
            return True
        fd = os.open(self.directory / address, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[address] = fd
        return True

    def release(self, address: str) -> None:
        fd = self._held.pop(address, None)
        if fd is not None:
            os.close(fd)  # unlocks

    def close(self) -> None:
        for address in list(self._held):
            self.release(address)
