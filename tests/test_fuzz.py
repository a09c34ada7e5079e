"""Hostile input for every decoder that takes bytes or documents from outside the process:
the SC frame decoder, the ctnetlink entry codec, the agent API codec, the VM definition
loader and the agent configuration loader. Each may only raise its documented error, with a
one-line message, and never hang (the file runs under a timeout)."""

import ipaddress
import itertools
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_agent_config import BASE as GOOD_CONFIG
from test_definition import GOOD as GOOD_DEFINITION
from test_sc_wire import SESSION, messages

from nseh.agent import ctnetlink
from nseh.agent.config import AgentConfig, AgentConfigError
from nseh.agent.ctnetlink import AddressScope, ConntrackFormatError, make_entry
from nseh.api.protocol import Error, Event, ProtocolError, Request, Result, decode
from nseh.definition import DefinitionError, VMDefinition, load_definition
from nseh.sc.wire import HEADER_BYTES, MAGIC, FrameDecoder, FrameEncoder, MessageType, WireError

pytestmark = pytest.mark.timeout(120)

# Enough examples to reach the rarer shapes, within the file's ~30 s.
many = settings(max_examples=500)
# Tests that write each example to one file of the test's tmp_path.
file_fuzz = settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(text: str) -> bool:
    return len(text.splitlines()) == 1


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    return [data[start:end] for start, end in itertools.pairwise([0, *sorted(cuts), len(data)])]


# --- SC frame decoder -----------------------------------------------------------------------

def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> tuple[list, WireError | None]:
    """Messages decoded until the end or the first WireError (which must be final)."""
    decoded: list = []
    try:
        for chunk in chunks:
            decoded += decoder.feed(chunk)
    except WireError as exc:
        assert one_line(str(exc))
        with pytest.raises(WireError, match=r"^stream already failed: "):
            decoder.feed(b"")
        return decoded, exc
    return decoded, None


# Header bytes that allow one value only: magic, version (0..7), flags (9) and the sequence
# number (26..33). (Not the type: ROUND_END and FINAL, for one, differ by one flip.)
CHECKED_HEADER_BYTES = {*range(8), 9, *range(26, 34)}


@many
@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_a_flipped_byte_fails_cleanly_and_spares_the_frames_before_it(msgs, data):
    frames = FrameEncoder(SESSION).encode_many(msgs)
    raw = bytearray(b"".join(frames))
    at = data.draw(st.integers(0, len(raw) - 1), label="flipped byte")
    raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    ends = [sum(map(len, frames[:i + 1])) for i in range(len(frames))]
    hit = next(i for i, end in enumerate(ends) if at < end)  # the frame with the flipped byte
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")
    decoded, error = feed_all(FrameDecoder(), split(bytes(raw), cuts))
    # (A feed that fails returns nothing, so fewer than `hit` messages may come out.)
    assert decoded[:hit] == msgs[:len(decoded[:hit])]
    if at - (ends[hit - 1] if hit else 0) in CHECKED_HEADER_BYTES:
        assert error is not None


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_a_truncated_stream_yields_exactly_its_complete_frames(msgs, data):
    frames = FrameEncoder(SESSION).encode_many(msgs)
    raw = b"".join(frames)
    cut = data.draw(st.integers(0, len(raw)))
    complete = sum(1 for i in range(len(frames)) if sum(map(len, frames[:i + 1])) <= cut)
    decoder = FrameDecoder()
    chunks = split(raw[:cut], data.draw(st.lists(st.integers(0, cut), max_size=8)))
    decoded, error = feed_all(decoder, chunks)
    assert error is None and decoded == msgs[:complete]
    assert decoder.buffered_bytes == cut - sum(map(len, frames[:complete]))


@given(st.binary(max_size=300), st.lists(st.integers(0, 338), max_size=6))
def test_random_bytes_after_a_valid_header_prefix_raise_only_wire_error(tail, cuts):
    data = MAGIC + b"\x01" + tail  # past the magic and version: the deeper checks get fuzzed
    feed_all(FrameDecoder(), split(data, [c for c in cuts if c <= len(data)]))


@given(st.integers(1024, 2**20), st.integers(1, 2**32 - 1),
       st.sampled_from(list(MessageType)))
def test_a_length_field_over_the_limit_is_refused_from_the_header_alone(limit, length, kind):
    decoder = FrameDecoder(max_frame_bytes=limit)
    header = struct.pack(">7sBBB16sQI", MAGIC, 1, kind, 0, SESSION, 1, length)
    if HEADER_BYTES + length <= limit:
        assert decoder.feed(header) == []
        return
    with pytest.raises(WireError, match=f"exceeds .*{limit}") as info:
        decoder.feed(header)
    assert one_line(str(info.value)) and decoder.buffered_bytes == 0


@given(st.integers(1, 100_000), st.integers(0, 2**30 - 4),
       st.sampled_from([MessageType.ENTRIES, MessageType.DELETES]))
def test_an_item_count_over_the_limit_is_refused_from_the_batch_head(limit, count, kind):
    decoder = FrameDecoder(max_frame_bytes=HEADER_BYTES + 2**32 - 1, max_entries_per_frame=limit)
    start = struct.pack(">7sBBB16sQIII", MAGIC, 1, kind, 0, SESSION, 1, 4 * count + 12, 1,
                        count)
    if count <= limit:
        assert decoder.feed(start) == []
        return
    with pytest.raises(WireError, match=f"batch of {count} items exceeds .*{limit}"):
        decoder.feed(start)


# --- ctnetlink entries ----------------------------------------------------------------------

VM = [ipaddress.ip_address("10.0.0.10"), ipaddress.ip_address("fd00::10")]
PEERS = {4: ["10.0.0.10", "10.0.0.11", "192.0.2.1"], 6: ["fd00::10", "fd00::11", "2001:db8::1"]}


def nla(kind: int, value: bytes, nested: bool = False) -> bytes:
    """A netlink attribute, written here independently of the module."""
    header = struct.pack("=HH", 4 + len(value), kind | (0x8000 if nested else 0))
    return header + value + b"\0" * (-len(value) % 4)


def attributes(entry: bytes, start: int = 4, end: int | None = None, *,
               nested: bool = False) -> list[tuple[int, int, int]]:
    """(header offset, type, length) of a valid entry's attributes; with `nested`, those
    inside nested attributes too."""
    end = len(entry) if end is None else end
    found = []
    while start < end:
        length, kind = struct.unpack_from("=HH", entry, start)
        found.append((start, kind & 0x3FFF, length))
        if nested and kind & 0x8000:
            found += attributes(entry, start + 4, start + length, nested=True)
        start += (length + 3) & ~3
    return found


@st.composite
def entries(draw) -> bytes:
    """Entries as a kernel dump shows them, sometimes with attributes the codec does not
    read (counters, id, use) at the top level and inside CTA_PROTOINFO."""
    version = draw(st.sampled_from([4, 6]))
    src, dst = (draw(st.sampled_from(PEERS[version])) for _ in range(2))
    proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    entry = make_entry(src, dst, proto, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
                       mark=draw(st.integers(0, 2**32 - 1)), zone=draw(st.sampled_from([0, 7])),
                       status=draw(st.integers(0, 2**16 - 1)),
                       tcp_state=draw(st.sampled_from(ctnetlink.TCP_STATES)),
                       icmp_type=8 if version == 4 else 128, icmp_id=draw(st.integers(0, 65535)))
    extras = draw(st.lists(st.sampled_from([ctnetlink.CTA_ID, ctnetlink.CTA_USE, 23, 25]),
                           unique=True, max_size=3))
    entry += b"".join(nla(kind, draw(st.binary(max_size=12))) for kind in extras)
    if proto == "tcp" and draw(st.booleans()):
        # Another protocol's state ahead of the TCP state (the kernel would ignore it).
        at, length = next((at, length) for at, kind, length in attributes(entry)
                          if kind == ctnetlink.CTA_PROTOINFO)
        dccp_state = nla(1, bytes([draw(st.integers(0, 255))]))
        inner = nla(2, dccp_state, nested=True) + entry[at + 4:at + length]
        entry = (entry[:at] + nla(ctnetlink.CTA_PROTOINFO, inner, nested=True)
                 + entry[at + length:])
    return entry


@st.composite
def mutants(draw) -> tuple[bytes, bytes]:
    """(a valid entry, the same entry with an attribute header or bytes changed, bytes cut,
    added or repeated)."""
    entry = draw(entries())
    mutant = bytearray(entry)
    headers = [at for at, _, _ in attributes(entry, nested=True)]
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["header", "header", "flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, len(mutant)))
        if how == "header":  # where a decoder that trusts lengths and types goes wrong
            at = draw(st.sampled_from(headers)) + draw(st.integers(0, 3))
            if at < len(mutant):
                mutant[at] = draw(st.integers(0, 255))
        elif how == "flip" and at < len(mutant):
            mutant[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del mutant[at:at + draw(st.integers(1, 16))]
        elif how == "insert":
            mutant[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            mutant += mutant[4:at]
    return entry, bytes(mutant)


READERS = {
    "key": ctnetlink.entry_key,
    "mark": ctnetlink.entry_mark,
    "zone": ctnetlink.entry_zone,
    "addresses": ctnetlink.entry_addresses,
    "summary": ctnetlink.entry_summary,
    "create": ctnetlink.to_create_message,
    "create with mark": lambda entry: ctnetlink.to_create_message(entry, mark=9),
    "update": ctnetlink.to_update_message,
    "delete": ctnetlink.to_delete_message,
    "rewrite mark": lambda entry: ctnetlink.rewrite_mark(entry, 3),
    "scope": lambda entry: AddressScope(VM).reason_to_reject(entry),
}


def outcome(read, entry: bytes) -> object:
    """What `read` makes of `entry`: its value, or the (one-line) refusal."""
    try:
        return read(entry)
    except ConntrackFormatError as exc:
        assert one_line(str(exc))
        return ConntrackFormatError


@many
@given(mutants())
def test_mutated_entries_raise_only_conntrack_format_error(pair):
    _, mutant = pair
    for read in READERS.values():
        outcome(read, mutant)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_conntrack_format_error(data):
    for read in READERS.values():
        outcome(read, data)


def cold_outcome(read, entry: bytes) -> object:
    """`outcome` with the request builders' layout caches emptied (module internals: the
    caches are shared by the whole process), so that a full walk decides."""
    for purpose in (ctnetlink._CREATE, ctnetlink._UPDATE, ctnetlink._DELETE):
        purpose.recipes.layouts.clear()
    return outcome(read, entry)


@settings(max_examples=1000)  # the broken header must be one a layout leaves out
@given(mutants())
def test_a_cached_layout_never_changes_what_a_full_walk_decides(pair):
    # The codec compiles each attribute layout once and checks later entries of the same
    # layout by their headers only: that must not let through what a full walk refuses.
    entry, mutant = pair
    warm_scope = AddressScope(VM)
    warm_scope.reason_to_reject(entry)
    assert outcome(warm_scope.reason_to_reject, mutant) == outcome(
        AddressScope(VM).reason_to_reject, mutant)
    for name in ("create", "update", "delete"):
        cold = cold_outcome(READERS[name], mutant)
        READERS[name](entry)
        assert outcome(READERS[name], mutant) == cold, name


# --- agent API codec ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
api_bodies = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("id", "method", "params", "event", "result", "error")})
nestings = st.builds(lambda opener, depth: opener * depth,
                     st.sampled_from([b"[", b'{"a":', b'{"id":1,"result":[']),
                     st.integers(1, 200_000))
big_numbers = st.integers(1, 20_000).map(lambda digits: b'{"id":1,"result":%s}' % (b"7" * digits))


def api_outcome(line: bytes) -> None:
    try:
        message = decode(line)
    except ProtocolError as exc:
        assert one_line(str(exc))
        return
    assert type(message.id) is int
    match message:
        case Request(method=method, params=params):
            assert isinstance(method, str) and isinstance(params, dict)
        case Event(event=event):
            assert isinstance(event, dict)
        case Error(code=code, message=text):
            assert isinstance(code, str) and isinstance(text, str)
        case _:
            assert isinstance(message, Result)


@many
@given(api_bodies | json_values)
def test_any_json_document_decodes_to_a_well_typed_message_or_protocol_error(body):
    api_outcome(json.dumps(body).encode())


@given(nestings | big_numbers | st.binary(max_size=100))
def test_deep_nesting_huge_numbers_and_garbage_raise_only_protocol_error(line):
    api_outcome(line)


# --- VM definitions -------------------------------------------------------------------------

# TOML, valid and hostile: keys and strings with escaped line breaks, numbers too long to
# convert, nesting deep enough to exhaust the recursion limit.
toml_keys = st.sampled_from([
    "name", "memory_mib", "host", "state_dir", "ipv4", "proto", "ports", "sc_port", "limits",
    '"a\\nb"', '"x\\u2028y"', "a.b"]) | st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
toml_values = st.sampled_from([
    '"web1"', '"h1"', "7", "-1", "1e400", "nan", "true", "1979-05-27", "[1, 2]", "{}",
    '"10.0.0.10/24"', '"a\\nb"', '"\\u0085"', "9" * 5000, "[" * 3000, "{a=" * 2000])
toml_lines = st.one_of(
    st.builds("{} = {}".format, toml_keys, toml_values),
    st.sampled_from(["[network]", "[limits]", "[[policy.inbound]]", "[policy]", "[a.b]"]),
    st.text(max_size=10))
toml_texts = st.lists(toml_lines, max_size=10).map("\n".join)


@st.composite
def edited(draw, good: str) -> str:
    """A good file with lines replaced by or added from hostile TOML."""
    lines = good.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(lines)))
        lines[at:at + draw(st.integers(0, 1))] = [draw(toml_lines)]
    return "\n".join(lines)


def mostly(valid: object, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` half the time: a document must get past its good fields to reach the bad."""
    return st.one_of(st.just(valid), hostile)


addresses = st.sampled_from(["10.0.0.300/24", "a\nb", "::/0", "10.0.0.1", ""]) | json_values
hostile_keys = st.sampled_from(["a\nb", "line\u2028break", "x\x85y", "colour"])
rules = st.fixed_dictionaries({
    "proto": mostly("tcp", st.sampled_from(["icmp", "any", "sctp"]) | json_values),
    "ports": mostly([7, 80], st.lists(st.integers(-5, 70_000), max_size=4) | json_values),
    "peers": mostly(["10.0.0.0/24"], st.lists(addresses, max_size=3) | json_values),
}, optional={"x\ny": json_values})
definition_documents = st.fixed_dictionaries({
    "name": mostly("web1", st.sampled_from(["Web 1", "a" * 20, "a\nb"]) | json_values),
    "network": mostly({"ipv4": "10.0.0.10/24"}, st.dictionaries(
        st.sampled_from(["ipv4", "ipv6", "gateway4", "gateway6", "mac"]) | hostile_keys,
        addresses, max_size=3) | json_values),
}, optional={
    "memory_mib": st.integers(-10, 10**6) | json_values,
    "policy": st.fixed_dictionaries({}, optional={
        "inbound": st.lists(rules, max_size=3), "outbound": st.lists(rules, max_size=3)})
    | json_values,
}).flatmap(lambda document: st.dictionaries(hostile_keys, json_values, max_size=1).map(
    lambda extra: document | extra))


def definition_outcome(load) -> None:
    try:
        definition = load()
    except DefinitionError as exc:
        assert one_line(str(exc)), str(exc)
        return
    assert isinstance(definition, VMDefinition)


@many
@given(definition_documents | json_values)
def test_any_document_is_a_definition_or_a_one_line_definition_error(document):
    definition_outcome(lambda: VMDefinition.from_json(document))


@file_fuzz
@given(toml_texts | edited(GOOD_DEFINITION))
def test_any_definition_file_loads_or_gives_a_one_line_definition_error(tmp_path, text):
    path = tmp_path / "vm.toml"
    path.write_text(text)
    definition_outcome(lambda: load_definition(path))


# --- agent configuration --------------------------------------------------------------------

def config_outcome(path: Path) -> None:
    try:
        AgentConfig.load(path)
    except AgentConfigError as exc:
        assert one_line(str(exc)), str(exc)


@file_fuzz
@given(toml_texts | edited(GOOD_CONFIG))
def test_any_config_text_loads_or_gives_a_one_line_agent_config_error(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    config_outcome(path)


@file_fuzz
@given(st.binary(max_size=200))
def test_any_config_bytes_load_or_give_a_one_line_agent_config_error(tmp_path, data):
    path = tmp_path / "agent.toml"
    path.write_bytes(data)
    config_outcome(path)
