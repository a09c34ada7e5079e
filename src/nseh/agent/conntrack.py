"""Reading and writing the kernel's conntrack table over raw ctnetlink, at migration speed.

Entries stay ctnetlink attribute bytes end to end (see `nseh.agent.ctnetlink` for the codec):
a dump is one kernel-filtered request whose replies are sliced, not decoded; inserts and
deletes go out many messages per `send`, without a per-message ACK (the kernel still answers
every failed message, naming its sequence number), and one ACK on the last message of each
batch tells that the batch is done.

Both classes act on the network namespace they were created in (a netlink socket binds to
the creating thread's namespace). Neither is thread-safe.

Event generation: with `net.netfilter.nf_conntrack_events=2` (the kernel default, "auto"), an
entry created while no event listener exists never produces UPDATE or DESTROY events, even
after a listener appears. A host must therefore run with the sysctl at 1 from the start
(`enable_event_generation`), or migration deltas would silently miss changes;
`ConntrackEvents` refuses to start otherwise.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nseh.agent.ctnetlink import (
    CTA_MARK,
    CTA_MARK_MASK,
    HEADROOM,
    ConntrackFormatError,
    MissingStateError,
    create_request,
    delete_request,
    entry_mark,
    entry_summary,
    update_request,
)

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not exported by Python's socket module
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3

# Message types: subsystem CTNETLINK (1) << 8 | IPCTNL_MSG_CT_*.
CT_NEW = 0x100
CT_GET = 0x101
CT_DELETE = 0x102

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

MARK_ALL = 0xFFFFFFFF
BATCH = 256  # messages per send: ~50 KiB, well inside the default socket send buffer
RECV_SIZE = 1 << 16  # the kernel fills dump replies up to 32 KiB per recv
EVENTS_PER_READ = 8192  # datagrams per read_pending call, so a flood cannot starve the caller
EVENTS_SYSCTL = Path("/proc/sys/net/netfilter/nf_conntrack_events")

_NLMSGHDR = struct.Struct("=IHHII")
_NLMSGERR = struct.Struct("=i")
_NFGEN_UNSPEC = b"\0\0\0\0"  # AF_UNSPEC, NFNETLINK_V0, res_id 0: both address families
_SEQ_LIMIT = 1 << 31


class ConntrackError(RuntimeError):
    """A conntrack operation failed; the message is one line."""


class EventsOverrun(ConntrackError):
    """The event socket overflowed and events were lost: resynchronise with a full dump."""


class EventType(enum.IntEnum):
    """A conntrack event, numbered like its multicast group."""

    NEW = NFNLGRP_CONNTRACK_NEW
    UPDATE = NFNLGRP_CONNTRACK_UPDATE
    DESTROY = NFNLGRP_CONNTRACK_DESTROY


@dataclass
class _Batch:
    """Requests framed into one datagram: the entries' indices, the first sequence number."""

    indices: list[int]
    first: int
    datagram: bytes


@dataclass
class InsertResult:
    """What `Conntrack.insert` did: entries created, existing entries updated, and the entries
    that failed as (index in the input, errno, entry summary)."""

    created: int = 0
    updated: int = 0
    # Updates older than the entry here, skipped: the kernel refuses (EBUSY) to clear
    # SEEN_REPLY or ASSURED, which only an earlier state of the connection lacks, e.g. the
    # events a migration tracked before its bulk snapshot, replayed after it.
    stale: int = 0
    failures: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)


def enable_event_generation() -> None:
    """Make every new conntrack entry of the current network namespace produce events, also
    when no listener exists yet (`nf_conntrack_events=1`). Run it when a host starts."""
    try:
        EVENTS_SYSCTL.write_text("1\n")
    except OSError as exc:
        raise ConntrackError(f"cannot enable conntrack events: {exc.strerror}") from None


def _netlink_socket(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        try:
            # Beyond net.core.rmem_max: needs CAP_NET_ADMIN, which an agent has.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    except OSError:
        sock.close()
        raise
    return sock


def _attr_u32(kind: int, value: int) -> bytes:
    return struct.pack("=HH", 8, kind) + struct.pack("!I", value)


def _check_u32(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= MARK_ALL:
        raise ConntrackError(f"ct {name} {value!r} is not in 0..{MARK_ALL}")


def _mark_filter(mark: int, mask: int) -> bytes:
    _check_u32("mark", mark)
    _check_u32("mask", mask)
    return _NFGEN_UNSPEC + _attr_u32(CTA_MARK, mark) + _attr_u32(CTA_MARK_MASK, mask)


class _NetlinkSocketOwner:
    """Owns `_sock`: closed by close() or at the end of a `with` block."""

    _sock: socket.socket

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class Conntrack(_NetlinkSocketOwner):
    """The conntrack table of the network namespace this object was created in."""

    def __init__(self, *, rcvbuf: int = 8 << 20, timeout: float = 30.0) -> None:
        try:
            self._sock = _netlink_socket(rcvbuf)
            # Error replies then carry only the failed message's header, not its body.
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError as exc:
            raise ConntrackError(f"cannot open ctnetlink socket: {exc.strerror}") from None
        self._sock.settimeout(timeout)
        self._seq = 0


    def _next_seq(self, count: int) -> int:
        """The first of `count` consecutive fresh sequence numbers."""
        if self._seq + count >= _SEQ_LIMIT:
            self._seq = 0
        first = self._seq + 1
        self._seq += count
        return first

    def _recv(self, what: str) -> bytes:
        try:
            return self._sock.recv(RECV_SIZE)
        except TimeoutError:
            raise ConntrackError(f"{what}: no answer from the kernel") from None
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise ConntrackError(f"{what}: replies lost (receive buffer overflow)") from None
            raise ConntrackError(f"{what}: {exc.strerror}") from None

    def _send(self, data: bytes, what: str) -> None:
        try:
            self._sock.send(data)
        except OSError as exc:
            raise ConntrackError(f"{what}: {exc.strerror or exc}") from None

    # -- dumps ---------------------------------------------------------------------------------

    def _dump(self, mark: int, mask: int, keep: bool) -> tuple[list[bytes], int]:
        """One kernel-filtered dump: (the entries if `keep`, how many there were)."""
        what = f"dump conntrack mark {mark:#x}/{mask:#x}"
        body = _mark_filter(mark, mask)
        seq = self._next_seq(1)
        self._send(_NLMSGHDR.pack(16 + len(body), CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                   + body, what)
        entries: list[bytes] = []
        append = entries.append
        count = 0
        unpack = _NLMSGHDR.unpack_from
        while True:
            data = self._recv(what)
            size = len(data)
            offset = 0
            while offset < size:
                if size - offset < 16:
                    raise ConntrackError(f"{what}: truncated netlink header")
                length, kind, _, reply_seq, _ = unpack(data, offset)
                if length < 16 or offset + length > size:
                    raise ConntrackError(f"{what}: bad netlink message length {length}")
                if reply_seq == seq:
                    if kind == CT_NEW:
                        count += 1
                        if keep:
                            append(data[offset + 16:offset + length])
                    elif kind == NLMSG_DONE:
                        return entries, count
                    elif kind == NLMSG_ERROR:
                        code = -_NLMSGERR.unpack_from(data, offset + 16)[0] if length >= 20 else 0
                        raise ConntrackError(f"{what}: {os.strerror(code)}")
                offset += (length + 3) & ~3

    def dump(self, mark: int, mask: int = MARK_ALL) -> list[bytes]:
        """The IPv4 and IPv6 entries whose `ct mark & mask == mark`, selected by the kernel."""
        return self._dump(mark, mask, keep=True)[0]

    def count(self, mark: int, mask: int = MARK_ALL) -> int:
        """How many entries have `ct mark & mask == mark`."""
        return self._dump(mark, mask, keep=False)[1]

    # -- batched writes ------------------------------------------------------------------------

    def _batches(self, kind: int, flags: int, build: Callable[[bytes], bytearray | None],
                 entries: Sequence[bytes]) -> tuple[list[_Batch], list[int]]:
        """All requests, framed and joined BATCH per datagram, and the indices of the entries
        `build` skipped (returned None for). Built in full before anything is sent, so that
        malformed input raises ConntrackFormatError (naming the entry) and sends nothing."""
        batches: list[_Batch] = []
        skipped: list[int] = []
        requests: list[bytearray] = []
        indices: list[int] = []
        for index, entry in enumerate(entries):
            try:
                request = build(entry)
            except ConntrackFormatError as exc:
                raise ConntrackFormatError(f"entry #{index}: {exc}") from None
            if request is None:
                skipped.append(index)
                continue
            requests.append(request)
            indices.append(index)
            if len(requests) == BATCH:
                batches.append(self._frame(kind, flags, requests, indices))
                requests, indices = [], []
        if requests:
            batches.append(self._frame(kind, flags, requests, indices))
        return batches, skipped

    def _frame(self, kind: int, flags: int, requests: list[bytearray],
               indices: list[int]) -> _Batch:
        first = seq = self._next_seq(len(requests))
        pack_into = _NLMSGHDR.pack_into
        for request in requests:
            pack_into(request, 0, len(request), kind, flags, seq, 0)
            seq += 1
        # The ACK on the last message marks the end of the batch's replies.
        pack_into(requests[-1], 0, len(requests[-1]), kind, flags | NLM_F_ACK, seq - 1, 0)
        return _Batch(indices, first, b"".join(requests))

    def _send_batches(self, batches: list[_Batch], what: str) -> dict[int, int]:
        """Send the batches; the errno of each failed request by entry index."""
        failed: dict[int, int] = {}
        for batch in batches:
            self._send(batch.datagram, what)
            self._collect(batch, failed, what)
        return failed

    def _collect(self, batch: _Batch, failed: dict[int, int], what: str) -> None:
        """Read the replies to one batch's messages."""
        last = batch.first + len(batch.indices) - 1
        while True:
            data = self._recv(what)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < 16 or offset + length > len(data):
                    raise ConntrackError(f"{what}: bad netlink message length {length}")
                if kind == NLMSG_ERROR and length >= 20 and batch.first <= seq <= last:
                    code = -_NLMSGERR.unpack_from(data, offset + 16)[0]
                    if code:
                        failed[batch.indices[seq - batch.first]] = code
                    if seq == last:
                        return
                offset += (length + 3) & ~3

    def insert(self, entries: Sequence[bytes], *, mark: int | None = None) -> InsertResult:
        """Create copies of dumped entries (with ct mark `mark`, if given); entries that exist
        already are updated instead. Entries without protocol state (UPDATE events of TCP
        connections, mostly) only update: if their connection is missing, they fail with
        ENOENT. Malformed input raises before anything is sent."""
        if mark is not None:
            _check_u32("mark", mark)

        def create(entry: bytes) -> bytearray | None:
            try:
                return create_request(entry, mark)
            except MissingStateError:
                return None

        batches, update_only = self._batches(
            CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, create, entries)
        failed = self._send_batches(batches, "insert conntrack entries")
        del batches
        existing = sorted(update_only + [i for i, code in failed.items() if code == errno.EEXIST])
        update_failed: dict[int, int] = {}
        if existing:
            updates, _ = self._batches(CT_NEW, NLM_F_REQUEST,
                                       lambda entry: update_request(entry, mark),
                                       [entries[index] for index in existing])
            update_failed = {existing[position]: code for position, code in
                             self._send_batches(updates, "update conntrack entries").items()}
        result = InsertResult(created=len(entries) - len(failed) - len(update_only),
                              updated=len(existing) - len(update_failed))
        for index, code in sorted({**failed, **update_failed}.items()):
            if index in update_failed and code == errno.EBUSY:
                result.stale += 1
            elif index in update_failed or code != errno.EEXIST:
                result.failures.append((index, code, entry_summary(entries[index])))
        return result

    def delete(self, entries: Sequence[bytes]) -> int:
        """Delete the entries' connections (by original tuple and zone) and return how many
        existed. Connections already gone are not an error."""
        batches, _ = self._batches(CT_DELETE, NLM_F_REQUEST, delete_request, entries)
        failed = self._send_batches(batches, "delete conntrack entries")
        errors = {index: code for index, code in failed.items() if code != errno.ENOENT}
        if errors:
            index, code = min(errors.items())
            raise ConntrackError(
                f"delete conntrack entries: {len(errors)} failed, first #{index} "
                f"{entry_summary(entries[index])}: {os.strerror(code)}")
        return len(entries) - len(failed)

    def flush(self, mark: int, mask: int = MARK_ALL) -> None:
        """Delete every entry (IPv4 and IPv6) with `ct mark & mask == mark`, in the kernel."""
        body = _mark_filter(mark, mask)
        what = f"flush conntrack mark {mark:#x}/{mask:#x}"
        batches, _ = self._batches(CT_DELETE, NLM_F_REQUEST,
                                   lambda filter_: bytearray(HEADROOM) + filter_, [body])
        failed = self._send_batches(batches, what)
        if failed:
            raise ConntrackError(f"{what}: {os.strerror(failed[0])}")


class ConntrackEvents(_NetlinkSocketOwner):
    """A subscription to the conntrack NEW, UPDATE and DESTROY events of the network namespace
    it was created in. Non-blocking: poll `fileno()` (e.g. asyncio `add_reader`), then call
    `read_pending`. Overflow is reported (`EventsOverrun`), never silently skipped: the socket
    deliberately does not set NETLINK_NO_ENOBUFS."""

    def __init__(self, *, rcvbuf: int = 32 << 20) -> None:
        try:
            setting = EVENTS_SYSCTL.read_text().strip()
        except OSError as exc:
            raise ConntrackError(f"cannot read {EVENTS_SYSCTL}: {exc.strerror}") from None
        if setting != "1":
            raise ConntrackError(
                f"nf_conntrack_events is {setting}, not 1: entries created while nobody "
                "listened would produce no events (call enable_event_generation at host start)")
        try:
            self._sock = _netlink_socket(rcvbuf)
            for group in EventType:
                self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, int(group))
        except OSError as exc:
            raise ConntrackError(f"cannot subscribe to conntrack events: {exc.strerror}") from None
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()


    def read_pending(self, mark: int) -> list[tuple[EventType, bytes]]:
        """The queued events of entries with ct mark `mark`, oldest first, as (type, entry).
        At most EVENTS_PER_READ datagrams are read per call; the socket stays readable if more
        are queued.

        Raises `EventsOverrun` if events were lost; what was queued is discarded then, since
        the resynchronising dump supersedes it.
        """
        events: list[tuple[EventType, bytes]] = []
        for _ in range(EVENTS_PER_READ):
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._discard_queue()
                    raise EventsOverrun(
                        "conntrack event socket overflowed: events lost, resync with a dump"
                    ) from None
                raise ConntrackError(f"read conntrack events: {exc.strerror}") from None
            offset = 0
            while offset + 16 <= len(data):
                length, kind, flags, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < 16 or offset + length > len(data):
                    raise ConntrackError(f"conntrack event: bad netlink message length {length}")
                if kind in (CT_NEW, CT_DELETE):
                    entry = data[offset + 16:offset + length]
                    if entry_mark(entry) == mark:
                        if kind == CT_DELETE:
                            event = EventType.DESTROY
                        elif flags & NLM_F_CREATE:  # the kernel flags NEW events CREATE|EXCL
                            event = EventType.NEW
                        else:
                            event = EventType.UPDATE
                        events.append((event, entry))
                offset += (length + 3) & ~3
        return events

    def _discard_queue(self) -> None:
        while True:
            try:
                self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise ConntrackError(f"read conntrack events: {exc.strerror}") from None
