"""NFLOG (nfnetlink_log): packets that an nft `log group N` statement hands to userspace.

pyroute2 (0.9.7) has no NFLOG support beyond the subsystem number, so this module speaks the
protocol itself: a pure codec (`config_request`, `parse_messages`, `parse_packet`) tested
with bytes captured from the kernel, and `NflogSocket`, a small non-blocking receiver.

A log message is an nlmsghdr of type (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET), the 4-byte
nfgenmsg (family of the packet, version, group in network order), then NFULA_* attributes.
We use the prefix (which names the VM and the kind of event) and the payload (the packet from
its network header on, cut to the copy range); everything else is skipped.

Binding a group is per network namespace and exclusive: a second socket binding the same
group gets EBUSY. The kernel releases the group when the socket closes.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from nseh.agent.conntrack import _NetlinkSocketOwner

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
MSG_PACKET = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
MSG_CONFIG = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG

# include/uapi/linux/netfilter/nfnetlink_log.h
NFULA_PACKET_HDR = 1
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# Enough for an IPv6 header and the TCP/UDP ports (extension headers are not followed).
COPY_RANGE = 64
RECV_SIZE = 1 << 16
READS_PER_CALL = 256  # datagrams per read_pending, so a flood cannot starve the caller

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the group, network order)
_IPPROTO_TCP = 6
_IPPROTO_UDP = 17


class NflogError(RuntimeError):
    """An NFLOG operation failed or the kernel sent something malformed; one line."""


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    """One logged packet: its address family (AF_INET / AF_INET6), group, log prefix and the
    start of the packet (network header first)."""

    family: int
    group: int
    prefix: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """What the IPS needs of a packet: source, transport protocol and destination port (0 for
    protocols without ports or a packet cut too short to hold them)."""

    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    protocol: int
    port: int


# ---------------------------------------------------------------------------------------------
# Pure codec.


def _attr(kind: int, value: bytes) -> bytes:
    padding = b"\0" * (-len(value) % 4)
    return _NLATTR.pack(4 + len(value), kind) + value + padding


def config_request(group: int, seq: int, *, copy_range: int = COPY_RANGE) -> bytes:
    """The messages that bind `group` to the sending socket: copy `copy_range` bytes of each
    packet, and deliver every packet at once (queue threshold 1) instead of batching up to a
    second. Each message asks for an ACK, sequence numbers seq, seq+1, seq+2."""
    if not 0 <= group <= 0xFFFF:
        raise NflogError(f"NFLOG group {group} is not in 0..65535")
    head = _NFGENMSG.pack(socket.AF_UNSPEC, 0, group)
    bodies = [
        head + _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
        head + _attr(NFULA_CFG_MODE, struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0)),
        head + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
        + _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", 1)),  # 1/100 s
    ]
    return b"".join(_NLMSGHDR.pack(16 + len(body), MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK,
                                   seq + index, 0) + body
                    for index, body in enumerate(bodies))


def parse_messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a netlink datagram into (type, sequence, body) messages, checking lengths."""
    messages: list[tuple[int, int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 16:
            raise NflogError("truncated netlink header")
        length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < 16 or offset + length > len(data):
            raise NflogError(f"bad netlink message length {length}")
        messages.append((kind, seq, data[offset + 16:offset + length]))
        offset += (length + 3) & ~3
    return messages


def parse_packet(body: bytes) -> LoggedPacket:
    """A NFULNL_MSG_PACKET body (nfgenmsg + attributes) -> the packet's prefix and payload."""
    if len(body) < 4:
        raise NflogError("NFLOG message shorter than its nfgenmsg")
    family, _, group = _NFGENMSG.unpack_from(body)
    prefix = ""
    payload = b""
    offset = 4
    while offset + 4 <= len(body):
        length, kind = _NLATTR.unpack_from(body, offset)
        if length < 4 or offset + length > len(body):
            raise NflogError(f"NFLOG attribute {kind & NLA_TYPE_MASK}: bad length {length}")
        value = body[offset + 4:offset + length]
        kind &= NLA_TYPE_MASK
        if kind == NFULA_PREFIX:
            prefix = value.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == NFULA_PAYLOAD:
            payload = value
        offset += (length + 3) & ~3
    return LoggedPacket(family, group, prefix, payload)


def packet_header(family: int, payload: bytes) -> PacketHeader:
    """Source address, protocol and destination port of an IPv4 or IPv6 packet's start.
    IPv6 extension headers are not followed (the protocol is then the extension's, port 0)."""
    if family == socket.AF_INET:
        if len(payload) < 20 or payload[0] >> 4 != 4:
            raise NflogError("not an IPv4 header")
        header_length = (payload[0] & 0x0F) * 4
        protocol = payload[9]
        source: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
            payload[12:16])
        fragment_offset = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        transport = header_length if fragment_offset == 0 else -1
    elif family == socket.AF_INET6:
        if len(payload) < 40 or payload[0] >> 4 != 6:
            raise NflogError("not an IPv6 header")
        protocol = payload[6]
        source = ipaddress.IPv6Address(payload[8:24])
        transport = 40
    else:
        raise NflogError(f"address family {family} is neither IPv4 nor IPv6")
    port = 0
    if protocol in (_IPPROTO_TCP, _IPPROTO_UDP) and 0 <= transport <= len(payload) - 4:
        port = struct.unpack_from("!H", payload, transport + 2)[0]
    return PacketHeader(source, protocol, port)


# ---------------------------------------------------------------------------------------------
# I/O.


class NflogSocket(_NetlinkSocketOwner):
    """Receives the packets logged to one NFLOG group in the network namespace it was created
    in. Non-blocking: poll `fileno()`, then call `read_pending`."""

    def __init__(self, group: int, *, rcvbuf: int = 4 << 20) -> None:
        self.group = group
        self.overruns = 0  # times the socket buffer overflowed and packets were lost
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                       NETLINK_NETFILTER)
        except OSError as exc:
            raise NflogError(f"cannot open an NFLOG socket: {exc.strerror}") from None
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.settimeout(5)
            self._configure()
        except OSError as exc:
            self._sock.close()
            raise NflogError(f"cannot bind NFLOG group {group}: {exc.strerror}") from None
        except NflogError:
            self._sock.close()
            raise
        self._sock.setblocking(False)

    def _configure(self) -> None:
        request = config_request(self.group, 1)
        self._sock.send(request)
        pending = {1, 2, 3}
        while pending:
            for kind, seq, body in parse_messages(self._sock.recv(RECV_SIZE)):
                if kind == NLMSG_ERROR and seq in pending:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise NflogError(f"bind NFLOG group {self.group}: {os.strerror(code)}")
                    pending.discard(seq)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read_pending(self) -> list[LoggedPacket]:
        """The packets logged since the last call, oldest first (at most READS_PER_CALL
        datagrams' worth; the socket stays readable if more are queued). A buffer overflow
        loses packets: it is counted in `overruns`, and reading goes on."""
        packets: list[LoggedPacket] = []
        for _ in range(READS_PER_CALL):
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise NflogError(f"read NFLOG group {self.group}: {exc.strerror}") from None
            packets.extend(parse_packet(body) for kind, _, body in parse_messages(data)
                           if kind == MSG_PACKET)
        return packets
