"""Fuzzing the registration preamble, the control record decoder and the config loader.

Each target takes anything (arbitrary bytes, or mutations of valid input) and
must either parse it into a value that round-trips, or refuse it with its own
error type, never any other exception: a peer can send these bytes.  Profiles
(CI and the long run) are in tests/conftest.py; crashes found become examples
here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from backdial import control, wire
from backdial.policy import Policy, PolicyError, load_policy, policy_from_data

_VALUE = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789._~:@+-", min_size=1, max_size=128
)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, byte in edits:
        if out:
            out[pos % len(out)] = byte
    return bytes(out)


# -- registration preamble ------------------------------------------------------------------
@given(st.binary(max_size=1200))
@example(b"BDREG/1 service=a instance=b\r\n\r\n")
@example(b"BDREG/1 =x\r\n")
@example(b"BDREG/1 service=\xff instance=b\r\n")
def test_preamble_parser_takes_any_bytes(raw: bytes) -> None:
    try:
        end = wire.find_line(raw)
    except wire.PreambleError as exc:
        assert exc.code in (wire.ErrCode.TOO_LONG, wire.ErrCode.MALFORMED)
        return
    if end < 0:
        assert len(raw) < wire.MAX_PREAMBLE and b"\n" not in raw
        return
    try:
        pre = wire.parse_preamble(raw[:end])
    except wire.PreambleError as exc:
        assert isinstance(exc.code, wire.ErrCode)
        assert wire.encode_err(exc.code, exc.message).endswith(b"\r\n")  # answerable
        return
    assert wire.parse_preamble(pre.encode()) == pre


@given(
    _VALUE, _VALUE, st.none() | _VALUE, st.none() | _VALUE,
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
)  # fmt: skip
def test_preambles_round_trip_and_mutations_are_refused_cleanly(
    service: str, instance: str, slice_: str | None, token: str | None, edits: list[tuple[int, int]]
) -> None:
    pre = wire.Preamble(service, instance, slice_, token)
    line = pre.encode()
    assert wire.parse_preamble(line) == pre
    mutated = _mutate(line, edits)
    try:
        end = wire.find_line(mutated)
        if end > 0:
            wire.parse_preamble(mutated[:end])
    except wire.PreambleError:
        pass


# -- control records ---------------------------------------------------------------------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
_FIELDS = ["pid", "name", "service", "slice", "n", "leases", "session", "registrant", "requested",
           "prefetch", "sessions", "state", "address", "code", "message", "counters", "generation",
           "config", "worker", "workers", "index", "revision", "asked", "now",
           "answers"]  # fmt: skip


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300))
def test_control_decoder_takes_any_bytes(version: int, kind: int, body: bytes) -> None:
    _decode_or_refuse(bytes((version, kind)) + body)


@given(
    st.sampled_from(list(control.Kind)),
    st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=8),
)
@example(control.Kind.STATS, {"counters": {"x": "nan-string"}})
@example(control.Kind.STATS, {"counters": {"rejected|x": 1}})
@example(control.Kind.WANT, {"service": "", "slice": "default", "n": 1_000_000_000})
def test_control_records_with_any_fields(kind: control.Kind, fields: dict[str, Any]) -> None:
    _decode_or_refuse(bytes((control.VERSION, kind)) + json.dumps(fields).encode())


def _decode_or_refuse(record: bytes) -> None:
    try:
        msg = control.decode(record)
    except control.ProtocolError:
        return
    again = control.decode(control.encode(msg))
    assert again == msg or _has_nan(msg)  # NaN never equals itself
    if isinstance(msg, control.Want):
        assert 0 <= msg.n <= control.MAX_WANT
    if isinstance(msg, control.Ask | control.Refuse):
        assert 0 < msg.n <= control.MAX_WANT
    if isinstance(msg, control.Release):
        assert 0 <= msg.answers <= control.MAX_WANT
    if isinstance(msg, control.Stats):  # becomes exported counters: must be sane numbers
        assert all(math.isfinite(v) and v >= 0 for v in msg.counters.values())


def _has_nan(msg: control.Message) -> bool:
    return "NaN" in control.encode(msg).decode()


# -- config loader --------------------------------------------------------------------------
_TEXT = st.text(max_size=10)
_MATCH = st.fixed_dictionaries(
    {},
    optional={
        "cidrs": st.lists(st.text(max_size=20), max_size=2),
        "userAgent": _TEXT,
        "headers": st.dictionaries(_TEXT, _TEXT, max_size=2),
        "pathPrefixes": st.lists(_TEXT, max_size=2),
    },
)
_SLICE = st.fixed_dictionaries(
    {"name": st.text(max_size=12), "share": st.integers(-5, 120)},
    optional={
        "match": st.none() | _MATCH,
        "borrow": _JSON,
        "queue": st.dictionaries(st.sampled_from(["maxWaiting", "timeout"]), _JSON, max_size=2),
    },
)
_LIMITS = ["preambleTimeout", "maxSessions", "leasePrefetch", "maxServices",
           "forgetServicesAfter", "bogus"]  # fmt: skip
_ROUTE = st.dictionaries(st.sampled_from(["name", "service", "host", "pathPrefix"]), _TEXT)
_POLICY = st.fixed_dictionaries(
    {},
    optional={
        "version": _JSON,
        "slices": st.lists(_SLICE, max_size=3) | _JSON,
        "routes": st.lists(_ROUTE, max_size=2),
        "limits": st.dictionaries(st.sampled_from(_LIMITS), _JSON, max_size=3),
        "defaultService": _JSON,
        "tokens": _JSON,
    },
)


@given(_POLICY | _JSON)
@example({"slices": [{"name": "default", "share": 100, "queue": {"timeout": "1e400s"}}]})
@example({"\n": None})  # found: a key with a newline made a two-line error
def test_config_loader_takes_any_document(data: Any) -> None:
    try:
        policy = policy_from_data(data)
    except PolicyError as exc:
        assert "\n" not in str(exc)  # one line for the operator
        return
    assert isinstance(policy, Policy)
    assert policy_from_data(policy.to_wire()) == policy  # what workers receive parses the same


@given(st.binary(max_size=400), st.sampled_from([".yaml", ".json"]))
@example(b"slices: [oops\n", ".yaml")
@example(b"\xff\xfe", ".json")  # found: not UTF-8 raised UnicodeDecodeError
@example(b"!!python/object:os.system {}", ".yaml")
def test_config_file_loader_takes_any_bytes(tmp_path_factory: Any, raw: bytes, suffix: str) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / f"config{suffix}"
    path.write_bytes(raw)
    try:
        load_policy(path)
    except PolicyError as exc:
        assert "\n" not in str(exc)
