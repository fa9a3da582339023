"""The acceptor's books: sessions, registrants, slice quotas, waiters; no IO.

Every capacity decision is made here, so the invariants can be tested without
sockets: a session is leased to at most one worker; a slice's leases stay
within its apportioned quota unless it may borrow sessions that no
under-quota slice is waiting for; waiters are served in arrival order; the
idle session handed out next comes from the next registrant on a ring.

Requests that may not wait (ASK, revision 3) are served after the FIFO, only
from sessions idle now; what cannot be served is refused or first asked back
from workers that may hold it idle (planned in ``asking.py``).

The IO shell (``server.py``) feeds events in and carries out the returned
grants and recalls (which sessions to recall is planned in ``lending.py``).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from enum import StrEnum

from backdial.control import ASK_REVISION, REVISION, WantKey
from backdial.policy import Policy, Slice


class DropReason(StrEnum):
    """Why the acceptor closed a session (label of ``..._sessions_dropped_total``)."""

    DEAD = "dead"  # the service closed it while idle
    RETIRED = "retired"  # RETIRE while idle, or a worker released it retired
    PROTOCOL = "protocol"  # unexpected bytes on an idle session
    BROKEN = "broken"  # a worker released it broken (or could not use it)
    RECLAIMED = "reclaimed"  # leased to a worker that went away
    SHUTDOWN = "shutdown"  # the acceptor stopped
    CAPPED = "capped"  # retired by the acceptor: the pod's session cap shrank


@dataclass(slots=True)
class Session:
    id: int
    registrant: int
    service: str
    fd: int
    worker: int = 0  # 0 = idle at the acceptor
    slice: str = ""


@dataclass(slots=True)
class Registrant:
    id: int
    service: str
    instance: str
    slice_hint: str | None
    sessions: set[int] = field(default_factory=set)
    idle: collections.deque[int] = field(default_factory=collections.deque)
    served: int = 0  # leases granted, for fairness observation


@dataclass(frozen=True, slots=True)
class GrantAction:
    worker: int
    session: Session
    requested: str  # the service key the worker asked under
    prefetch: bool = False  # not counted against the worker's WANT
    asked: bool = False  # answers one ASK unit (not counted against the WANT either)


@dataclass(frozen=True, slots=True)
class RecallAction:
    """Ask *worker* to give back *n* sessions of *service* leased for *slice* ("" = any)."""

    worker: int
    service: str
    slice: str
    n: int
    now: bool = False  # only sessions idle now, answered at once: a probe for an ASK


@dataclass(slots=True)
class Ask:
    """Requests of one worker that may not wait: served now, or refused."""

    worker: int
    key: WantKey
    n: int  # units not answered yet
    probed: bool = False  # its first round of probes was planned
    probes: int = 0  # probe records (RECALL now) not answered yet that it waits for
    yielded: bool = False  # the answers to its last round brought sessions back
    rounds: int = 0  # rounds of probes planned after the first (bounded: asking.ROUNDS)


@dataclass(slots=True)
class Probe:
    """A RECALL ``now`` sent to a worker: sessions of (service, slice) it may hold idle."""

    service: str
    slice: str
    n: int
    asks: list[int]  # the asks waiting for its answer


# Outstanding recalls: (worker, service, slice the sessions are leased for; "" = any).
RecallKey = tuple[int, str, str]


@dataclass(slots=True)
class ServiceBook:
    registrants: list[int] = field(default_factory=list)  # the fairness ring
    cursor: int = 0
    leased: collections.Counter[str] = field(default_factory=collections.Counter)
    idle_count: int = 0
    total: int = 0
    empty_since: float = 0.0  # when a sweep first saw it without sessions (0: it has some)


def apportion(total: int, shares: dict[str, int]) -> dict[str, int]:
    """Largest-remainder split of *total* sessions by percentage shares.

    Quotas always add up to *total*, and ties go to the slice listed first, so
    the split is deterministic.
    """
    exact = {name: total * share / 100 for name, share in shares.items()}
    quota = {name: int(value) for name, value in exact.items()}
    spare = total - sum(quota.values())
    order = sorted(shares, key=lambda n: (-(exact[n] - quota[n]), list(shares).index(n)))
    for name in order[:spare]:
        quota[name] += 1
    return quota


class Ledger:
    """Pure accounting; methods return the grants the shell must send."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.sessions: dict[int, Session] = {}
        self.registrants: dict[int, Registrant] = {}
        self.services: dict[str, ServiceBook] = {}
        self.service_order: list[str] = []
        # wants[worker][key] = number of that worker's requests waiting for a lease
        self.wants: dict[int, collections.Counter[WantKey]] = {}
        # FIFO of waiting units across all workers: (seq, worker, key)
        self.queue: collections.OrderedDict[int, tuple[int, WantKey]] = collections.OrderedDict()
        self._units: dict[tuple[int, WantKey], list[int]] = collections.defaultdict(list)
        self._seq = itertools.count(1)
        self._sid = itertools.count(1)
        self._rid = itertools.count(1)
        self.recalls: collections.Counter[RecallKey] = collections.Counter()
        # Workers that predate sliced RECALLs: they give back any session of the service.
        self.unsliced: set[int] = set()
        self.revisions: dict[int, int] = {}  # each worker's HELLO revision
        # Requests that may not wait, in arrival order, and the probes sent for them.
        self.asks: dict[int, Ask] = {}
        self.probes: dict[int, collections.deque[Probe]] = collections.defaultdict(
            collections.deque
        )
        self._ask_ids = itertools.count(1)
        self._quota_cache: dict[str, dict[str, int]] = {}
        self.held_by: collections.Counter[tuple[int, int]] = collections.Counter()

    # -- policy ---------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._quota_cache.clear()
        valid = {s.name for s in policy.slices}
        # Waiters of a slice that no longer exists move to the default slice, keeping order.
        for seq, (worker, key) in list(self.queue.items()):
            if key[1] not in valid:
                self.queue[seq] = (worker, (key[0], policy.default_slice))

    def slice_spec(self, name: str) -> Slice | None:
        return next((s for s in self.policy.slices if s.name == name), None)

    def quotas(self, service: str) -> dict[str, int]:
        cached = self._quota_cache.get(service)
        if cached is None:
            book = self.services.get(service)
            shares = {s.name: s.share for s in self.policy.slices}
            cached = apportion(book.total if book else 0, shares)
            self._quota_cache[service] = cached
        return cached

    def resolve(self, requested: str) -> str | None:
        """The service a key names; "" means the configured or first-registered service."""
        if requested:
            return requested if requested in self.services else None
        default = self.policy.default_service
        if default:
            return default if default in self.services else None
        return self.service_order[0] if self.service_order else None

    # -- registrants and sessions ----------------------------------------------
    def add_registrant(self, service: str, instance: str, slice_hint: str | None) -> Registrant:
        reg = Registrant(next(self._rid), service, instance, slice_hint)
        self.registrants[reg.id] = reg
        book = self.services.get(service)
        if book is None:
            book = self.services[service] = ServiceBook()
            self.service_order.append(service)
        book.registrants.append(reg.id)
        return reg

    def find_registrant(self, service: str, instance: str) -> Registrant | None:
        for reg in self.registrants.values():
            if reg.service == service and reg.instance == instance:
                return reg
        return None

    def add_session(self, reg: Registrant, fd: int) -> Session:
        sess = Session(next(self._sid), reg.id, reg.service, fd)
        self.sessions[sess.id] = sess
        reg.sessions.add(sess.id)
        reg.idle.append(sess.id)
        book = self.services[reg.service]
        book.total += 1
        book.idle_count += 1
        self._quota_cache.pop(reg.service, None)
        return sess

    def drop_session(self, sid: int) -> Session | None:
        """Forget a session (dead, retired or broken); its registrant goes with its last one."""
        sess = self.sessions.pop(sid, None)
        if sess is None:
            return None
        reg = self.registrants[sess.registrant]
        reg.sessions.discard(sid)
        book = self.services[sess.service]
        book.total -= 1
        if sess.worker:
            book.leased[sess.slice] -= 1
            self.held_by[(sess.worker, sess.registrant)] -= 1
        else:
            reg.idle.remove(sid)
            book.idle_count -= 1
        self._quota_cache.pop(sess.service, None)
        if not reg.sessions:
            del self.registrants[reg.id]
            book.registrants.remove(reg.id)
            for hkey in [k for k in self.held_by if k[1] == reg.id]:
                del self.held_by[hkey]
        return sess

    # -- forgetting services -------------------------------------------------------
    # A service name lives on (metrics, default-service choice) while it has sessions
    # and for a while after, so a restarting service keeps its series; names that
    # come and go must not grow the books, /metrics and /v1/state without bound.
    def sweep_services(self, now: float, ttl: float) -> list[str]:
        """Forget services without sessions for *ttl* seconds (as seen by sweeps)."""
        gone: list[str] = []
        for name, book in self.services.items():
            if book.total or book.registrants:
                book.empty_since = 0.0
            elif not book.empty_since:
                book.empty_since = now
            elif now - book.empty_since >= ttl:
                gone.append(name)
        for name in gone:
            self._forget_service(name)
        return gone

    def evict_empty_service(self) -> str | None:
        """Make room for a new service: forget the longest-empty one, if any is empty."""
        empty = [
            (book.empty_since or float("inf"), name)
            for name, book in self.services.items()
            if not book.total and not book.registrants
        ]
        if not empty:
            return None
        name = min(empty)[1]
        self._forget_service(name)
        return name

    def _forget_service(self, name: str) -> None:
        del self.services[name]
        self.service_order.remove(name)
        self._quota_cache.pop(name, None)
        for rkey in [k for k in self.recalls if k[1] == name]:
            del self.recalls[rkey]

    # -- workers ----------------------------------------------------------------
    def add_worker(self, worker: int, revision: int = REVISION) -> None:
        """A worker joined, speaking control protocol *revision* (its HELLO): from 2 it
        honours the slice a RECALL names, from 3 it answers RECALLs ``now`` (probes)."""
        self.wants[worker] = collections.Counter()
        self.revisions[worker] = revision
        if revision < 2:
            self.unsliced.add(worker)

    def probes_answer(self, worker: int) -> bool:
        """True when *worker* answers a RECALL ``now`` at once (revision 3)."""
        return self.revisions.get(worker, 1) >= ASK_REVISION

    def remove_worker(self, worker: int) -> list[Session]:
        """Forget a worker; returns the sessions it held, which the shell must close."""
        for key in list(self.wants.get(worker, ())):
            self.set_want(worker, key, 0)
        self.wants.pop(worker, None)
        self.unsliced.discard(worker)
        self.revisions.pop(worker, None)
        for ask_id in [i for i, ask in self.asks.items() if ask.worker == worker]:
            del self.asks[ask_id]
        self.probes_answered(worker, len(self.probes.get(worker, ())))  # never will be
        self.probes.pop(worker, None)
        for rkey in [k for k in self.recalls if k[0] == worker]:
            del self.recalls[rkey]
        for hkey in [k for k in self.held_by if k[0] == worker]:
            del self.held_by[hkey]
        held = [s for s in self.sessions.values() if s.worker == worker]
        for sess in held:
            self.drop_session(sess.id)
        return held

    def set_want(self, worker: int, key: WantKey, n: int) -> None:
        """A worker reports how many of its requests wait for (service, slice)."""
        wants = self.wants.get(worker)
        if wants is None:
            return
        units = self._units[(worker, key)]
        while len(units) < n:
            seq = next(self._seq)
            units.append(seq)
            self.queue[seq] = (worker, key)
        while len(units) > n:
            # The newest units go first, so the oldest keep their place in line.
            self.queue.pop(units.pop(), None)
        if n:
            wants[key] = n
        else:
            wants.pop(key, None)
            self._units.pop((worker, key), None)

    # -- requests that may not wait (ASK) ------------------------------------------------
    def add_ask(self, worker: int, key: WantKey, n: int) -> None:
        """*n* requests of *worker* want a session of *key* only if one can be had now;
        ``pump`` serves them after the FIFO, ``asking.settle`` probes or refuses the rest."""
        if worker not in self.wants or n <= 0:
            return
        last = next(reversed(self.asks.values()), None) if self.asks else None
        if last is not None and not last.probed and (last.worker, last.key) == (worker, key):
            last.n += n  # the same worker's asks of one loop iteration are one
        else:
            self.asks[next(self._ask_ids)] = Ask(worker, key, n)

    def asks_of(self, worker: int) -> int:
        return sum(1 for ask in self.asks.values() if ask.worker == worker)

    def probes_answered(self, worker: int, k: int, returned: int = 0) -> None:
        """*worker* answered its *k* oldest probes (RELEASE ``answers``; the *returned*
        sessions it had idle came with it and are idle here now)."""
        queue = self.probes.get(worker)
        while queue and k > 0:
            probe = queue.popleft()
            k -= 1
            for ask_id in probe.asks:
                ask = self.asks.get(ask_id)
                if ask is not None:
                    ask.probes -= 1
                    ask.yielded = ask.yielded or returned > 0

    def waiting(self) -> collections.Counter[WantKey]:
        """Waiting requests per (resolved service, slice), summed over workers."""
        out: collections.Counter[WantKey] = collections.Counter()
        for wants in self.wants.values():
            for (requested, slice_name), n in wants.items():
                out[(self.resolve(requested) or requested, slice_name)] += n
        return out

    # -- grants -------------------------------------------------------------------
    def permitted(
        self, service: str, slice_name: str, waiting: collections.Counter[WantKey]
    ) -> bool:
        book = self.services.get(service)
        if book is None or book.idle_count == 0:
            return False
        quotas = self.quotas(service)
        if book.leased[slice_name] < quotas.get(slice_name, 0):
            return True
        spec = self.slice_spec(slice_name)
        if spec is None or not spec.borrow:
            return False
        # Borrow only sessions that no under-quota slice is waiting for.
        owed = 0
        for other, quota in quotas.items():
            if other != slice_name:
                owed += min(max(0, quota - book.leased[other]), waiting[(service, other)])
        return book.idle_count - owed >= 1

    def _pick_registrant(self, book: ServiceBook, worker: int) -> Registrant | None:
        """The registrant to lease from: the one this worker holds fewest sessions of,
        ties broken by the round-robin ring.

        Balancing what each worker holds keeps the worker's own rotation fair
        (invariant 8): a worker holding two sessions of A and one of B would
        serve A twice as often whenever B's session is busy.
        """
        ring = book.registrants
        best: Registrant | None = None
        best_held = 0
        best_pos = 0
        for step in range(len(ring)):
            pos = (book.cursor + step) % len(ring)
            reg = self.registrants[ring[pos]]
            if not reg.idle:
                continue
            held = self.held_by[(worker, reg.id)]
            if best is None or held < best_held:
                best, best_held, best_pos = reg, held, pos
        if best is not None:
            book.cursor = (best_pos + 1) % len(ring)
        return best

    def lease(self, service: str, worker: int, slice_name: str) -> Session:
        book = self.services[service]
        reg = self._pick_registrant(book, worker)
        if reg is None:
            raise AssertionError("idle_count and the ring disagree")
        sess = self.sessions[reg.idle.popleft()]
        reg.served += 1
        book.idle_count -= 1
        book.leased[slice_name] += 1
        self.held_by[(worker, reg.id)] += 1
        sess.worker = worker
        sess.slice = slice_name
        return sess

    def _balanced(self, service: str, worker: int) -> bool:
        """True when no registrant with idle sessions is held less by *worker* than another."""
        book = self.services[service]
        counts = [self.held_by[(worker, r)] for r in book.registrants]
        lowest_idle = min(
            (self.held_by[(worker, r)] for r in book.registrants if self.registrants[r].idle),
            default=None,
        )
        return lowest_idle is None or lowest_idle >= max(counts, default=0)

    def pump(self, prefetch: int = 0) -> list[GrantAction]:
        """Serve waiting units in FIFO order while sessions and quotas allow."""
        grants: list[GrantAction] = []
        if not self.queue and not self.asks:
            return grants
        waiting = self.waiting()
        for seq, (worker, key) in list(self.queue.items()):
            service = self.resolve(key[0])
            if service is None or not self.permitted(service, key[1], waiting):
                continue
            sess = self.lease(service, worker, key[1])
            grants.append(GrantAction(worker, sess, key[0]))
            del self.queue[seq]
            self._units[(worker, key)].remove(seq)
            wants = self.wants[worker]
            wants[key] -= 1
            if wants[key] <= 0:
                del wants[key]
            waiting[(service, key[1])] -= 1
        # Requests that may not wait come after every waiting one: they get what is idle
        # now that the FIFO could not use (the same rules; never a session it could).
        for ask in self.asks.values():
            service = self.resolve(ask.key[0])
            while ask.n and service is not None and self.permitted(service, ask.key[1], waiting):
                sess = self.lease(service, ask.worker, ask.key[1])
                grants.append(GrantAction(ask.worker, sess, ask.key[0], asked=True))
                ask.n -= 1
        # A worker that was just served may take a few idle sessions more, only to even
        # out how many it holds per registrant (so its rotation is fair without another
        # round trip), and only while nobody else waits or asks.
        served = {(g.worker, g.requested, g.session.slice, g.session.service) for g in grants}
        for worker, requested, slice_name, service in served:
            for _ in range(prefetch):
                if (
                    self.queue
                    or any(ask.n for ask in self.asks.values())
                    or self._balanced(service, worker)
                    or not self.permitted(service, slice_name, waiting)
                ):
                    break
                sess = self.lease(service, worker, slice_name)
                grants.append(GrantAction(worker, sess, requested, prefetch=True))
        return grants

    def give_back(self, sid: int, worker: int) -> bool:
        """A worker returned a clean idle session; False if it was not that worker's."""
        sess = self.sessions.get(sid)
        if sess is None or sess.worker != worker:
            return False
        book = self.services[sess.service]
        slice_name = sess.slice
        book.leased[slice_name] -= 1
        book.idle_count += 1
        self.held_by[(worker, sess.registrant)] -= 1
        sess.worker = 0
        sess.slice = ""
        self.registrants[sess.registrant].idle.append(sid)
        self._settle_recall(worker, sess.service, slice_name)
        return True

    def _settle_recall(self, worker: int, service: str, slice_name: str) -> None:
        """An idle session came back: it answers a recall of its own slice first, else an
        any-slice one (the worker's ``LeaseBook.settle`` decides in the same order). A
        worker that ignores a RECALL's slice may answer any of that service's recalls."""
        keys = [(worker, service, slice_name), (worker, service, "")]
        if worker in self.unsliced:
            keys += [k for k in self.recalls if k[:2] == (worker, service)]
        for key in keys:
            if self.recalls[key] > 0:
                self.recalls[key] -= 1
                if not self.recalls[key]:
                    del self.recalls[key]
                return

    def recalling(self, worker: int, service: str) -> int:
        """Sessions of *service* that *worker* was asked for and has not given back yet."""
        return sum(n for (w, s, _), n in self.recalls.items() if w == worker and s == service)
