"""Reconnect pacing and state-change logging for the dialer.

Backoff is capped exponential with *full jitter* (a uniformly random delay
between 0 and the capped exponential): many instances losing the same
acceptor at once then spread their redials instead of arriving in waves.
``StateLog`` keeps the log readable during an outage: a line when the
state changes, and at most one reminder per interval while it persists.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        base: float = 0.05,
        cap: float = 2.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        return min(self.cap, self.base * (2.0 ** min(self.attempt, 32)))

    def next(self) -> float:
        delay = self._rng() * self.ceiling()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class StateLog:
    """Logs a message when *state* changes; repeats of a state are rate-limited."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self.state: str | None = None
        self._last = 0.0
        self._suppressed = 0

    def report(self, state: str, level: int, msg: str, *args: object) -> bool:
        """Log unless *state* is current and was logged within the interval; True if logged."""
        now = self._clock()
        if state == self.state and now - self._last < self._interval:
            self._suppressed += 1
            return False
        if state == self.state and self._suppressed:
            msg += " (repeated %d times)"
            args = (*args, self._suppressed)
        self.state = state
        self._last = now
        self._suppressed = 0
        self._logger.log(level, msg, *args)
        return True
