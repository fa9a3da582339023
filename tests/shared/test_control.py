"""The control protocol's records without sockets: round trips and every refusal of decode."""

from __future__ import annotations

import json

import pytest

from backdial import control
from backdial.control import Kind, ProtocolError, Rejection, ReleaseState


def _record(kind: int, body: object, version: int = control.VERSION) -> bytes:
    return bytes((version, kind)) + json.dumps(body).encode()


@pytest.mark.parametrize(
    "msg",
    [
        control.Hello(41, "w"),
        control.Hello(41, "w", control.REVISION),
        control.ConfigMsg(3, {"version": 1}, 2, 4, 1),
        control.Want("", "default", 7),
        control.Grant([control.Granted(1, "svc", "default", 9, "", prefetch=True)]),
        control.Release([control.Released(1, ReleaseState.RETIRED)]),
        control.Recall("svc", 2),
        control.Recall("svc", 2, "bulk"),
        control.Recall("svc", 2, "bulk", now=True),
        control.Release([control.Released(3, ReleaseState.IDLE)], answers=2),
        control.Release([], answers=1),
        control.Grant([control.Granted(1, "svc", "default", 9, "", asked=True)]),
        control.ConfigMsg(3, {"version": 1}, 2, 4, 1, control.REVISION),
        control.Ask("", "default", 3),
        control.Refuse("svc", "default", 1),
        control.Listen("0.0.0.0:8080"),
        control.Listener("0.0.0.0:8080"),
        control.Error(control.ErrorCode.LISTEN, "address in use"),
        control.Stats({f"rejected|default|{Rejection.TIMEOUT}": 2.0}),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip(msg: control.Message) -> None:
    record = control.encode(msg)
    assert record[:2] == bytes((control.VERSION, control.kind_of(msg)))
    assert control.decode(record) == msg


def test_release_state_is_typed() -> None:
    msg = control.decode(_record(Kind.RELEASE, {"sessions": [{"session": 1, "state": "idle"}]}))
    assert isinstance(msg, control.Release)
    assert msg.sessions[0].state is ReleaseState.IDLE


def test_unknown_fields_are_ignored() -> None:
    msg = control.decode(_record(Kind.WANT, {"service": "", "slice": "a", "n": 1, "later": 5}))
    assert msg == control.Want("", "a", 1)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"", "shorter than 3 bytes"),
        (b"\x01\x03", "shorter than 3 bytes"),
        (_record(Kind.WANT, {}, version=2), "unsupported control version 2"),
        (bytes((control.VERSION, 99)) + b"{}", "unknown message type 99"),
        (bytes((control.VERSION, Kind.HELLO)) + b"{not json", "HELLO: body is not JSON"),
        (bytes((control.VERSION, Kind.HELLO)) + b"\xff\xfe", "HELLO: body is not JSON"),
        (_record(Kind.HELLO, [1, 2]), "HELLO: body must be a JSON object"),
        (_record(Kind.HELLO, {"name": "x"}), "HELLO: bad fields"),  # pid missing
        (_record(Kind.HELLO, {"pid": "1"}), "HELLO: bad fields: pid must be int"),
        (_record(Kind.HELLO, {"pid": True}), "HELLO: bad fields: pid must be int"),
        (_record(Kind.WANT, {"service": "", "slice": "a", "n": -1}), "WANT: bad fields"),
        (_record(Kind.GRANT, {}), "GRANT: bad fields"),
        (_record(Kind.GRANT, {"leases": [1]}), "GRANT: bad fields: expected an object"),
        (
            _record(
                Kind.GRANT,
                {
                    "leases": [
                        {"session": 1, "service": "s", "slice": "d", "registrant": 1, "prefetch": 1}
                    ]
                },
            ),
            "GRANT: bad fields: prefetch must be bool",
        ),
        (
            _record(Kind.RELEASE, {"sessions": [{"session": 1, "state": "lost"}]}),
            "RELEASE: bad fields: 'lost' is not a valid ReleaseState",
        ),
        (_record(Kind.RELEASE, {"sessions": [{"session": 1}]}), "RELEASE: bad fields"),
        (_record(Kind.RECALL, {"service": "s", "n": 0}), "RECALL: bad fields: recall n"),
        (_record(Kind.RECALL, {"service": "s", "n": 1, "slice": 3}), "slice must be str"),
        (_record(Kind.HELLO, {"pid": 1, "revision": 0}), "HELLO: bad fields: hello revision"),
        (
            _record(
                Kind.CONFIG,
                {
                    "generation": 1,
                    "config": {},
                    "worker": 1,
                    "workers": 1,
                    "index": 0,
                    "revision": 0,
                },
            ),
            "CONFIG: bad fields: config revision",
        ),
        (_record(Kind.ASK, {"service": "", "slice": "a", "n": 0}), "ASK: bad fields: ask n"),
        (_record(Kind.ASK, {"service": "", "slice": "a"}), "ASK: bad fields"),
        (_record(Kind.ASK, {"service": "x" * 300, "slice": "a", "n": 1}), "ask names longer"),
        (_record(Kind.REFUSE, {"service": "", "slice": "a", "n": 0}), "REFUSE: bad fields"),
        (_record(Kind.RECALL, {"service": "s", "n": 1, "now": 1}), "now must be bool"),
        (_record(Kind.RELEASE, {"sessions": [], "answers": -1}), "release answers must be"),
        (_record(Kind.RELEASE, {"sessions": [], "answers": True}), "answers must be int"),
    ],
)
def test_decode_refuses_with_a_reason(record: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        control.decode(record)
    assert reason in str(info.value)


def test_encode_refuses_an_oversized_record() -> None:
    with pytest.raises(ValueError, match="too large"):
        control.encode(control.ConfigMsg(1, {"x": "y" * control.MAX_RECORD}, 1, 1, 0))


def test_revision_2_fields_are_optional_both_ways() -> None:
    """A revision-1 peer's records decode as before; a revision-2 record to a revision-1
    peer only adds a field it ignores (docs/protocol.md, 2.5)."""
    assert control.decode(_record(Kind.HELLO, {"pid": 7, "name": "w"})) == control.Hello(7, "w")
    assert control.Hello(7, "w").revision == 1
    old = control.decode(_record(Kind.RECALL, {"service": "demo", "n": 1}))
    assert old == control.Recall("demo", 1) and old.slice == ""


def test_recall_record_bytes_as_documented() -> None:
    record = control.encode(control.Recall("demo", 1, "bulk"))
    assert record == b'\x01\x06{"service":"demo","n":1,"slice":"bulk"}'
    assert record.hex(" ") == (
        "01 06 7b 22 73 65 72 76 69 63 65 22 3a 22 64 65 6d 6f 22 2c 22 6e 22 3a 31 2c 22 73 "
        "6c 69 63 65 22 3a 22 62 75 6c 6b 22 7d"
    )
    hello = control.encode(control.Hello(4242, "w0", control.REVISION))
    assert hello == b'\x01\x01{"pid":4242,"name":"w0","revision":3}'


def test_revision_3_fields_are_left_out_unless_used() -> None:
    """Records that do not use ASK's fields are byte for byte what revision 2 sent, so an
    older worker sees nothing new; a revision-2 peer's records decode with the defaults."""
    grant = control.encode(control.Grant([control.Granted(1, "svc", "default", 9)]))
    assert b"asked" not in grant
    assert control.encode(control.Recall("demo", 1, "bulk")) == (
        b'\x01\x06{"service":"demo","n":1,"slice":"bulk"}'
    )
    assert control.encode(control.Release([])) == b'\x01\x05{"sessions":[]}'
    old = control.decode(
        _record(Kind.CONFIG, {"generation": 1, "config": {}, "worker": 1, "workers": 2, "index": 0})
    )
    assert isinstance(old, control.ConfigMsg) and old.revision == 1  # never ask it


def test_ask_records_bytes_as_documented() -> None:
    """docs/protocol.md 2.5: the examples of revision 3."""
    ask = control.encode(control.Ask("", "default", 1))
    assert ask == b'\x01\x0b{"service":"","slice":"default","n":1}'
    assert ask.hex(" ") == (
        "01 0b 7b 22 73 65 72 76 69 63 65 22 3a 22 22 2c 22 73 6c 69 63 65 22 3a 22 64 65 "
        "66 61 75 6c 74 22 2c 22 6e 22 3a 31 7d"
    )
    refuse = control.encode(control.Refuse("", "default", 1))
    assert refuse == b'\x01\x0c{"service":"","slice":"default","n":1}'
    probe = control.encode(control.Recall("demo", 1, "default", now=True))
    assert probe == b'\x01\x06{"service":"demo","n":1,"slice":"default","now":true}'
    answer = control.encode(control.Release([], answers=1))
    assert answer == b'\x01\x05{"sessions":[],"answers":1}'
    granted = control.encode(
        control.Grant([control.Granted(7, "demo", "default", 2, "", asked=True)])
    )
    assert granted == (
        b'\x01\x04{"leases":[{"session":7,"service":"demo","slice":"default",'
        b'"registrant":2,"requested":"","prefetch":false,"asked":true}]}'
    )
