"""Pure codec for conntrack entries kept as ctnetlink bytes (no I/O).

An *entry* is the body of one ctnetlink message as the kernel sent it, without the nlmsghdr:
the 4-byte nfgenmsg (family, version, res_id) followed by the conntrack attributes (CTA_*,
netlink TLVs). The hot path never turns entries into objects: each function walks only the
top-level attributes it needs (and the nested ones only where it must look inside), checking
every length it relies on. Malformed input raises `ConntrackFormatError` with a one-line
message.

What the kernel (6.18, checked by experiment) needs to create an exact copy of a dumped entry
(`to_create_message`):

- CTA_STATUS must keep IPS_CONFIRMED (ctnetlink marks the new entry confirmed before it
  applies the status, and any change of CONFIRMED, EXPECTED or DYING is refused with EBUSY);
  EXPECTED and DYING must go (the kernel sets EXPECTED itself from CTA_TUPLE_MASTER).
- The TCP flags in a dump carry a zero mask, and the kernel applies only masked bits, so a
  verbatim copy loses the window-scale and SACK flags (and with them the window scale
  factors): the mask must be set. Flags that describe window-tracking state ctnetlink does
  not transfer (td_maxack, unacknowledged data) are not copied.
- NAT: a dumped NATed entry has the translated reply tuple and SRC_NAT/DST_NAT status bits,
  but status NAT bits cannot be set and a translated reply tuple alone does not translate
  anything. The kernel must redo the NAT setup: the create message carries the *untranslated*
  reply tuple (the inverted original tuple) plus CTA_NAT_DST (from the reply source) and/or
  CTA_NAT_SRC (from the reply destination); the kernel then computes the same reply tuple and
  sets the NAT bits. Packets are translated only where NAT hooks are registered (an nft table
  with nat chains).
- Attributes that describe the source host or cannot be set are dropped: CTA_ID, CTA_USE,
  counters, timestamps, the security context, masks and filters.
- CTA_LABELS are kept, but the kernel attaches them only in a namespace whose ruleset uses
  ct labels; elsewhere it drops them without an error.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")


class ConntrackFormatError(ValueError):
    """A conntrack entry (or netlink data) is malformed; the message is one line."""


class MissingStateError(ConntrackFormatError):
    """A TCP, DCCP or SCTP entry without CTA_PROTOINFO, such as most UPDATE events: it can
    bring an existing connection up to date, but a connection created from it would have no
    protocol state (the kernel would accept it, with state NONE)."""


# include/uapi/linux/netfilter/nfnetlink_conntrack.h
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_HELP = 5
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_USE = 11
CTA_ID = 12
CTA_NAT_DST = 13
CTA_TUPLE_MASTER = 14
CTA_SEQ_ADJ_ORIG = 15
CTA_SEQ_ADJ_REPLY = 16
CTA_ZONE = 18
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_LABELS = 22
CTA_SYNPROXY = 24

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5
CTA_NAT_V4_MINIP = 1
CTA_NAT_V4_MAXIP = 2
CTA_NAT_PROTO = 3
CTA_NAT_V6_MINIP = 4
CTA_NAT_V6_MAXIP = 5
CTA_PROTONAT_PORT_MIN = 1
CTA_PROTONAT_PORT_MAX = 2

# include/uapi/linux/netfilter/nf_conntrack_common.h
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_TEMPLATE = 1 << 11
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15
# Bits the kernel sets itself and ignores in CTA_STATUS (IPS_UNCHANGEABLE_MASK), kept out of
# the messages we build; CONFIRMED is added back where the kernel demands it.
_UNCHANGEABLE = (IPS_EXPECTED | IPS_CONFIRMED | IPS_DYING | IPS_SRC_NAT | IPS_DST_NAT
                 | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE | IPS_SEQ_ADJUST | IPS_TEMPLATE
                 | IPS_OFFLOAD | IPS_HW_OFFLOAD)

# include/uapi/linux/netfilter/nf_conntrack_tcp.h: flags that state facts about the peers
# (window scaling, SACK, who closed first, liberal checking). Not copied: DATA_UNACKNOWLEDGED
# and MAXACK_SET (they refer to sequence numbers ctnetlink does not carry), CHALLENGE_ACK and
# SIMULTANEOUS_OPEN (handshake transients).
TCP_FLAG_WINDOW_SCALE = 0x01
TCP_FLAG_SACK_PERM = 0x02
TCP_FLAG_CLOSE_INIT = 0x04
TCP_FLAG_BE_LIBERAL = 0x08
_COPIED_TCP_FLAGS = (TCP_FLAG_WINDOW_SCALE | TCP_FLAG_SACK_PERM | TCP_FLAG_CLOSE_INIT
                     | TCP_FLAG_BE_LIBERAL)

TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
              "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 58: "icmpv6",
                132: "sctp", 136: "udplite"}
_PORT_PROTOS = frozenset({6, 17, 33, 132, 136})
_STATEFUL_PROTOS = frozenset({6, 33, 132})  # their state lives in CTA_PROTOINFO
_ICMP_PROTOS = frozenset({1, 58})

_NLA_F_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_NLA_F_NESTED = 0x8000
_NLA = struct.Struct("=HH")
_BE16 = struct.Struct("!H")
_BE32 = struct.Struct("!I")

_FAMILIES = {socket.AF_INET: (4, CTA_IP_V4_SRC, CTA_IP_V4_DST),
             socket.AF_INET6: (16, CTA_IP_V6_SRC, CTA_IP_V6_DST)}

# Top-level attributes kept in create requests (CTA_STATUS and CTA_PROTOINFO patched,
# CTA_MARK optionally replaced, the reply tuple of NATed entries rebuilt); the rest is dropped:
# CTA_ID, CTA_USE, counters, timestamps, security context, masks and filters.
_CREATE_COPY = frozenset({CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_HELP,
                          CTA_TIMEOUT, CTA_MARK, CTA_TUPLE_MASTER, CTA_SEQ_ADJ_ORIG,
                          CTA_SEQ_ADJ_REPLY, CTA_ZONE, CTA_LABELS, CTA_SYNPROXY})
# What an update of an existing entry may carry: the kernel refuses NAT, master and helper
# changes of an existing entry, and looks it up by the original tuple.
_UPDATE_COPY = frozenset({CTA_TUPLE_ORIG, CTA_STATUS, CTA_PROTOINFO, CTA_TIMEOUT, CTA_MARK,
                          CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY, CTA_ZONE, CTA_LABELS,
                          CTA_SYNPROXY})
_DELETE_COPY = frozenset({CTA_TUPLE_ORIG, CTA_ZONE})
# Fixed value sizes of the top-level attributes this module reads.
_SIZES = {CTA_STATUS: 4, CTA_TIMEOUT: 4, CTA_MARK: 4, CTA_ZONE: 2}
_NAMES = {CTA_TUPLE_ORIG: "CTA_TUPLE_ORIG", CTA_TUPLE_REPLY: "CTA_TUPLE_REPLY",
          CTA_STATUS: "CTA_STATUS", CTA_TIMEOUT: "CTA_TIMEOUT", CTA_MARK: "CTA_MARK",
          CTA_ZONE: "CTA_ZONE", CTA_PROTOINFO: "CTA_PROTOINFO"}

MARK_MAX = 0xFFFFFFFF


def _attr_name(kind: int) -> str:
    return _NAMES.get(kind, f"attribute {kind}")


def _walk(data: bytes, start: int, end: int, where: str) -> dict[int, tuple[int, int]]:
    """The attributes in data[start:end] as {type: (value start, value end)}.

    Strict where the kernel is lenient, so that what we read is what the kernel will use:
    a duplicated attribute (the kernel would take the last one) is an error.
    """
    found: dict[int, tuple[int, int]] = {}
    offset = start
    while offset < end:
        if end - offset < 4:
            raise ConntrackFormatError(f"{where}: {end - offset} stray bytes after attributes")
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            raise ConntrackFormatError(
                f"{where}: attribute {kind & _NLA_F_MASK} has bad length {length}")
        kind &= _NLA_F_MASK
        if kind in found:
            raise ConntrackFormatError(f"{where}: duplicate {_attr_name(kind)}")
        found[kind] = (offset + 4, offset + length)
        offset += (length + 3) & ~3
    return found


def _top(entry: bytes) -> dict[int, tuple[int, int]]:
    if not isinstance(entry, bytes | bytearray | memoryview):
        raise ConntrackFormatError(f"entry is {type(entry).__name__}, not bytes")
    if len(entry) < 4:
        raise ConntrackFormatError(f"entry of {len(entry)} bytes has no nfgenmsg header")
    attrs = _walk(entry, 4, len(entry), "entry")
    for kind, size in _SIZES.items():
        if kind in attrs and attrs[kind][1] - attrs[kind][0] != size:
            raise ConntrackFormatError(f"entry: {_attr_name(kind)} is not {size} bytes")
    return attrs


def _family(entry: bytes) -> tuple[int, int, int, int]:
    """(family, address size, SRC attribute, DST attribute) of an entry."""
    if len(entry) < 4:
        raise ConntrackFormatError(f"entry of {len(entry)} bytes has no nfgenmsg header")
    family = entry[0]
    if family not in _FAMILIES:
        raise ConntrackFormatError(f"entry: address family {family} is not IPv4 or IPv6")
    return (family, *_FAMILIES[family])


def _required(entry: bytes, attrs: dict[int, tuple[int, int]], kind: int) -> tuple[int, int]:
    if kind not in attrs:
        raise ConntrackFormatError(f"entry has no {_attr_name(kind)}")
    return attrs[kind]


def _u32(entry: bytes, attrs: dict[int, tuple[int, int]], kind: int) -> int | None:
    span = attrs.get(kind)
    return None if span is None else _BE32.unpack_from(entry, span[0])[0]


def _attr(kind: int, value: bytes, nested: bool = False) -> bytes:
    length = 4 + len(value)
    header = _NLA.pack(length, kind | (_NLA_F_NESTED if nested else 0))
    return header + value + b"\0" * (-length % 4)


def _check_mark(mark: int) -> None:
    if not isinstance(mark, int) or not 0 <= mark <= MARK_MAX:
        raise ConntrackFormatError(f"ct mark {mark!r} is not in 0..{MARK_MAX}")


# ---------------------------------------------------------------------------------------------
# Reading entries.


def entry_mark(entry: bytes) -> int:
    """The entry's ct mark (0 when the entry carries no CTA_MARK)."""
    return _u32(entry, _top(entry), CTA_MARK) or 0


def entry_zone(entry: bytes) -> int:
    """The entry's conntrack zone id (0, the default zone, when it carries no CTA_ZONE)."""
    attrs = _top(entry)
    span = attrs.get(CTA_ZONE)
    return 0 if span is None else _BE16.unpack_from(entry, span[0])[0]


def entry_key(entry: bytes) -> bytes:
    """A stable identity of the connection: family, raw original tuple and zone.

    Dumps and events of the same connection yield the same key, so deltas can be coalesced.
    """
    attrs = _top(entry)
    start, end = _required(entry, attrs, CTA_TUPLE_ORIG)
    zone = attrs.get(CTA_ZONE)
    return bytes(entry[:1]) + bytes(entry[start:end]) + (
        bytes(entry[zone[0]:zone[1]]) if zone else b"\0\0")


class _Tuple:
    """The decoded parts of one CTA_TUPLE_* (cold paths only: summaries, addresses, NAT)."""

    def __init__(self, entry: bytes, span: tuple[int, int], where: str) -> None:
        _, size, src_attr, dst_attr = _family(entry)
        parts = _walk(entry, span[0], span[1], where)
        ip = parts.get(CTA_TUPLE_IP)
        proto = parts.get(CTA_TUPLE_PROTO)
        if ip is None or proto is None:
            raise ConntrackFormatError(f"{where}: tuple lacks addresses or protocol")
        ips = _walk(entry, ip[0], ip[1], f"{where} addresses")
        self.addresses: list[bytes] = []
        for kind in (src_attr, dst_attr):
            value = ips.get(kind)
            if value is None or value[1] - value[0] != size:
                raise ConntrackFormatError(
                    f"{where}: missing or bad {'source' if kind == src_attr else 'destination'}"
                    f" address for family {entry[0]}")
            self.addresses.append(bytes(entry[value[0]:value[1]]))
        if set(ips) - {src_attr, dst_attr}:
            raise ConntrackFormatError(f"{where}: addresses of the wrong family")
        self.proto_parts = _walk(entry, proto[0], proto[1], f"{where} protocol")
        self.entry = entry
        self.where = where
        num = self.proto_parts.get(CTA_PROTO_NUM)
        if num is None or num[1] - num[0] != 1:
            raise ConntrackFormatError(f"{where}: missing or bad protocol number")
        self.proto: int = entry[num[0]]

    def u16(self, kind: int) -> int | None:
        span = self.proto_parts.get(kind)
        if span is None:
            return None
        if span[1] - span[0] != 2:
            raise ConntrackFormatError(f"{self.where}: protocol attribute {kind} is not 2 bytes")
        return _BE16.unpack_from(self.entry, span[0])[0]

    def u8(self, kind: int) -> int | None:
        span = self.proto_parts.get(kind)
        if span is None:
            return None
        if span[1] - span[0] != 1:
            raise ConntrackFormatError(f"{self.where}: protocol attribute {kind} is not 1 byte")
        return self.entry[span[0]]

    def ports(self) -> tuple[int | None, int | None]:
        """(source port, destination port); for ICMP the id stands in for both."""
        if self.proto in _ICMP_PROTOS:
            icmp_id = self.u16(CTA_PROTO_ICMP_ID if self.proto == 1 else CTA_PROTO_ICMPV6_ID)
            return icmp_id, icmp_id
        return self.u16(CTA_PROTO_SRC_PORT), self.u16(CTA_PROTO_DST_PORT)


def _tuples(entry: bytes, attrs: dict[int, tuple[int, int]]) -> tuple[_Tuple, _Tuple]:
    orig = _Tuple(entry, _required(entry, attrs, CTA_TUPLE_ORIG), "CTA_TUPLE_ORIG")
    reply = _Tuple(entry, _required(entry, attrs, CTA_TUPLE_REPLY), "CTA_TUPLE_REPLY")
    if orig.proto != reply.proto:
        raise ConntrackFormatError("entry: tuples have different protocols")
    return orig, reply


def entry_addresses(entry: bytes) -> set[IPAddress]:
    """Every address in the original and reply tuples."""
    orig, reply = _tuples(entry, _top(entry))
    return {ipaddress.ip_address(raw) for raw in orig.addresses + reply.addresses}


class _LayoutCache(Generic[T]):
    """Per-layout compiled data, found again for further entries by one `struct` call.

    Entries dumped by one kernel come in a handful of attribute layouts. `compile` walks an
    entry once, validates it and returns (check, expected, data): `check` unpacks every
    header the walk read, `expected` is what it found. An entry of the same length whose
    headers unpack to `expected` has the same layout, so `data` (offsets, ranges) holds.
    """

    LIMIT = 64  # layouts kept; when full, the cache starts over (hostile input cannot grow
    # it, nor keep the real layouts out of it for long)

    def __init__(self, compile: Callable[[bytes], tuple[struct.Struct, tuple[int, ...], T]]
                 ) -> None:
        self.compile = compile
        self.layouts: dict[int, list[tuple[struct.Struct, tuple[int, ...], T]]] = {}
        self.count = 0

    def lookup(self, entry: bytes) -> T:
        for check, expected, data in self.layouts.get(len(entry), ()):
            if check.unpack_from(entry) == expected:
                return data
        layout = self.compile(entry)
        if self.count >= self.LIMIT:
            self.layouts.clear()
            self.count = 0
        self.layouts.setdefault(len(entry), []).append(layout)
        self.count += 1
        return layout[2]


def _header_check(entry: bytes, headers: list[int]) -> tuple[struct.Struct, tuple[int, ...]]:
    """A struct reading the family byte and the (length, type) of every header at the given
    offsets, and what it reads from `entry`."""
    fmt = ["=B"]
    position = 1
    for header in sorted(headers):
        fmt.append(f"{header - position}xHH")
        position = header + 4
    check = struct.Struct("".join(fmt))
    return check, check.unpack_from(entry)


# Where a layout's four tuple addresses sit, their size, and where its zone id sits (if any).
_ScopeLayout = tuple[tuple[int, ...], int, int | None]


class AddressScope:
    """Fast check that entries are connections of given addresses, in the default zone.

    The destination of a migration runs it on every received entry, so it compiles each
    attribute layout once (like the request builder below): the walk validates the entry
    (duplicates, lengths, address sizes) and records every header it read and where the four
    tuple addresses sit; further entries of the layout are checked with one `struct` call.
    """

    def __init__(self, addresses: Iterable[IPAddress]) -> None:
        self.allowed = frozenset(address.packed for address in addresses)
        self.layouts: _LayoutCache[_ScopeLayout] = _LayoutCache(self._compile)

    def reason_to_reject(self, entry: bytes) -> str | None:
        """None if `entry` is in scope, else why not (one line)."""
        if not isinstance(entry, bytes | bytearray):
            raise ConntrackFormatError(f"entry is {type(entry).__name__}, not bytes")
        offsets, size, zone_at = self.layouts.lookup(entry)
        if zone_at is not None and entry[zone_at:zone_at + 2] != b"\0\0":
            return f"entry in conntrack zone {_BE16.unpack_from(entry, zone_at)[0]}"
        found = [bytes(entry[at:at + size]) for at in offsets]
        if self.allowed.isdisjoint(found):
            shown = ", ".join(sorted({str(ipaddress.ip_address(raw)) for raw in found}))
            return f"entry of {shown} has none of the allowed addresses"
        return None

    @staticmethod
    def _compile(entry: bytes) -> tuple[struct.Struct, tuple[int, ...], _ScopeLayout]:
        _, size, src_attr, dst_attr = _family(entry)
        attrs = _top(entry)
        headers = [start - 4 for start, _ in attrs.values()]
        offsets: list[int] = []
        for kind, where in ((CTA_TUPLE_ORIG, "CTA_TUPLE_ORIG"),
                            (CTA_TUPLE_REPLY, "CTA_TUPLE_REPLY")):
            start, stop = _required(entry, attrs, kind)
            parts = _walk(entry, start, stop, where)
            if CTA_TUPLE_ZONE in parts:
                raise ConntrackFormatError(f"{where}: tuple zones are not migrated")
            ip = parts.get(CTA_TUPLE_IP)
            if ip is None:
                raise ConntrackFormatError(f"{where}: tuple lacks addresses")
            ips = _walk(entry, ip[0], ip[1], f"{where} addresses")
            if set(ips) != {src_attr, dst_attr}:
                raise ConntrackFormatError(f"{where}: addresses missing or of the wrong family")
            for value_start, value_end in ips.values():
                if value_end - value_start != size:
                    raise ConntrackFormatError(f"{where}: address of {value_end - value_start}"
                                               f" bytes for family {entry[0]}")
                offsets.append(value_start)
            headers += [start - 4 for start, _ in (*parts.values(), *ips.values())]
        zone = attrs.get(CTA_ZONE)
        return (*_header_check(entry, headers),
                (tuple(offsets), size, None if zone is None else zone[0]))


def entry_summary(entry: bytes) -> dict[str, Any]:
    """A readable digest of an entry, for logs and tests (not for the hot path)."""
    attrs = _top(entry)
    orig, _ = _tuples(entry, attrs)
    sport, dport = orig.ports()
    state: str | None = None
    if orig.proto == 6 and CTA_PROTOINFO in attrs:
        state = _tcp_state(entry, attrs[CTA_PROTOINFO])
    icmp: dict[str, int | None] = {}
    if orig.proto in _ICMP_PROTOS:
        v6 = orig.proto == 58
        icmp = {"icmp_type": orig.u8(CTA_PROTO_ICMPV6_TYPE if v6 else CTA_PROTO_ICMP_TYPE),
                "icmp_code": orig.u8(CTA_PROTO_ICMPV6_CODE if v6 else CTA_PROTO_ICMP_CODE),
                "icmp_id": sport}
        sport = dport = None
    return {
        "family": "ipv4" if entry[0] == socket.AF_INET else "ipv6",
        "proto": _PROTO_NAMES.get(orig.proto, str(orig.proto)),
        "src": str(ipaddress.ip_address(orig.addresses[0])),
        "dst": str(ipaddress.ip_address(orig.addresses[1])),
        "sport": sport,
        "dport": dport,
        **icmp,
        "state": state,
        "status": _u32(entry, attrs, CTA_STATUS),
        "mark": _u32(entry, attrs, CTA_MARK) or 0,
        "zone": entry_zone(entry),
        "timeout": _u32(entry, attrs, CTA_TIMEOUT),
    }


def _tcp_state(entry: bytes, span: tuple[int, int]) -> str | None:
    tcp = _walk(entry, span[0], span[1], "CTA_PROTOINFO").get(CTA_PROTOINFO_TCP)
    if tcp is None:
        return None
    value = _walk(entry, tcp[0], tcp[1], "CTA_PROTOINFO_TCP").get(CTA_PROTOINFO_TCP_STATE)
    if value is None:
        return None
    if value[1] - value[0] != 1:
        raise ConntrackFormatError("CTA_PROTOINFO_TCP: state is not 1 byte")
    number = entry[value[0]]
    return TCP_STATES[number] if number < len(TCP_STATES) else str(number)


# ---------------------------------------------------------------------------------------------
# Rewriting entries.


def rewrite_mark(entry: bytes, mark: int) -> bytes:
    """The entry with its ct mark set to `mark` (CTA_MARK patched in place, or appended)."""
    _check_mark(mark)
    attrs = _top(entry)
    span = attrs.get(CTA_MARK)
    if span is None:
        padding = b"\0" * (-len(entry) % 4)  # a last attribute may lack its padding
        return bytes(entry) + padding + _attr(CTA_MARK, _BE32.pack(mark))
    return bytes(entry[:span[0]]) + _BE32.pack(mark) + bytes(entry[span[1]:])


def _status_attr(status: int) -> bytes:
    return b"\x08\x00\x03\x00" + _BE32.pack(status)  # CTA_STATUS, 4-byte value


def _mark_attr(mark: int) -> bytes:
    return b"\x08\x00\x08\x00" + _BE32.pack(mark)  # CTA_MARK, 4-byte value


# Requests are built by layout. Entries dumped by one kernel come in a handful of attribute
# layouts (one per family, protocol and enabled extension); the slow path walks an entry once,
# validates it and compiles its layout into a `_Recipe`: a struct that reads all the headers
# the walk looked at, the byte ranges to copy, and where to patch values. Every further entry
# of that layout is checked with one `struct` call and assembled from a few slices.


class _Recipe:
    """How to turn an entry of one attribute layout into a request."""

    __slots__ = ("flags_at", "mark_at", "nat_at", "proto_at", "ranges", "reply", "status_at")

    def __init__(self, ranges: list[tuple[int, int]], nat_at: int | None, proto_at: int | None,
                 status_at: int | None, mark_at: int | None, flags_at: list[int],
                 reply: tuple[int, int] | None) -> None:
        self.ranges = ranges  # input byte ranges copied to the output, in order
        # Offsets in the input: the status byte with the NAT bits; the protocol number, if
        # the entry has no CTA_PROTOINFO and is meant to create a connection.
        self.nat_at = nat_at
        self.proto_at = proto_at
        # Offsets in the output (after the nlmsghdr headroom):
        self.status_at = status_at  # of the status value
        self.mark_at = mark_at  # of the mark value
        self.flags_at = flags_at  # of each TCP (flags, mask) pair
        self.reply = reply  # the reply tuple attribute's range, header included


HEADROOM = 16  # requests leave room for the nlmsghdr, which the sender fills in


class _Purpose:
    """One kind of request built from entries, with its cache of compiled layouts."""

    def __init__(self, copy: frozenset[int], required: tuple[int, ...], status_on: int,
                 status_off: int, creates: bool) -> None:
        self.copy = copy  # top-level attributes kept (STATUS and PROTOINFO are patched)
        self.required = required
        self.creates = creates  # requests create connections: they need protocol state
        # Status bits set and cleared, as byte masks of the value's two low bytes (all the
        # bits involved are below 1 << 16).
        self.status_low = (~status_off & 0xFF, status_on & 0xFF)
        self.status_mid = (~status_off >> 8 & 0xFF, status_on >> 8 & 0xFF)
        self.recipes: _LayoutCache[_Recipe] = _LayoutCache(self._compile)

    def recipe(self, entry: bytes) -> _Recipe:
        return self.recipes.lookup(entry)

    def _compile(self, entry: bytes) -> tuple[struct.Struct, tuple[int, ...], _Recipe]:
        """Walk and validate an entry; derive the recipe for its layout."""
        _family(entry)
        attrs = _top(entry)
        for kind in self.required:
            _required(entry, attrs, kind)
        headers = [offset - 4 for offset, _ in attrs.values()]
        ranges: list[tuple[int, int]] = [(0, 4)]
        out = HEADROOM + 4
        nat_at = status_at = mark_at = reply = None
        flags_at: list[int] = []
        padded = 4
        for kind, (start, stop) in sorted(attrs.items(), key=lambda item: item[1]):
            if kind not in self.copy:
                continue
            header = start - 4
            padded = header + ((stop - header + 3) & ~3)
            if ranges[-1][1] == header:
                ranges[-1] = (ranges[-1][0], min(padded, len(entry)))
            else:
                ranges.append((header, min(padded, len(entry))))
            at = out + 4  # output offset of this attribute's value
            if kind == CTA_STATUS:
                nat_at, status_at = start + 3, at
            elif kind == CTA_MARK:
                mark_at = at
            elif kind == CTA_TUPLE_REPLY:
                reply = (out, out + padded - header)
            elif kind == CTA_PROTOINFO:
                # Every header the walk reads, not just the TCP one: a layout hit must mean
                # that a walk would find the same attributes.
                protocols = _walk(entry, start, stop, "CTA_PROTOINFO")
                headers += [value_start - 4 for value_start, _ in protocols.values()]
                tcp = protocols.get(CTA_PROTOINFO_TCP)
                if tcp is not None:
                    fields = _walk(entry, tcp[0], tcp[1], "CTA_PROTOINFO_TCP")
                    headers += [value_start - 4 for value_start, _ in fields.values()]
                    for flag in (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY):
                        if flag in fields:
                            value_start, value_end = fields[flag]
                            if value_end - value_start != 2:
                                raise ConntrackFormatError(
                                    "CTA_PROTOINFO_TCP: flags attribute is not 2 bytes")
                            flags_at.append(at + value_start - start)
            out += padded - header
        proto_at = None
        if self.creates and CTA_PROTOINFO not in attrs:
            proto_at = self._protocol_number(entry, attrs[CTA_TUPLE_ORIG], headers)
        check, expected = _header_check(entry, headers)
        return check, expected, _Recipe(ranges, nat_at, proto_at, status_at, mark_at,
                                        flags_at, reply)

    @staticmethod
    def _protocol_number(entry: bytes, orig: tuple[int, int], headers: list[int]) -> int:
        """Offset of the original tuple's protocol number; the headers walked to find it are
        added to `headers`, so that the offset holds for every entry of the layout."""
        parts = _walk(entry, orig[0], orig[1], "CTA_TUPLE_ORIG")
        proto = parts.get(CTA_TUPLE_PROTO)
        if proto is None:
            raise ConntrackFormatError("CTA_TUPLE_ORIG: tuple lacks protocol")
        fields = _walk(entry, proto[0], proto[1], "CTA_TUPLE_ORIG protocol")
        number = fields.get(CTA_PROTO_NUM)
        if number is None or number[1] - number[0] != 1:
            raise ConntrackFormatError("CTA_TUPLE_ORIG: missing or bad protocol number")
        headers += [start - 4 for start, _ in (*parts.values(), *fields.values())]
        return number[0]

    def request(self, entry: bytes, mark: int | None) -> tuple[bytearray, _Recipe]:
        """The request for `entry`, after HEADROOM bytes: the kept attributes, status bits set
        and cleared, TCP flag masks set, the mark replaced or added if given."""
        recipe = self.recipe(entry)
        if recipe.proto_at is not None and entry[recipe.proto_at] in _STATEFUL_PROTOS:
            name = _PROTO_NAMES[entry[recipe.proto_at]]
            raise MissingStateError(f"{name} entry without CTA_PROTOINFO: no state to create "
                                    "a connection with")
        body = bytearray(HEADROOM)
        for start, stop in recipe.ranges:
            body += entry[start:stop]
        if len(body) % 4:  # the last attribute came without its padding
            body += b"\0" * (-len(body) % 4)
        at = recipe.status_at
        if at is not None:
            keep, put = self.status_low
            body[at + 3] = body[at + 3] & keep | put
            keep, put = self.status_mid
            body[at + 2] = body[at + 2] & keep | put
        for at in recipe.flags_at:
            body[at] &= _COPIED_TCP_FLAGS
            body[at + 1] = _COPIED_TCP_FLAGS  # dumps report a zero mask: nothing would apply
        if mark is not None:
            if recipe.mark_at is None:
                body += _mark_attr(mark)
            else:
                _BE32.pack_into(body, recipe.mark_at, mark)
        return body, recipe


# Creation: the kernel wants CONFIRMED and refuses EXPECTED and DYING; the other unchangeable
# bits are ignored by the kernel, and kept out for clarity.
_CREATE = _Purpose(_CREATE_COPY, (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_TIMEOUT),
                   IPS_CONFIRMED, _UNCHANGEABLE, creates=True)
# Update: the entry in the table is confirmed (and EXPECTED, if created with a master).
_UPDATE = _Purpose(_UPDATE_COPY, (CTA_TUPLE_ORIG,), IPS_CONFIRMED,
                   _UNCHANGEABLE & ~IPS_EXPECTED, creates=False)
_DELETE = _Purpose(_DELETE_COPY, (CTA_TUPLE_ORIG,), 0, 0, creates=False)
_NAT_BITS = IPS_SRC_NAT | IPS_DST_NAT


def create_request(entry: bytes, mark: int | None = None) -> bytearray:
    """`to_create_message` after HEADROOM spare bytes (for the sender's nlmsghdr)."""
    if mark is not None:
        _check_mark(mark)
    body, recipe = _CREATE.request(entry, mark)
    if recipe.nat_at is not None and entry[recipe.nat_at] & _NAT_BITS:
        return _redo_nat(entry, body, recipe)
    return body


def update_request(entry: bytes, mark: int | None = None) -> bytearray:
    """`to_update_message` after HEADROOM spare bytes."""
    if mark is not None:
        _check_mark(mark)
    return _UPDATE.request(entry, mark)[0]


def delete_request(entry: bytes) -> bytearray:
    """`to_delete_message` after HEADROOM spare bytes."""
    return _DELETE.request(entry, None)[0]


def to_create_message(entry: bytes, *, mark: int | None = None) -> bytes:
    """The body of the IPCTNL_MSG_CT_NEW (NLM_F_CREATE) request that creates an exact copy of
    the dumped `entry` in another table, optionally with another ct mark."""
    return bytes(create_request(entry, mark)[HEADROOM:])


def to_update_message(entry: bytes, *, mark: int | None = None) -> bytes:
    """The body of the IPCTNL_MSG_CT_NEW request (without NLM_F_CREATE) that brings an existing
    copy of `entry` up to date: status bits, timeout, TCP state and flags, mark, labels."""
    return bytes(update_request(entry, mark)[HEADROOM:])


def to_delete_message(entry: bytes) -> bytes:
    """The body of the IPCTNL_MSG_CT_DELETE request for the entry's connection (original tuple
    and zone; not the id, which is local to one host)."""
    return bytes(delete_request(entry)[HEADROOM:])


def _redo_nat(entry: bytes, body: bytearray, recipe: _Recipe) -> bytearray:
    """The create request with the translated reply tuple replaced by the inverted original
    tuple, and the NAT ranges that make the kernel translate it again the same way."""
    attrs = _top(entry)
    status = _u32(entry, attrs, CTA_STATUS) or 0
    orig, reply = _tuples(entry, attrs)
    assert recipe.reply is not None  # required for creation
    start, stop = recipe.reply
    inverted = _attr(CTA_TUPLE_REPLY, _inverted_reply(entry, attrs, orig), nested=True)
    family, _, _, _ = _family(entry)
    min_ip, max_ip = ((CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP) if family == socket.AF_INET
                      else (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP))
    reply_sport, reply_dport = reply.ports()
    nat = b""
    if status & IPS_DST_NAT:
        # Destination NAT: replies come from the translated destination.
        port = reply_sport if orig.proto in _PORT_PROTOS else None
        nat += _nat_range(CTA_NAT_DST, min_ip, max_ip, reply.addresses[0], port)
    if status & IPS_SRC_NAT:
        # Source NAT: replies go to the translated source (port, or ICMP id).
        nat += _nat_range(CTA_NAT_SRC, min_ip, max_ip, reply.addresses[1], reply_dport)
    return body[:start] + inverted + body[stop:] + nat


def _nat_range(kind: int, min_ip: int, max_ip: int, address: bytes, port: int | None) -> bytes:
    value = _attr(min_ip, address) + _attr(max_ip, address)
    if port is not None:
        packed = _BE16.pack(port)
        value += _attr(CTA_NAT_PROTO, _attr(CTA_PROTONAT_PORT_MIN, packed)
                       + _attr(CTA_PROTONAT_PORT_MAX, packed), nested=True)
    return _attr(kind, value, nested=True)


def _inverted_reply(entry: bytes, found: dict[int, tuple[int, int]], orig: _Tuple) -> bytes:
    """The value of the reply tuple as it was before translation: the dumped reply tuple with
    its addresses and ports (ICMP id) taken from the swapped original tuple; the rest (ICMP
    type and code, tuple zone) stays."""
    _, _, src_attr, dst_attr = _family(entry)
    start, stop = found[CTA_TUPLE_REPLY]
    out: list[bytes] = []
    for kind, (value_start, value_end) in _walk(entry, start, stop, "CTA_TUPLE_REPLY").items():
        if kind == CTA_TUPLE_IP:
            out.append(_attr(CTA_TUPLE_IP, _attr(src_attr, orig.addresses[1])
                             + _attr(dst_attr, orig.addresses[0]), nested=True))
        elif kind == CTA_TUPLE_PROTO:
            swapped = {CTA_PROTO_SRC_PORT: CTA_PROTO_DST_PORT,
                       CTA_PROTO_DST_PORT: CTA_PROTO_SRC_PORT,
                       CTA_PROTO_ICMP_ID: CTA_PROTO_ICMP_ID,
                       CTA_PROTO_ICMPV6_ID: CTA_PROTO_ICMPV6_ID}
            parts = _walk(entry, value_start, value_end, "CTA_TUPLE_REPLY protocol")
            proto = b""
            for part, (part_start, part_end) in parts.items():
                source = swapped.get(part)
                if source is not None and source in orig.proto_parts:
                    span = orig.proto_parts[source]
                    proto += _attr(part, bytes(entry[span[0]:span[1]]))
                else:
                    proto += _attr(part, bytes(entry[part_start:part_end]))
            out.append(_attr(CTA_TUPLE_PROTO, proto, nested=True))
        else:
            out.append(_attr(kind, bytes(entry[value_start:value_end]),
                             nested=kind != 3))  # CTA_TUPLE_ZONE is a plain be16
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Synthetic entries (tests and benchmarks: the kernel accepts them like dumped ones).

_ICMP_REPLY_TYPES = {1: {8: 0, 13: 14, 15: 16, 17: 18}, 58: {128: 129}}


def _tuple_value(src: bytes, dst: bytes, src_attr: int, proto: int,
                 ports: list[tuple[int, bytes]]) -> bytes:
    addresses = _attr(src_attr, src) + _attr(src_attr + 1, dst)
    layer4 = _attr(CTA_PROTO_NUM, bytes([proto])) + b"".join(
        _attr(kind, value) for kind, value in ports)
    return _attr(CTA_TUPLE_IP, addresses, nested=True) + _attr(CTA_TUPLE_PROTO, layer4,
                                                               nested=True)


def make_entry(src: str, dst: str, proto: str, sport: int = 0, dport: int = 0, *,
               mark: int = 0, timeout: int = 120, zone: int = 0,
               status: int = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED,
               tcp_state: str = "ESTABLISHED", wscale: int = 7,
               icmp_type: int = 8, icmp_id: int = 0) -> bytes:
    """An entry as a dump would show it, for a connection src -> dst that no packet created.

    `proto` is "tcp", "udp" or "icmp" (ICMPv6 for IPv6 addresses); for ICMP, `icmp_type` is
    the request type and `icmp_id` the identifier.
    """
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if source.version != destination.version:
        raise ConntrackFormatError(f"make_entry: {src} and {dst} differ in family")
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    src_attr = CTA_IP_V4_SRC if family == socket.AF_INET else CTA_IP_V6_SRC
    a, b = source.packed, destination.packed
    if proto == "icmp":
        number = 1 if family == socket.AF_INET else 58
        kinds = ((CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE) if number == 1
                 else (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE))
        reply_type = _ICMP_REPLY_TYPES[number].get(icmp_type)
        if reply_type is None:
            raise ConntrackFormatError(f"make_entry: ICMP type {icmp_type} has no reply")
        ident = _BE16.pack(icmp_id)
        orig = _tuple_value(a, b, src_attr, number, [
            (kinds[0], ident), (kinds[1], bytes([icmp_type])), (kinds[2], b"\0")])
        reply = _tuple_value(b, a, src_attr, number, [
            (kinds[0], ident), (kinds[1], bytes([reply_type])), (kinds[2], b"\0")])
    elif proto in ("tcp", "udp"):
        number = 6 if proto == "tcp" else 17
        orig = _tuple_value(a, b, src_attr, number, [
            (CTA_PROTO_SRC_PORT, _BE16.pack(sport)), (CTA_PROTO_DST_PORT, _BE16.pack(dport))])
        reply = _tuple_value(b, a, src_attr, number, [
            (CTA_PROTO_SRC_PORT, _BE16.pack(dport)), (CTA_PROTO_DST_PORT, _BE16.pack(sport))])
    else:
        raise ConntrackFormatError(f"make_entry: protocol {proto!r} is not tcp, udp or icmp")
    attrs = [_attr(CTA_TUPLE_ORIG, orig, nested=True), _attr(CTA_TUPLE_REPLY, reply, nested=True)]
    if zone:
        attrs.append(_attr(CTA_ZONE, _BE16.pack(zone)))
    attrs += [_status_attr(status), _mark_attr(mark), _attr(CTA_TIMEOUT, _BE32.pack(timeout))]
    if proto == "tcp":
        flags = bytes([TCP_FLAG_WINDOW_SCALE | TCP_FLAG_SACK_PERM, 0])  # zero mask, as dumped
        tcp = (_attr(CTA_PROTOINFO_TCP_STATE, bytes([TCP_STATES.index(tcp_state)]))
               + _attr(2, bytes([wscale])) + _attr(3, bytes([wscale]))  # WSCALE_ORIGINAL/REPLY
               + _attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags)
               + _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, flags))
        attrs.append(_attr(CTA_PROTOINFO, _attr(CTA_PROTOINFO_TCP, tcp, nested=True),
                           nested=True))
    return bytes([family, 0, 0, 0]) + b"".join(attrs)
