"""The agent API codec: round trips and hostile input."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nseh.api.protocol import (
    MAX_MESSAGE_BYTES,
    Error,
    Event,
    ProtocolError,
    Request,
    Result,
    decode,
    encode,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=10)
ids = st.integers(min_value=0, max_value=2**53)
messages = st.one_of(
    st.builds(Request, ids, st.text(), st.dictionaries(st.text(), json_values)),
    st.builds(Event, ids, st.dictionaries(st.text(), json_values)),
    st.builds(Result, ids, json_values),
    st.builds(Error, ids, st.text(), st.text()),
)


@given(messages)
def test_every_message_round_trips(message):
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == message


@given(st.binary(max_size=200))
def test_random_bytes_raise_protocol_error_or_decode(data):
    try:
        message = decode(data)
    except ProtocolError:
        return
    assert isinstance(message, Request | Event | Result | Error)


@pytest.mark.parametrize("line", [
    b"", b"[]", b'{"id": "1", "method": "x"}', b'{"id": 1}', b'{"id": 1, "event": 3}',
    b'{"id": 1, "method": 5}', b'{"id": 1, "method": "x", "params": []}',
    b'{"id": 1, "error": {"message": "no code"}}', b"\xff\xfe",
    b'{"id": false, "event": {}}',  # found by tests/test_fuzz.py: a bool passed as an id
])
def test_malformed_messages_are_refused(line):
    with pytest.raises(ProtocolError):
        decode(line)


@pytest.mark.parametrize(("line", "reason"), [
    (b"[" * 100_000, "not JSON: nested too deeply"),  # was a RecursionError
    (b'{"id": 1, "result": %s}' % (b"7" * 5000), "Exceeds the limit"),  # was a ValueError
])
def test_deep_nesting_and_huge_numbers_are_protocol_errors(line, reason):
    # Found by tests/test_fuzz.py.
    with pytest.raises(ProtocolError, match=reason):
        decode(line)


def test_oversized_messages_are_refused_both_ways():
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Result(1, "x" * MAX_MESSAGE_BYTES))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(json.dumps({"id": 1, "result": "x" * MAX_MESSAGE_BYTES}).encode())
