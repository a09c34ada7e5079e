"""The SC wire format: round trips, stream splitting, hostile input, limits, speed."""

import contextlib
import os
import struct

import pytest
from hypothesis import find, given
from hypothesis import strategies as st

from nseh.sc.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    MAGIC,
    MAX_ENGINE_NAME_BYTES,
    Abort,
    Commit,
    Deletes,
    Entries,
    Error,
    Final,
    FinalAck,
    FrameDecoder,
    FrameEncoder,
    Hello,
    HelloAck,
    MessageType,
    Policy,
    Resync,
    RoundAck,
    RoundEnd,
    WireError,
    batch_entries,
    encode,
    new_session,
)

# The header as the spec describes it, written independently of the module.
HEADER = struct.Struct(">7sBBB16sQI")
SESSION = bytes(range(16))

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
texts = st.text(max_size=40)
engines = st.text(min_size=1, max_size=MAX_ENGINE_NAME_BYTES // 4)  # <= 64 UTF-8 bytes
items = st.lists(st.binary(max_size=300), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20)
# One strategy per message type; the coverage test checks none is missing.
message_strategies = [
    st.builds(Hello, u16, texts, texts, texts),
    st.builds(HelloAck, st.booleans(), texts),
    st.builds(Policy, engines, json_values),
    st.builds(Entries, engines, u32, items),
    st.builds(Deletes, engines, u32, items),
    st.builds(RoundEnd, u32, u64, u64),
    st.builds(RoundAck, u32, u64, u64, u64, st.lists(texts, max_size=5)),
    st.builds(Final, u32, u64, u64),
    st.builds(FinalAck, u32, u64, u64, u64, st.lists(texts, max_size=5)),
    st.just(Commit()),
    st.builds(Abort, texts),
    st.builds(Error, texts, texts),
    st.builds(Resync, engines, u32),
]
messages = st.one_of(*message_strategies)


def stream(*msgs, session=SESSION) -> bytes:
    return b"".join(FrameEncoder(session).encode_many(msgs))


def frame(kind: int, payload: bytes, sequence: int = 1, *, session: bytes = SESSION,
          magic: bytes = MAGIC, version: int = 1, flags: int = 0,
          length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return HEADER.pack(magic, version, kind, flags, session, sequence, size) + payload


def decode_all(data: bytes, **limits) -> list:
    return FrameDecoder(**limits).feed(data)


@given(messages)
def test_every_message_type_round_trips(message):
    data = encode(message, SESSION, 1)
    assert data[:7] == MAGIC
    assert HEADER_BYTES == 38 and len(data) == 38 + HEADER.unpack_from(data)[6]
    assert decode_all(data) == [message]


def test_the_strategy_covers_every_message_type():
    decoded = {type(FrameDecoder().feed(encode(find(strategy, lambda _: True), SESSION, 1))[0])
               for strategy in message_strategies}
    assert {cls.__name__.upper() for cls in decoded} == {kind.name.replace("_", "")
                                                         for kind in MessageType}


@given(st.lists(messages, min_size=1, max_size=8), st.data())
def test_any_split_of_a_stream_decodes_identically(msgs, data):
    raw = stream(*msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    decoder = FrameDecoder()
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        decoded += decoder.feed(raw[start:end])
    assert decoded == msgs
    assert decoder.buffered_bytes == 0


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_wire_error(data):
    with contextlib.suppress(WireError):
        FrameDecoder().feed(data)


@given(st.binary(max_size=400))
def test_random_payloads_behind_a_valid_header_raise_only_wire_error(payload):
    for kind in MessageType:
        with contextlib.suppress(WireError):
            FrameDecoder().feed(frame(kind, payload))


@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_corrupted_streams_raise_only_wire_error(msgs, data):
    raw = bytearray(stream(*msgs))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(WireError):
        FrameDecoder().feed(bytes(raw))


@given(messages, st.data())
def test_truncated_frames_wait_for_more_and_never_yield_a_message(message, data):
    raw = encode(message, SESSION, 1)
    cut = data.draw(st.integers(0, len(raw) - 1))
    decoder = FrameDecoder()
    assert decoder.feed(raw[:cut]) == []
    assert decoder.buffered_bytes == cut
    assert decoder.feed(raw[cut:]) == [message]


@pytest.mark.parametrize("sequences, reason", [
    ([1, 2, 2], "replayed or reordered frame: sequence 2, expected 3"),
    ([1, 3], "skipped frame: sequence 3, expected 2"),
    ([2], "skipped frame: sequence 2, expected 1"),
    ([1, 2, 4, 3], "skipped frame: sequence 4, expected 3"),
    ([1, 1], "replayed or reordered frame: sequence 1, expected 2"),
])
def test_replayed_reordered_and_skipped_frames_are_detected(sequences, reason):
    decoder = FrameDecoder()
    raw = b"".join(encode(Commit(), SESSION, seq) for seq in sequences)
    with pytest.raises(WireError, match=f"^{reason}$"):
        decoder.feed(raw)


def test_the_first_frame_fixes_the_session():
    decoder = FrameDecoder()
    assert decoder.feed(encode(Commit(), SESSION, 1)) == [Commit()]
    assert decoder.session == SESSION
    with pytest.raises(WireError, match="frame of session"):
        decoder.feed(encode(Commit(), new_session(), 2))


def test_a_decoder_given_a_session_refuses_any_other_from_the_first_frame():
    with pytest.raises(WireError, match="expected " + SESSION.hex()):
        FrameDecoder(session=SESSION).feed(encode(Commit(), new_session(), 1))


def test_a_failed_stream_stays_failed():
    decoder = FrameDecoder()
    with pytest.raises(WireError, match="bad magic"):
        decoder.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(WireError, match="already failed: bad magic"):
        decoder.feed(encode(Commit(), SESSION, 1))


@pytest.mark.parametrize("raw, reason", [
    (b"NSEH-SX", "bad magic"),
    (b"\x16\x03\x01\x02\x00", "bad magic"),  # a TLS ClientHello on a plain socket
    (frame(1, b"", version=2), "unsupported frame version 2"),
    (frame(0, b""), "unknown message type 0"),
    (frame(14, b""), "unknown message type 14"),
    (frame(MessageType.COMMIT, b"", flags=1), "unknown flags 0x01"),
    (frame(MessageType.COMMIT, b"x"), "COMMIT payload has 1 trailing bytes"),
    (frame(MessageType.HELLO_ACK, b"\x02\x00\x00"), "accepted flag must be 0 or 1"),
    (frame(MessageType.ABORT, b"\x00\x05abc"), "ABORT payload truncated in reason"),
    (frame(MessageType.ABORT, b"\x00\x02\xff\xfe"), "reason is not UTF-8"),
    (frame(MessageType.POLICY, b"\x00\x02fw{"), "POLICY of 'fw' is not JSON"),
    (frame(MessageType.POLICY, b"\x00\x02fwNaN"), "POLICY of 'fw' is not JSON"),
    (frame(MessageType.POLICY, b"\x00\x02fw" + b"[" * 200_000 + b"]" * 200_000),
     "POLICY of 'fw' is not JSON"),  # nesting deep enough to exhaust the recursion limit
    (frame(MessageType.POLICY, b"\x00\x00{}"), "engine name must be 1 to 64 bytes"),
    (frame(MessageType.ENTRIES, struct.pack(">II", 1, 2) + b"\x00\x02fw\x00\x00\x00\x01a"),
     "2 items announced, 1 present"),
    (frame(MessageType.ENTRIES, struct.pack(">II", 1, 1) + b"\x00\x02fw\x00\x00\x01\x00ab"),
     "item 0 of 256 bytes overruns"),
    (frame(MessageType.ENTRIES, struct.pack(">II", 1, 100) + b"\x00\x02fw"),
     "batch announces 100 items in a 12-byte payload"),
    (frame(MessageType.ROUND_END, b"\x00" * 19), "ROUND_END payload truncated"),
])
def test_malformed_frames_raise_a_one_line_wire_error(raw, reason):
    with pytest.raises(WireError, match=reason) as info:
        FrameDecoder().feed(raw)
    assert "\n" not in str(info.value)


def test_an_oversized_frame_is_refused_at_its_header():
    decoder = FrameDecoder(max_frame_bytes=1024)
    header = frame(MessageType.ENTRIES, b"", length=1024 - HEADER_BYTES + 1)
    with pytest.raises(WireError,
                       match=r"ENTRIES frame of 1025 bytes exceeds limits\.sc_frame_bytes = 1024"):
        decoder.feed(header)  # only the header: the payload is never buffered
    assert decoder.buffered_bytes == 0


def test_a_frame_of_exactly_the_limit_is_accepted():
    message = Entries("fw", 1, [b"x" * 300])
    limit = len(encode(message, SESSION, 1))
    assert decode_all(encode(message, SESSION, 1), max_frame_bytes=limit) == [message]
    with pytest.raises(WireError, match="exceeds"):
        decode_all(encode(message, SESSION, 1), max_frame_bytes=limit - 1)


@pytest.mark.parametrize("kind", [MessageType.ENTRIES, MessageType.DELETES])
def test_too_many_entries_are_refused_after_the_first_8_payload_bytes(kind):
    decoder = FrameDecoder(max_entries_per_frame=10)
    start = frame(kind, struct.pack(">II", 7, 11), length=1_000_000)
    with pytest.raises(WireError,
                       match=r"batch of 11 items exceeds limits\.sc_entries_per_frame = 10"):
        decoder.feed(start)


def test_entry_count_limit_is_inclusive():
    message = Deletes("fw", 3, [b"k"] * 10)
    assert decode_all(encode(message, SESSION, 1), max_entries_per_frame=10) == [message]


def test_limits_must_be_sane():
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameDecoder(max_frame_bytes=10)
    with pytest.raises(ValueError, match="max_entries_per_frame"):
        FrameDecoder(max_entries_per_frame=0)


@pytest.mark.parametrize("message, reason", [
    (Abort("x" * 70_000), "reason of 70000 bytes exceeds 65535"),
    (Entries("", 1, []), "engine name must be 1 to 64 bytes, not 0"),
    (Entries("e" * 65, 1, []), "engine name must be 1 to 64 bytes, not 65"),
    (Entries("fw", -1, []), "cannot encode Entries"),
    (RoundEnd(2**32, 0, 0), "cannot encode RoundEnd"),
    (Hello(70_000, "h1", "vm", "precopy"), "cannot encode Hello"),
    (Policy("fw", {"a": float("nan")}), "policy of 'fw' is not JSON"),
    (Policy("fw", {"a": object()}), "policy of 'fw' is not JSON"),
    (Entries("fw", 1, [b"x" * DEFAULT_MAX_FRAME_BYTES]), "ENTRIES frame of .* exceeds"),
    (Deletes("fw", 1, [b""] * 65_537),
     r"batch of 65537 items exceeds limits\.sc_entries_per_frame = 65536"),
    (Abort("\ud800"), "cannot encode Abort: 'utf-8' codec can't encode"),
])
def test_unencodable_messages_raise_wire_error(message, reason):
    with pytest.raises(WireError, match=reason):
        encode(message, SESSION, 1)


def test_encoder_numbers_frames_and_a_refused_batch_uses_no_sequence_number():
    encoder = FrameEncoder(SESSION)
    first = encoder.encode(Commit())
    with pytest.raises(WireError):
        encoder.encode_many([Commit(), Abort("x" * 70_000)])
    second = encoder.encode(Commit())
    assert [HEADER.unpack_from(f)[5] for f in (first, second)] == [1, 2]
    assert decode_all(first + second) == [Commit(), Commit()]


@given(st.lists(st.binary(max_size=500), max_size=200),
       st.integers(300, 4000), st.integers(1, 50))
def test_batches_keep_every_entry_in_order_and_fit_the_limits(entries, max_frame, max_count):
    max_frame = max(max_frame, HEADER_BYTES + 8 + 2 + MAX_ENGINE_NAME_BYTES + 4 + 500)
    batches = list(batch_entries(entries, max_frame, max_count))
    assert [e for batch in batches for e in batch] == entries
    assert all(1 <= len(batch) <= max_count for batch in batches)
    engine = "e" * MAX_ENGINE_NAME_BYTES  # the longest name still fits
    frames = [encode(Entries(engine, 1, batch), SESSION, 1, max_frame) for batch in batches]
    assert all(len(f) <= max_frame for f in frames)


def test_an_entry_larger_than_a_frame_cannot_be_batched():
    with pytest.raises(WireError, match="entry of 2000 bytes cannot fit a frame of 1000 bytes"):
        list(batch_entries([b"x" * 2000], 1000))


def test_100k_entries_survive_encode_and_decode():
    # How fast: the benchmark's question (`nseh bench`), not this test's.
    entries = [os.urandom(200) for _ in range(100_000)]
    frames = FrameEncoder(SESSION).encode_many(
        [Entries("firewall", 1, batch) for batch in batch_entries(entries)])
    raw = b"".join(frames)
    decoder = FrameDecoder()
    decoded = []
    for offset in range(0, len(raw), 256 * 1024):  # as the channel reads it
        decoded += decoder.feed(raw[offset:offset + 256 * 1024])
    assert [e for message in decoded for e in message.entries] == entries
