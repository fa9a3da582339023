"""``LeasePool`` is assembled from parts (poolbase.py): guard how they fit together.

Two things would break silently: a method defined in two parts (then the method
resolution order, not the code, decides which one runs), and a hook that
``NativeLeasePool`` overrides being renamed or changing its parameters in a part
(then the native engine's pool would run the Python book's version).  No real
pool is needed to check the classes themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from backdial.sidecar import leasepool, poolbase
from backdial.sidecar.leasepool import LeasePool
from backdial.sidecar.nativepool import NativeLeasePool

# The hooks SHAPES.md documents (native, engineask): the only way the shell touches the book.
HOOKS = (
    "try_acquire",
    "release",
    "lost",
    "_settle",
    "cancel",
    "_waiting_in",
    "_enqueue",
    "waiting_counts",
    "_forget_leases",
    "_recall_idle",
    "_count_returned",
    "_idle_since_before",
    "_idle_now",
    "_flush_want",
    "_apply_config",
    "counters",
    "close",
    "_ask",
    "_take_unsent",
    "_granted",
    "_ask_refused",
    "_adopted",
    "_forget_asks",
    "asking_counts",
    "busy",
    "idle",
    "recall",
    "waiting",
)


def _parts() -> list[type]:
    return [c for c in LeasePool.__mro__ if c.__module__.startswith("backdial.sidecar.")]


def _params(func: Callable[..., object]) -> list[tuple[str, object, object]]:
    # Names, kinds and defaults; the types are mypy's to compare (annotations are strings).
    sig = inspect.signature(func)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_each_method_is_defined_in_one_part_only() -> None:
    parts = _parts()
    assert {c.__name__ for c in parts} == {
        "LeasePool",
        "WaitQueue",
        "Asker",
        "ControlClient",
        "PoolBase",
    }
    home: dict[str, str] = {}
    for part in parts:
        for name in vars(part):
            if name.startswith("__"):
                continue
            assert name not in home, f"{name} is defined in {home[name]} and {part.__name__}"
            home[name] = part.__name__


def test_native_pool_overrides_the_documented_hooks_with_their_signatures() -> None:
    for name in HOOKS:
        assert name in vars(NativeLeasePool), f"NativeLeasePool no longer overrides {name}"
        assert hasattr(LeasePool, name), f"LeasePool has no hook {name}"
    for name, ours in vars(NativeLeasePool).items():
        if name.startswith("__") or not hasattr(LeasePool, name):
            continue
        theirs = inspect.getattr_static(LeasePool, name)
        if isinstance(ours, property):
            assert isinstance(theirs, property), name
            continue
        assert _params(ours) == _params(theirs), name


def test_the_refusals_are_importable_from_leasepool() -> None:
    for name in ("Refused", "QueueFull", "QueueTimeout", "Draining"):
        assert getattr(leasepool, name) is getattr(poolbase, name)
        assert issubclass(getattr(leasepool, name), leasepool.Refused)
