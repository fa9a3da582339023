"""The pod's session cap (limits.maxSessions, what the operator sets): registrations
beyond it are refused with ERR limit; lowering it retires surplus sessions (idle ones at
once, leased ones once their request finished) and raising it lets services re-register,
all under load with zero failed requests."""

from __future__ import annotations

import pytest

from tests.helpers import get_json, wait_for
from tests.stack.conftest import Stack
from tests.stack.test_stack import Load

pytestmark = pytest.mark.slow


def cap_config(cap: int) -> str:
    return f"limits: {{maxSessions: {cap}}}\nslices: [{{name: default, share: 100}}]\n"


def test_cap_refuses_then_shrinks_and_grows_under_load(stack: Stack) -> None:
    stack.start(sessions=0, config=cap_config(4))
    stack.service("a", sessions=3)
    stack.service("b", sessions=3)  # 6 wanted, 4 admitted
    wait_for(lambda: stack.registered() == 4, what="4 sessions (the cap)")
    wait_for(lambda: stack.metric("backdial_acceptor_registrations_total", result="limit") > 0)
    stack.wait_ready()
    with Load(stack.port, "/delay?ms=20", clients=6) as load:
        for cap in (2, 1, 3, 4, 2):
            stack.config_path.write_text(cap_config(cap))
            wait_for(lambda cap=cap: stack.registered() == cap, timeout=15, what=f"{cap} sessions")
            load.wait_more(25)  # requests flow at every cap
    assert load.failures() == {} and load.total > 100
    assert stack.metric("backdial_acceptor_sessions_dropped_total", reason="capped") >= 3
    state = get_json(stack.acceptor_url("/v1/state"))
    assert state["limits"]["maxSessions"] == 2
