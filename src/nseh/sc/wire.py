"""The SC channel's wire format, without I/O.

A migration's security context travels from the source agent to the destination agent as
binary frames (conntrack entries are netlink bytes and stay bytes). Every frame is a
38-byte header followed by a payload; all integers are big-endian (network order)::

    magic      7 bytes  b"NSEH-SC"
    version    u8       FRAME_VERSION (1)
    type       u8       MessageType
    flags      u8       0 (none defined in version 1; anything else is refused)
    session    16 bytes random per migration; the same in both directions
    sequence   u64      1, 2, 3, ... per direction: no replay, reordering or gap
    length     u32      payload length in bytes

Payloads (``str`` = u16 byte length + UTF-8; engine names are 1..64 bytes)::

    HELLO       u16 protocol_version, str source_host, str vm, str mode
    HELLO_ACK   u8 accepted (0|1), str reason
    POLICY      str engine, then a UTF-8 JSON document up to the end of the payload
    ENTRIES     u32 round, u32 count, str engine, count x (u32 length, bytes)
    DELETES     same layout as ENTRIES (the items are keys or entries to delete)
    ROUND_END   u32 round, u64 entries, u64 deletes (what the sender sent in the round)
    ROUND_ACK   u32 round, u64 applied, u64 deleted, u64 rejected, u16 n, n x str reason
    FINAL       same layout as ROUND_END (the final delta is complete)
    FINAL_ACK   same layout as ROUND_ACK
    COMMIT      empty
    ABORT       str reason
    ERROR       str code, str reason
    RESYNC      u32 round, str engine (drop the engine's state for the VM: a full snapshot
                follows in this round, after lost change events)

The entry count sits at a fixed offset so a receiver can refuse an oversized batch as soon
as the first 8 payload bytes arrive, before buffering the rest. The two limits (frame size,
items per frame) are the agent configuration's `[limits]` `sc_frame_bytes` and
`sc_entries_per_frame`, and errors name them so.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

MAGIC = b"NSEH-SC"
FRAME_VERSION = 1
PROTOCOL_VERSION = 1
SESSION_BYTES = 16

DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ENTRIES_PER_FRAME = 65_536
# How errors name the two limits: as the agent configuration does.
_FRAME_LIMIT = "limits.sc_frame_bytes"
_BATCH_LIMIT = "limits.sc_entries_per_frame"
MAX_ENGINE_NAME_BYTES = 64
MAX_STRING_BYTES = 0xFFFF

_HEADER = struct.Struct(">7sBBB16sQI")
HEADER_BYTES = _HEADER.size
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_BATCH_HEAD = struct.Struct(">II")  # round, count
_ROUND_END = struct.Struct(">IQQ")
_ROUND_ACK = struct.Struct(">IQQQ")
_MAX_SEQUENCE = 2**64 - 1
# Frame size limits a decoder can have: from a header plus a batch head, a maximal engine
# name and one small entry, to what the u32 length field can describe.
MIN_FRAME_BYTES = HEADER_BYTES + _BATCH_HEAD.size + 2 + MAX_ENGINE_NAME_BYTES + 64
MAX_FRAME_BYTES = HEADER_BYTES + 0xFFFFFFFF
# Fixed payload bytes of an ENTRIES/DELETES frame whatever its engine name.
_BATCH_OVERHEAD = HEADER_BYTES + _BATCH_HEAD.size + 2 + MAX_ENGINE_NAME_BYTES


class WireError(ValueError):
    """Bytes that are not a valid SC frame stream, or a message that cannot be encoded."""


def _frame_too_large(kind: MessageType, size: int, limit: int) -> WireError:
    return WireError(f"{kind.name} frame of {size} bytes exceeds {_FRAME_LIMIT} = {limit}")


def _batch_too_large(count: int, limit: int) -> WireError:
    return WireError(f"batch of {count} items exceeds {_BATCH_LIMIT} = {limit}")


class MessageType(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    POLICY = 3
    ENTRIES = 4
    DELETES = 5
    ROUND_END = 6
    ROUND_ACK = 7
    FINAL = 8
    FINAL_ACK = 9
    COMMIT = 10
    ABORT = 11
    ERROR = 12
    RESYNC = 13


@dataclass(frozen=True, slots=True)
class Hello:
    """Source -> destination: who migrates which VM, and how its SC is moved."""
    protocol_version: int
    source_host: str
    vm: str
    mode: str


@dataclass(frozen=True, slots=True)
class HelloAck:
    accepted: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    """An engine's configuration for the VM (e.g. the firewall policy) as a JSON value."""
    engine: str
    document: Any


@dataclass(frozen=True, slots=True)
class Entries:
    """A batch of an engine's opaque state entries (e.g. ctnetlink messages) of one round."""
    engine: str
    round: int
    entries: list[bytes]


@dataclass(frozen=True, slots=True)
class Deletes:
    """A batch of an engine's opaque keys (or entries) to delete, of one round."""
    engine: str
    round: int
    keys: list[bytes]


@dataclass(frozen=True, slots=True)
class RoundEnd:
    """The sender has sent everything of `round`: this many entries and deletes."""
    round: int
    entries: int
    deletes: int


@dataclass(frozen=True, slots=True)
class RoundAck:
    """What the receiver did with `round`; `reasons` describes (a sample of) the rejections."""
    round: int
    applied: int
    deleted: int
    rejected: int
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Final:
    """The final delta (sent as `round`) is complete."""
    round: int
    entries: int
    deletes: int


@dataclass(frozen=True, slots=True)
class FinalAck:
    round: int
    applied: int
    deleted: int
    rejected: int
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Commit:
    pass


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Resync:
    """The engine's state on the destination is to be replaced by the snapshot that follows
    in `round` (the source lost change events)."""
    engine: str
    round: int


Message = (Hello | HelloAck | Policy | Entries | Deletes | RoundEnd | RoundAck | Final
           | FinalAck | Commit | Abort | Error | Resync)


def new_session() -> bytes:
    return os.urandom(SESSION_BYTES)


# --- encoding ------------------------------------------------------------------------------

def _str(text: str, what: str) -> bytes:
    data = text.encode()
    if len(data) > MAX_STRING_BYTES:
        raise WireError(f"{what} of {len(data)} bytes exceeds {MAX_STRING_BYTES}")
    return _U16.pack(len(data)) + data


def _engine(name: str) -> bytes:
    data = name.encode()
    if not 1 <= len(data) <= MAX_ENGINE_NAME_BYTES:
        raise WireError(f"engine name must be 1 to {MAX_ENGINE_NAME_BYTES} bytes, "
                        f"not {len(data)}")
    return _U16.pack(len(data)) + data


def _batch(engine: str, round_: int, items: list[bytes]) -> list[bytes]:
    pack = _U32.pack
    parts = [_BATCH_HEAD.pack(round_, len(items)), _engine(engine)]
    for item in items:
        parts.append(pack(len(item)))
        parts.append(item)
    return parts


def _ack(round_: int, applied: int, deleted: int, rejected: int,
         reasons: list[str]) -> list[bytes]:
    return [_ROUND_ACK.pack(round_, applied, deleted, rejected), _U16.pack(len(reasons)),
            *(_str(reason, "rejection reason") for reason in reasons)]


def _payload(message: Message) -> tuple[MessageType, list[bytes]]:
    match message:
        case Hello(version, host, vm, mode):
            return MessageType.HELLO, [_U16.pack(version), _str(host, "host name"),
                                       _str(vm, "VM name"), _str(mode, "SC mode")]
        case HelloAck(accepted, reason):
            return MessageType.HELLO_ACK, [bytes([bool(accepted)]), _str(reason, "reason")]
        case Policy(engine, document):
            try:
                text = json.dumps(document, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise WireError(f"policy of {engine!r} is not JSON: {exc}") from None
            return MessageType.POLICY, [_engine(engine), text.encode()]
        case Entries(engine, round_, entries):
            return MessageType.ENTRIES, _batch(engine, round_, entries)
        case Deletes(engine, round_, keys):
            return MessageType.DELETES, _batch(engine, round_, keys)
        case RoundEnd(round_, entries, deletes):
            return MessageType.ROUND_END, [_ROUND_END.pack(round_, entries, deletes)]
        case Final(round_, entries, deletes):
            return MessageType.FINAL, [_ROUND_END.pack(round_, entries, deletes)]
        case RoundAck(round_, applied, deleted, rejected, reasons):
            return MessageType.ROUND_ACK, _ack(round_, applied, deleted, rejected, reasons)
        case FinalAck(round_, applied, deleted, rejected, reasons):
            return MessageType.FINAL_ACK, _ack(round_, applied, deleted, rejected, reasons)
        case Commit():
            return MessageType.COMMIT, []
        case Abort(reason):
            return MessageType.ABORT, [_str(reason, "reason")]
        case Error(code, reason):
            return MessageType.ERROR, [_str(code, "error code"), _str(reason, "reason")]
        case Resync(engine, round_):
            return MessageType.RESYNC, [_U32.pack(round_), _engine(engine)]
    raise WireError(f"not an SC message: {type(message).__name__}")


def encode(message: Message, session: bytes, sequence: int,
           max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
           max_entries_per_frame: int = DEFAULT_MAX_ENTRIES_PER_FRAME) -> bytes:
    """One complete frame; refuses what a peer with the same limits would refuse."""
    if len(session) != SESSION_BYTES:
        raise WireError(f"session id must be {SESSION_BYTES} bytes, not {len(session)}")
    if not 1 <= sequence <= _MAX_SEQUENCE:
        raise WireError(f"sequence number {sequence} out of range")
    if isinstance(message, Entries | Deletes):
        count = len(message.entries if isinstance(message, Entries) else message.keys)
        if count > max_entries_per_frame:
            raise _batch_too_large(count, max_entries_per_frame)
    try:
        kind, parts = _payload(message)
    except (struct.error, UnicodeEncodeError) as exc:  # a field that does not fit its type
        raise WireError(f"cannot encode {type(message).__name__}: {exc}") from None
    payload_bytes = sum(map(len, parts))
    if HEADER_BYTES + payload_bytes > max_frame_bytes:
        raise _frame_too_large(kind, HEADER_BYTES + payload_bytes, max_frame_bytes)
    header = _HEADER.pack(MAGIC, FRAME_VERSION, kind, 0, session, sequence, payload_bytes)
    return b"".join([header, *parts])


class FrameEncoder:
    """Numbers the frames of one direction of one session: 1, 2, 3, ..."""

    def __init__(self, session: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_entries_per_frame: int = DEFAULT_MAX_ENTRIES_PER_FRAME) -> None:
        if len(session) != SESSION_BYTES:
            raise ValueError(f"session id must be {SESSION_BYTES} bytes")
        self.session = session
        self.max_frame_bytes = max_frame_bytes
        self.max_entries_per_frame = max_entries_per_frame
        self._next_sequence = 1

    def encode(self, message: Message) -> bytes:
        return self.encode_many([message])[0]

    def encode_many(self, messages: Iterable[Message]) -> list[bytes]:
        """Frames for all messages, or a WireError and no sequence numbers used up."""
        first = self._next_sequence
        frames = [encode(message, self.session, sequence, self.max_frame_bytes,
                         self.max_entries_per_frame)
                  for sequence, message in enumerate(messages, first)]
        self._next_sequence = first + len(frames)
        return frames


def batch_entries(entries: Iterable[bytes], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                  max_entries: int = DEFAULT_MAX_ENTRIES_PER_FRAME) -> Iterator[list[bytes]]:
    """Split entries into batches that each fit one ENTRIES/DELETES frame (any engine name)."""
    capacity = max_frame_bytes - _BATCH_OVERHEAD
    if capacity <= 4 or max_entries < 1:
        raise ValueError(f"a frame of {max_frame_bytes} bytes cannot carry entries")
    batch: list[bytes] = []
    size = 0
    for entry in entries:
        needed = 4 + len(entry)
        if needed > capacity:
            raise WireError(f"entry of {len(entry)} bytes cannot fit a frame of "
                            f"{max_frame_bytes} bytes")
        if size + needed > capacity or len(batch) == max_entries:
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += needed
    if batch:
        yield batch


# --- decoding ------------------------------------------------------------------------------

class _Reader:
    """Reads a payload field by field; running short is a WireError."""

    def __init__(self, payload: bytes, kind: MessageType) -> None:
        self.payload = payload
        self.kind = kind
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self.payload):
            raise WireError(f"{self.kind.name} payload truncated in {what}")
        data = self.payload[self.pos:end]
        self.pos = end
        return data

    def unpack(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size, what))

    def text(self, what: str) -> str:
        (size,) = self.unpack(_U16, what)
        try:
            return self.take(size, what).decode()
        except UnicodeDecodeError:
            raise WireError(f"{self.kind.name}: {what} is not UTF-8") from None

    def engine(self) -> str:
        name = self.text("engine name")
        if not 1 <= len(name.encode()) <= MAX_ENGINE_NAME_BYTES:
            raise WireError(f"{self.kind.name}: engine name must be 1 to "
                            f"{MAX_ENGINE_NAME_BYTES} bytes")
        return name

    def rest(self) -> bytes:
        data = self.payload[self.pos:]
        self.pos = len(self.payload)
        return data

    def done(self) -> None:
        if self.pos != len(self.payload):
            raise WireError(f"{self.kind.name} payload has {len(self.payload) - self.pos} "
                            "trailing bytes")


def _decode_items(reader: _Reader, count: int) -> list[bytes]:
    # The hot path: one bounds check per item, slices of one bytes object.
    payload, pos, end = reader.payload, reader.pos, len(reader.payload)
    unpack_from = _U32.unpack_from
    items: list[bytes] = []
    append = items.append
    for _ in range(count):
        if pos + 4 > end:
            raise WireError(f"{reader.kind.name} payload truncated: {count} items announced, "
                            f"{len(items)} present")
        (size,) = unpack_from(payload, pos)
        pos += 4
        if pos + size > end:
            raise WireError(f"{reader.kind.name} item {len(items)} of {size} bytes overruns "
                            "the payload")
        append(payload[pos:pos + size])
        pos += size
    reader.pos = pos
    return items


def _decode_ack(reader: _Reader) -> tuple[int, int, int, int, list[str]]:
    round_, applied, deleted, rejected = reader.unpack(_ROUND_ACK, "counts")
    (count,) = reader.unpack(_U16, "reason count")
    reasons = [reader.text("rejection reason") for _ in range(count)]
    return round_, applied, deleted, rejected, reasons


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_payload(kind: MessageType, payload: bytes) -> Message:
    reader = _Reader(payload, kind)
    message: Message
    match kind:
        case MessageType.HELLO:
            (version,) = reader.unpack(_U16, "protocol version")
            message = Hello(version, reader.text("host name"), reader.text("VM name"),
                            reader.text("SC mode"))
        case MessageType.HELLO_ACK:
            (accepted,) = reader.take(1, "accepted flag")
            if accepted > 1:
                raise WireError(f"HELLO_ACK accepted flag must be 0 or 1, not {accepted}")
            message = HelloAck(bool(accepted), reader.text("reason"))
        case MessageType.POLICY:
            engine = reader.engine()
            try:
                document = json.loads(reader.rest().decode(),
                                      parse_constant=_reject_json_constant)
            except (ValueError, RecursionError) as exc:  # also bad UTF-8, deep nesting
                raise WireError(f"POLICY of {engine!r} is not JSON: {exc}") from None
            message = Policy(engine, document)
        case MessageType.ENTRIES | MessageType.DELETES:
            round_, count = reader.unpack(_BATCH_HEAD, "batch head")
            engine = reader.engine()
            items = _decode_items(reader, count)
            message = (Entries(engine, round_, items) if kind == MessageType.ENTRIES
                       else Deletes(engine, round_, items))
        case MessageType.ROUND_END | MessageType.FINAL:
            round_, entries, deletes = reader.unpack(_ROUND_END, "counts")
            message = (RoundEnd(round_, entries, deletes) if kind == MessageType.ROUND_END
                       else Final(round_, entries, deletes))
        case MessageType.ROUND_ACK:
            message = RoundAck(*_decode_ack(reader))
        case MessageType.FINAL_ACK:
            message = FinalAck(*_decode_ack(reader))
        case MessageType.COMMIT:
            message = Commit()
        case MessageType.ABORT:
            message = Abort(reader.text("reason"))
        case MessageType.ERROR:
            message = Error(reader.text("error code"), reader.text("reason"))
        case MessageType.RESYNC:
            (round_,) = reader.unpack(_U32, "round")
            message = Resync(reader.engine(), round_)
    reader.done()
    return message


_KNOWN_TYPES = frozenset(MessageType)


class FrameDecoder:
    """Turns the bytes of one direction of a channel into messages.

    Buffers partial frames; checks every header as soon as it is complete (so an oversized
    frame or batch is refused before its payload is buffered), the session (fixed by the
    first frame unless given) and the sequence (1, 2, 3, ...). After a WireError the stream
    is unusable and every later `feed` raises again.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_entries_per_frame: int = DEFAULT_MAX_ENTRIES_PER_FRAME,
                 session: bytes | None = None) -> None:
        if not MIN_FRAME_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be {MIN_FRAME_BYTES} to "
                             f"{MAX_FRAME_BYTES}, not {max_frame_bytes}")
        if max_entries_per_frame < 1:
            raise ValueError("max_entries_per_frame must be at least 1")
        if session is not None and len(session) != SESSION_BYTES:
            raise ValueError(f"session id must be {SESSION_BYTES} bytes")
        self.max_frame_bytes = max_frame_bytes
        self.max_entries_per_frame = max_entries_per_frame
        self.session = session
        self._buffer = bytearray()
        self._expected_sequence = 1
        # Header of the frame whose payload is being buffered: (type, payload length).
        self._pending: tuple[MessageType, int] | None = None
        self._failure: str | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at EOF means a truncated frame)."""
        return len(self._buffer) + (HEADER_BYTES if self._pending else 0)

    def feed(self, data: bytes) -> list[Message]:
        if self._failure is not None:
            raise WireError(f"stream already failed: {self._failure}")
        try:
            return self._feed(data)
        except WireError as exc:
            self._failure = str(exc)
            self._buffer.clear()
            raise

    def _feed(self, data: bytes) -> list[Message]:
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        pos = 0
        while True:
            if self._pending is None:
                if len(buffer) - pos < HEADER_BYTES:
                    self._check_magic_prefix(buffer, pos)
                    break
                self._pending = self._header(buffer, pos)
                pos += HEADER_BYTES
            kind, length = self._pending
            available = len(buffer) - pos
            if kind in (MessageType.ENTRIES, MessageType.DELETES):
                self._check_batch_head(buffer, pos, min(available, length), length)
            if available < length:
                break
            with memoryview(buffer)[pos:pos + length] as part:  # one copy, not two
                payload = bytes(part)
            pos += length
            self._pending = None
            messages.append(_decode_payload(kind, payload))
        del buffer[:pos]
        return messages

    def _check_magic_prefix(self, buffer: bytearray, pos: int) -> None:
        # Refuse a stream that is not ours at its first bytes, not after a whole header.
        head = bytes(buffer[pos:pos + len(MAGIC)])
        if not MAGIC.startswith(head):
            raise WireError(f"bad magic {head!r}: not an SC frame")

    def _header(self, buffer: bytearray, pos: int) -> tuple[MessageType, int]:
        magic, version, kind, flags, session, sequence, length = _HEADER.unpack_from(buffer, pos)
        if magic != MAGIC:
            raise WireError(f"bad magic {magic!r}: not an SC frame")
        if version != FRAME_VERSION:
            raise WireError(f"unsupported frame version {version} (this side speaks "
                            f"{FRAME_VERSION})")
        if kind not in _KNOWN_TYPES:
            raise WireError(f"unknown message type {kind}")
        if flags:
            raise WireError(f"unknown flags {flags:#04x}")
        if self.session is None:
            self.session = session
        elif session != self.session:
            raise WireError(f"frame of session {session.hex()}, expected {self.session.hex()}")
        if sequence != self._expected_sequence:
            what = "replayed or reordered" if sequence < self._expected_sequence else "skipped"
            raise WireError(f"{what} frame: sequence {sequence}, expected "
                            f"{self._expected_sequence}")
        if HEADER_BYTES + length > self.max_frame_bytes:
            raise _frame_too_large(MessageType(kind), HEADER_BYTES + length,
                                   self.max_frame_bytes)
        self._expected_sequence += 1
        return MessageType(kind), length

    def _check_batch_head(self, buffer: bytearray, pos: int, available: int,
                          length: int) -> None:
        if available < _BATCH_HEAD.size:
            return
        _, count = _BATCH_HEAD.unpack_from(buffer, pos)
        if count > self.max_entries_per_frame:
            raise _batch_too_large(count, self.max_entries_per_frame)
        if count * 4 > length:  # every item has at least its 4-byte length
            raise WireError(f"batch announces {count} items in a {length}-byte payload")
