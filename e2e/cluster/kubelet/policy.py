"""Restart decisions and crash back-off, as pure functions.

Kubernetes restarts a container according to the pod's ``restartPolicy`` (native
sidecars always restart, init containers never restart after success) and delays each
restart exponentially (``CrashLoopBackOff``) until the container has run well for a while.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import ContainerKind


def should_restart(kind: ContainerKind, pod_policy: str, exit_code: int) -> bool:
    """Whether a container that exited with ``exit_code`` is started again."""
    if kind is ContainerKind.SIDECAR:
        return True
    if kind is ContainerKind.INIT:
        return exit_code != 0 and pod_policy != "Never"
    if pod_policy == "Always":
        return True
    if pod_policy == "OnFailure":
        return exit_code != 0
    return False


@dataclass(frozen=True)
class Backoff:
    """Exponential restart back-off: ``base``, doubling per crash, capped at ``cap``
    seconds; a run of at least ``reset_after`` seconds forgets earlier crashes."""

    base: float = 1.0
    cap: float = 30.0
    reset_after: float = 60.0

    def delay(self, crashes: int) -> float:
        """Delay before the restart that follows the ``crashes``-th consecutive crash."""
        if crashes <= 0:
            return 0.0
        return float(min(self.cap, self.base * 2 ** (crashes - 1)))

    def crashes_after(self, previous: int, ran_for: float) -> int:
        """Consecutive crash count after a run of ``ran_for`` seconds ended."""
        return 1 if ran_for >= self.reset_after else previous + 1


def grace_left(deadline: float, now: float, minimum: float = 0.0) -> float:
    """Seconds left until ``deadline`` (never below ``minimum``)."""
    return max(minimum, deadline - now)
