"""The IPS engine: policy model, detector, NFLOG codec, rendering, records (pure), and real
packets through throwaway namespaces (root; not the lab).

Packet tests (namespaces `ipst-*`, removed in teardown, leftovers removed at setup)::

    ipst-vm  eth0 10.78.0.10 (VM stand-in: echo servers)    --- p-vm --+
    ipst-a   eth0 10.78.0.20 (attacker)                     --- p-a  --+-- br-vm in ipst-h1
    ipst-b   eth0 10.78.0.21 (legitimate client)            --- p-b  --+   (or in ipst-h2)

"Migrating" the VM moves the three host-side veth ends (p-vm, p-a, p-b) from host ipst-h1's
bridge to host ipst-h2's: traffic then goes through h2's firewall and IPS only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_firewall import EchoServer, connect, delete_namespaces, in_ns, netns, sh

from nseh.agent.engines import VMScope
from nseh.agent.firewall import Firewall, render_base, render_vm_policy, render_vm_removal
from nseh.agent.ips import (
    Block,
    IpsEngine,
    RecordError,
    RecordKey,
    decode_record,
    element_commands,
    encode_key,
    encode_record,
    parse_blocks,
    parse_duration_ms,
    parse_event,
    render_ips,
    render_ips_removal,
    render_ips_sets,
    scope_reason,
)
from nseh.agent.ipsdetect import Detector, Event, EventKind, SourceState
from nseh.agent.nflog import (
    MSG_PACKET,
    NflogError,
    config_request,
    packet_header,
    parse_messages,
    parse_packet,
)
from nseh.definition import DefinitionError, IpsPolicy, VMDefinition, load_definition

ip = ipaddress.ip_address
A, B = ip("192.0.2.1"), ip("192.0.2.2")
TCP, UDP = 6, 17

# ---------------------------------------------------------------------------------------------
# Policy model.

BASE = 'name = "web1"\n[network]\nipv4 = "10.0.0.10/24"\n'


def test_ips_policy_loads(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(BASE + """
[policy.ips]
portscan = { ports = 10, seconds = 30 }
bruteforce = { ports = [22, 2222], connections = 5, seconds = 60 }
max_connections_per_source = 50
block_seconds = 600
""")
    ips = load_definition(path).policy.ips
    assert ips is not None
    assert (ips.portscan.ports, ips.portscan.seconds) == (10, 30)  # type: ignore[union-attr]
    assert ips.bruteforce.ports == (22, 2222)  # type: ignore[union-attr]
    assert (ips.max_connections_per_source, ips.block_seconds) == (50, 600)
    # The policy travels as JSON and comes back the same.
    assert IpsPolicy.model_validate(json.loads(json.dumps(ips.model_dump(mode="json")))) == ips


def test_ips_is_optional_and_an_empty_table_is_a_blocklist_only(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(BASE)
    assert load_definition(path).policy.ips is None
    path.write_text(BASE + "[policy.ips]\n")
    assert load_definition(path).policy.ips == IpsPolicy(block_seconds=300)


@pytest.mark.parametrize(("ips", "expected"), [
    ("portscan = { ports = 0, seconds = 30 }", "policy.ips.portscan.ports: Input should be "
                                               "greater than or equal to 1"),
    ("portscan = { ports = true, seconds = 30 }", "policy.ips.portscan.ports: Input should be "
                                                  "a valid integer"),
    ('portscan = { ports = "10", seconds = 30 }', "policy.ips.portscan.ports"),
    ("portscan = { ports = 10 }", "policy.ips.portscan.seconds: Field required"),
    ("portscan = { ports = 10, seconds = 86401 }", "policy.ips.portscan.seconds"),
    ("portscan = { ports = 10, seconds = 30, window = 1 }", "policy.ips.portscan.window: Extra"),
    ("bruteforce = { ports = [], connections = 5, seconds = 60 }", "policy.ips.bruteforce.ports"),
    ("bruteforce = { ports = [22, 22], connections = 5, seconds = 60 }",
     "policy.ips.bruteforce.ports: ports must be distinct"),
    ("bruteforce = { ports = [70000], connections = 5, seconds = 60 }",
     "policy.ips.bruteforce.ports.0"),
    ("bruteforce = { ports = [22], seconds = 60 }", "policy.ips.bruteforce.connections"),
    ("max_connections_per_source = 0", "policy.ips.max_connections_per_source"),
    ("max_connections_per_source = 1.5", "policy.ips.max_connections_per_source"),
    ("block_seconds = 0", "policy.ips.block_seconds"),
    ("block_seconds = 604801", "policy.ips.block_seconds: Input should be less than or equal"),
    ("portscan = 3", "policy.ips.portscan: Input should be a valid dictionary"),
    ("colour = 1", "policy.ips.colour: Extra inputs are not permitted"),
])
def test_bad_ips_policies_give_one_line_errors(tmp_path: Path, ips: str, expected: str) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(BASE + "[policy.ips]\n" + ips + "\n")
    with pytest.raises(DefinitionError) as raised:
        load_definition(path)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).startswith(str(path))


# ---------------------------------------------------------------------------------------------
# Detector (pure).

POLICY = IpsPolicy.model_validate({
    "portscan": {"ports": 3, "seconds": 10},
    "bruteforce": {"ports": [22], "connections": 2, "seconds": 5},
    "block_seconds": 60,
})


def closed(source: Any, port: int, at: float, protocol: int = TCP) -> Event:
    return Event(EventKind.CLOSED, source, protocol, port, at)


def new(source: Any, port: int, at: float) -> Event:
    return Event(EventKind.NEW, source, TCP, port, at)


def test_portscan_blocks_on_more_than_n_distinct_closed_ports_within_t() -> None:
    detector = Detector(POLICY)
    assert detector.observe(closed(A, 1, 0.0)) is None
    assert detector.observe(closed(A, 1, 0.5)) is None  # the same port again: still one
    assert detector.observe(closed(A, 2, 1.0)) is None
    assert detector.observe(closed(A, 2, 1.0, UDP)) is None  # UDP 2 is another port
    assert detector.observe(closed(B, 9, 1.0)) is None  # another source counts apart
    detection = detector.observe(closed(A, 3, 2.0))
    assert detection is not None and detection.source == A and not detection.by_kernel
    assert "4 closed ports within 10 s" in detection.reason
    assert detector.sources() == [B]  # the blocked source's state is forgotten


def test_portscan_window_slides() -> None:
    detector = Detector(POLICY)
    for at, port in ((0.0, 1), (4.0, 2), (8.0, 3)):
        assert detector.observe(closed(A, port, at)) is None
    # Port 1 (t=0) left the window at t=10: ports 2, 3, 4 are three, not more than three.
    assert detector.observe(closed(A, 4, 10.5)) is None
    assert detector.observe(closed(A, 5, 11.0)) is not None


def test_portscan_ignores_portless_packets_and_disabled_detections() -> None:
    detector = Detector(POLICY)
    for at in range(10):
        assert detector.observe(Event(EventKind.CLOSED, A, 1, 0, float(at))) is None  # ICMP
    assert len(detector) == 0
    quiet = Detector(IpsPolicy())
    assert all(quiet.observe(closed(A, port, 0.0)) is None for port in range(1, 100))
    assert all(quiet.observe(new(A, 22, float(at))) is None for at in range(100))
    assert len(quiet) == 0


def test_bruteforce_counts_new_connections_to_protected_ports() -> None:
    detector = Detector(POLICY)
    assert detector.observe(new(A, 80, 0.0)) is None  # not protected
    assert detector.observe(new(A, 22, 0.0)) is None
    assert detector.observe(new(A, 22, 1.0)) is None
    assert detector.observe(new(A, 22, 6.5)) is None  # t=0 and t=1 left the 5 s window
    assert detector.observe(new(A, 22, 7.0)) is None
    detection = detector.observe(new(A, 22, 8.0))
    assert detection is not None and "3 new connections to port 22 within 5 s" in detection.reason


def test_connection_limit_events_are_the_kernels_blocks() -> None:
    detector = Detector(POLICY.model_copy(update={"max_connections_per_source": 7}))
    detector.observe(closed(A, 1, 0.0))
    detection = detector.observe(Event(EventKind.LIMIT, A, TCP, 80, 1.0))
    assert detection is not None and detection.by_kernel and "more than 7" in detection.reason
    assert len(detector) == 0


def test_memory_is_bounded_by_evicting_the_least_recently_seen_source() -> None:
    detector = Detector(POLICY, max_sources=2)
    detector.observe(closed(A, 1, 0.0))
    detector.observe(closed(B, 1, 1.0))
    detector.observe(closed(A, 2, 2.0))  # A is now the most recent
    detector.observe(closed(ip("192.0.2.3"), 1, 3.0))
    assert detector.sources() == [A, ip("192.0.2.3")]


def test_state_exports_as_ages_and_resumes_on_another_clock() -> None:
    source_host = Detector(POLICY)
    source_host.observe(closed(A, 1, 100.0))
    source_host.observe(closed(A, 2, 101.0))
    source_host.observe(new(A, 22, 101.5))
    exported = source_host.export(102.0)
    assert exported == [SourceState(A, ((TCP, 1, 2.0), (TCP, 2, 1.0)), (0.5,))]
    # Another host whose monotonic clock reads 5000: the scan goes on from where it was.
    destination = Detector(POLICY)
    destination.load(exported[0], 5000.0)
    assert destination.observe(closed(A, 3, 5001.0)) is None
    assert destination.observe(closed(A, 4, 5001.5)) is not None
    # And the ages keep counting: 9.5 s later port 1 (age 2 at import) is out of the window.
    destination.load(exported[0], 5000.0)
    destination.expire(5008.5)
    assert destination.export(5008.5) == [SourceState(A, ((TCP, 2, 9.5),), ())]


# ---------------------------------------------------------------------------------------------
# NFLOG codec, with messages captured from the kernel (6.18): nft `log group 9 prefix
# "nseh-ips web1 closed"`, a TCP SYN over IPv4 and a UDP datagram over IPv6 (snaplen 48).

CAPTURED_TCP4 = bytes.fromhex(
    "9000000000040000000000000000000002000009080001000800030019000a006e7365682d697073"
    "207765623120636c6f73656400000000080005000000000108000b000000000008000e0000000000"
    "400009004500003c16594000400626617f0000017f000001eccc15b3d75b1ea600000000a002ffd7"
    "fe3000000204ffd70402080a42b99f64000000000103030a")
CAPTURED_UDP6 = bytes.fromhex(
    "840000000004000000000000000000000a0000090800010086dd030019000a006e7365682d697073"
    "207765623120636c6f73656400000000080005000000000108000b000000000008000e0000000000"
    "34000900600d76f0006c114000000000000000000000000000000001000000000000000000000000"
    "000000019c7b15b4006c007f")


def test_captured_packets_decode() -> None:
    for data, family, protocol, port, source in (
            (CAPTURED_TCP4, socket.AF_INET, TCP, 5555, "127.0.0.1"),
            (CAPTURED_UDP6, socket.AF_INET6, UDP, 5556, "::1")):
        [(kind, _, body)] = parse_messages(data)
        assert kind == MSG_PACKET
        packet = parse_packet(body)
        assert (packet.family, packet.group, packet.prefix) == (family, 9, "nseh-ips web1 closed")
        assert packet_header(packet.family, packet.payload) == (
            packet_header(family, packet.payload))
        header = packet_header(packet.family, packet.payload)
        assert (header.source, header.protocol, header.port) == (ip(source), protocol, port)
        name, event = parse_event(packet, 7.0)  # type: ignore[misc]
        assert name == "web1" and event == Event(EventKind.CLOSED, ip(source), protocol, port, 7.0)


def test_malformed_nflog_data_is_refused() -> None:
    with pytest.raises(NflogError, match="truncated"):
        parse_messages(CAPTURED_TCP4[:10])
    with pytest.raises(NflogError, match="bad netlink message length"):
        parse_messages(CAPTURED_TCP4[:-1])
    [(_, _, body)] = parse_messages(CAPTURED_TCP4)
    broken = bytearray(body)
    broken[4:6] = (0xFF, 0x00)  # first attribute's length beyond the message
    with pytest.raises(NflogError, match="bad length"):
        parse_packet(bytes(broken))
    with pytest.raises(NflogError, match="not an IPv4 header"):
        packet_header(socket.AF_INET, b"\x60" + bytes(39))
    # A packet cut before its ports: the port is unknown (0), not garbage.
    assert packet_header(socket.AF_INET, parse_packet(body).payload[:22]).port == 0


def test_other_prefixes_are_not_ips_events() -> None:
    [(_, _, body)] = parse_messages(CAPTURED_TCP4)
    packet = parse_packet(body)
    for prefix in ("", "nseh-ips web1 open", "nseh-ips Web1 new", "other web1 new"):
        assert parse_event(type(packet)(packet.family, 9, prefix, packet.payload), 0.0) is None


def test_config_request_layout() -> None:
    data = config_request(0x1234, 7)
    messages = parse_messages(data)
    assert [seq for _, seq, _ in messages] == [7, 8, 9]
    assert all(kind == 0x401 for kind, _, _ in messages)  # NFNL_SUBSYS_ULOG, MSG_CONFIG
    assert all(body[:4] == b"\x00\x00\x12\x34" for _, _, body in messages)  # group, big-endian
    assert messages[0][2][4:] == b"\x05\x00\x01\x00\x01\x00\x00\x00"  # CFG_CMD BIND
    with pytest.raises(NflogError):
        config_request(70000, 1)


# ---------------------------------------------------------------------------------------------
# Rendering, listings and records (pure).

FULL = IpsPolicy.model_validate({
    "portscan": {"ports": 5, "seconds": 30},
    "bruteforce": {"ports": [8081], "connections": 3, "seconds": 30},
    # Connections being opened count too: a quick scan's SYNs must stay under this.
    "max_connections_per_source": 10,
    "block_seconds": 60,
})


def _rules(commands: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in commands
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def test_render_ips_rules() -> None:
    commands = render_ips("web1", FULL, group=99)
    head = _rules(commands, "vm_web1_in_head")
    assert [r[0]["match"]["right"] for r in head[:2]] == ["@vm_web1_block4", "@vm_web1_block6"]
    assert all(r[-2:] == [{"counter": "vm_web1_ips_drops"}, {"drop": None}] for r in head[:4])
    limit = head[2]
    assert limit[0]["set"]["stmt"] == [{"ct count": {"val": 10, "inv": True}}]
    assert limit[1]["set"]["elem"]["elem"]["timeout"] == 60
    assert limit[2]["log"] == {"prefix": "nseh-ips web1 limit", "group": 99, "snaplen": 64}
    assert head[4][1]["match"]["right"] == 8081 and head[4][-1]["log"]["group"] == 99
    [tail] = _rules(commands, "vm_web1_in_tail")
    assert tail[-1]["log"]["prefix"] == "nseh-ips web1 closed"
    # Chains are refilled, sets only added (their elements survive a reinstall).
    assert {"flush": {"chain": {"family": "inet", "table": "nseh", "name": "vm_web1_in_head"}}} \
        in commands
    assert not any("set" in c.get("flush", {}) for c in commands)
    # Without detections: only the blocklist rules.
    bare = render_ips("web1", IpsPolicy())
    assert len(_rules(bare, "vm_web1_in_head")) == 2 and _rules(bare, "vm_web1_in_tail") == []


def test_removal_touches_only_what_exists() -> None:
    assert render_ips_removal("web1", []) == []
    commands = render_ips_removal("web1", ["vm_web1_in_head", "vm_web1_block4", "vm_web2_block4",
                                           "vm_web1_ips_drops"])
    assert [next(iter(c)) + " " + next(iter(next(iter(c.values())))) for c in commands] == [
        "flush chain", "delete set", "delete counter"]


LISTING = """table inet nseh {
\tset vm_web1_block4 {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\telements = { 10.1.1.1 timeout 5m expires 1s80ms, 10.2.0.1 timeout 1d2h expires 1d1h59m59s872ms,
\t\t\t     10.2.0.2 timeout 1h expires 80ms }
\t}
}
table inet nseh {
\tset vm_web1_block6 {
\t\ttype ipv6_addr
\t\tflags dynamic,timeout
\t\telements = { 2001:db8::ffff:1 timeout 20s expires 19s992ms }
\t}
}
"""


def test_blocklist_listing_parses_with_milliseconds() -> None:
    assert parse_blocks(LISTING) == [
        Block(ip("10.1.1.1"), 300_000, 1_080),
        Block(ip("10.2.0.1"), 93_600_000, 93_599_872),
        Block(ip("10.2.0.2"), 3_600_000, 80),
        Block(ip("2001:db8::ffff:1"), 20_000, 19_992),
    ]
    assert parse_duration_ms("1m") == 60_000 and parse_duration_ms("2h3s") == 7_203_000
    for bad in ("", "5x", "1.5s"):
        with pytest.raises(Exception, match="nft duration"):
            parse_duration_ms(bad)


def test_element_commands_replace_and_delete_idempotently() -> None:
    text = element_commands("web1", [Block(ip("fd00::9"), 60_000, 1_234)], [ip("10.0.0.5")])
    assert text.splitlines() == [
        "add element inet nseh vm_web1_block4 { 10.0.0.5 }",
        "delete element inet nseh vm_web1_block4 { 10.0.0.5 }",
        "add element inet nseh vm_web1_block6 { fd00::9 }",
        "delete element inet nseh vm_web1_block6 { fd00::9 }",
        "add element inet nseh vm_web1_block6 { fd00::9 timeout 60000ms expires 1234ms }",
    ]


def test_records_round_trip() -> None:
    block = Block(ip("10.0.0.5"), 60_000, 1_234)
    state = SourceState(ip("fd00::7"), ((TCP, 22, 1.5), (UDP, 53, 0.25)), (0.5, 2.0))
    assert decode_record(encode_record("web1", block)) == (RecordKey("web1", "block", block.source),
                                                           block)
    assert decode_record(encode_record("web1", state)) == (RecordKey("web1", "track",
                                                                     state.source), state)
    key = RecordKey("web1", "track", ip("10.0.0.5"))
    assert decode_record(encode_key(key)) == (key, None)


@pytest.mark.parametrize(("record", "expected"), [
    (b"\xff", "not JSON"),
    (b"[]", "not a version 1"),
    (b'{"v": 2, "vm": "a", "kind": "block", "source": "10.0.0.1"}', "not a version 1"),
    (b'{"v": 1, "vm": "a", "kind": "rule", "source": "10.0.0.1"}', "unknown kind"),
    (b'{"v": 1, "vm": "a", "kind": "block", "source": "10.0.0.300"}', "not an address"),
    (b'{"v": 1, "vm": "a", "kind": "block", "source": "10.0.0.1", "timeout_ms": 0,'
     b' "expires_ms": 0}', "timeout_ms 0"),
    (b'{"v": 1, "vm": "a", "kind": "block", "source": "10.0.0.1", "timeout_ms": 604800001,'
     b' "expires_ms": 5}', "timeout_ms"),
    (b'{"v": 1, "vm": "a", "kind": "block", "source": "10.0.0.1", "timeout_ms": 1000,'
     b' "expires_ms": 2000}', "expires_ms 2000"),
    (b'{"v": 1, "vm": "a", "kind": "block", "source": "10.0.0.1", "timeout_ms": true,'
     b' "expires_ms": 1}', "timeout_ms True"),
    (b'{"v": 1, "vm": "a", "kind": "track", "source": "10.0.0.1", "closed": [[6, 0, 1]],'
     b' "connections": []}', "port 0"),
    (b'{"v": 1, "vm": "a", "kind": "track", "source": "10.0.0.1", "closed": [],'
     b' "connections": [-1]}', "age -1"),
    (b'{"v": 1, "vm": "a", "kind": "track", "source": "10.0.0.1", "closed": [],'
     b' "connections": [NaN]}', "age nan"),
    (b'{"v": 1, "vm": "a", "kind": "track", "source": "10.0.0.1", "closed": 5,'
     b' "connections": []}', "lists"),
])
def test_malformed_records_are_refused(record: bytes, expected: str) -> None:
    with pytest.raises(RecordError, match=expected):
        decode_record(record)


def test_scope_of_records() -> None:
    vm = VMScope(VMDefinition.from_json({"name": "web1", "network": {"ipv4": "10.0.0.10/24"},
                                         "policy": {"ips": FULL.model_dump(mode="json")}}), 1)
    block = Block(ip("10.0.0.5"), 1000, 1000)
    assert scope_reason(vm, FULL, RecordKey("web1", "block", block.source), block) is None
    assert "record of VM 'web2'" in str(scope_reason(
        vm, FULL, RecordKey("web2", "block", block.source), block))
    assert "own address" in str(scope_reason(
        vm, FULL, RecordKey("web1", "block", ip("10.0.0.10")), None))
    assert "address family" in str(scope_reason(
        vm, FULL, RecordKey("web1", "block", ip("fd00::5")), None))
    too_many = SourceState(ip("10.0.0.5"), tuple((TCP, p, 0.0) for p in range(1, 7)), ())
    assert "port-scan threshold" in str(scope_reason(
        vm, FULL, RecordKey("web1", "track", too_many.source), too_many))
    no_brute = SourceState(ip("10.0.0.5"), (), (1.0,))
    assert "brute-force threshold" in str(scope_reason(
        vm, IpsPolicy(), RecordKey("web1", "track", no_brute.source), no_brute))


# ---------------------------------------------------------------------------------------------
# Real packets.

H1, H2, VMNS, ATTACKER, LEGIT = "ipst-h1", "ipst-h2", "ipst-vm", "ipst-a", "ipst-b"
VM4, ATTACKER4, LEGIT4 = "10.78.0.10", "10.78.0.20", "10.78.0.21"
PORTS = {VMNS: ("p-vm", VM4), ATTACKER: ("p-a", ATTACKER4), LEGIT: ("p-b", LEGIT4)}
OPEN, BRUTE = 8080, 8081
CLOSED = list(range(8090, 8100))
MARK = 0x31
GROUP = 4711


def vm_definition(**ips: Any) -> VMDefinition:
    return VMDefinition.from_json({
        "name": "web1", "network": {"ipv4": f"{VM4}/24"},
        "policy": {"inbound": [{"proto": "tcp", "ports": [OPEN, BRUTE]}],
                   "ips": FULL.model_dump(mode="json") | ips}})


@pytest.fixture(scope="module")
def net() -> Iterator[None]:
    names = (H1, H2, VMNS, ATTACKER, LEGIT)
    delete_namespaces(*names)  # leftovers of a killed run
    try:
        for name in names:
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        for host in (H1, H2):
            sh("ip", "-n", host, "link", "add", "br-vm", "type", "bridge")
            sh("ip", "-n", host, "link", "set", "br-vm", "up")
        for peer, (port, address) in PORTS.items():
            sh("ip", "-n", H1, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", peer)
            sh("ip", "-n", H1, "link", "set", port, "master", "br-vm", "up")
            sh("ip", "-n", peer, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")
        yield
    finally:
        delete_namespaces(*names)


def attach(host: str) -> None:
    """Put the VM's, attacker's and client's host-side ports on `host`'s bridge."""
    for port, _ in PORTS.values():
        other = H2 if host == H1 else H1
        if in_ns(other, "ip", "link", "show", port, check=False).returncode == 0:
            sh("ip", "-n", other, "link", "set", port, "netns", host)
        sh("ip", "-n", host, "link", "set", port, "master", "br-vm", "up")


class Pump:
    """Feeds an engine its NFLOG events from a thread, like the agent's event loop would."""

    def __init__(self, engine: IpsEngine) -> None:
        self.engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.engine.fileno(), selectors.EVENT_READ)
            while not self._stop.is_set():
                if selector.select(0.05):
                    self.engine.poll()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Host:
    """A host namespace with nseh's firewall and a running IPS engine."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        with netns(namespace):
            self.firewall = Firewall()
            self.firewall.ensure_base()
            self.ips = IpsEngine(group=GROUP)
            self.ips.start()
        in_ns(namespace, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
        self.pump = Pump(self.ips)

    def install(self, definition: VMDefinition) -> VMScope:
        scope = VMScope(definition, MARK)
        self.firewall.install_vm(definition, MARK)
        self.ips.import_policy(scope, definition.policy.ips.model_dump(mode="json"))  # type: ignore[union-attr]
        return scope

    def close(self) -> None:
        self.pump.close()
        self.ips.stop()
        self.firewall.destroy()
        in_ns(self.namespace, "conntrack", "-F", check=False)

    def table(self) -> str:
        return in_ns(self.namespace, "nft", "list", "table", "inet", "nseh").stdout


@pytest.fixture
def hosts(net: None) -> Iterator[tuple[Host, Host]]:
    attach(H1)
    pair = Host(H1), Host(H2)
    try:
        yield pair
    finally:
        for host in pair:
            host.close()


@pytest.fixture
def server(net: None) -> Iterator[EchoServer]:
    echo = EchoServer(VMNS, [OPEN, BRUTE, *CLOSED])
    try:
        yield echo
    finally:
        echo.close()


def knock(namespace: str, ports: list[int]) -> None:
    """Send one SYN to each port (non-blocking connects, abandoned a moment later)."""
    with netns(namespace):
        sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in ports]
    for sock, port in zip(sockets, ports, strict=True):
        sock.setblocking(False)
        sock.connect_ex((VM4, port))
    time.sleep(0.3)
    for sock in sockets:
        sock.close()


def reaches(namespace: str, port: int = OPEN) -> bool:
    sock = connect(namespace, VM4, port)
    if sock is None:
        return False
    sock.close()
    return True


def blocked(host: Host, source: str, timeout: float = 3.0) -> Block | None:
    """The block of `source` on `host`, waiting up to `timeout` for it to appear."""
    deadline = time.monotonic() + timeout
    while True:
        found = [b for b in host.ips.blocks("web1") if b.source == ip(source)]
        if found or time.monotonic() > deadline:
            return found[0] if found else None
        time.sleep(0.05)


def test_nft_accepts_the_rendered_ips(tmp_path: Path, net: None) -> None:
    """nft checks the JSON (parse, evaluation, kernel dry run); the sets must exist first."""
    vm = vm_definition()
    in_ns(H2, "nft", "add table inet nseh ; " + render_ips_sets("web1").replace("\n", " ; "))
    commands = (render_base() + render_vm_policy(vm, MARK) + render_ips("web1", FULL)
                + render_ips_removal("web1", ["vm_web1_in_head", "vm_web1_in_tail",
                                              "vm_web1_block4", "vm_web1_block6",
                                              "vm_web1_conns4", "vm_web1_conns6",
                                              "vm_web1_ips_drops"])
                + render_vm_removal("web1", [ip(VM4)]))
    path = tmp_path / "ips.json"
    path.write_text(json.dumps({"nftables": commands}))
    result = in_ns(H2, "nft", "-c", "-j", "-f", str(path), check=False)
    in_ns(H2, "nft", "delete", "table", "inet", "nseh")
    assert result.returncode == 0, result.stderr


def test_portscan_blocks_the_scanner_only(hosts: tuple[Host, Host], server: EchoServer) -> None:
    h1, _ = hosts
    h1.install(vm_definition())
    assert reaches(ATTACKER) and reaches(LEGIT)
    knock(LEGIT, CLOSED[:5])  # five closed ports: not more than five
    knock(ATTACKER, CLOSED[:6])
    block = blocked(h1, ATTACKER4)
    assert block is not None and block.timeout_ms == 60_000
    assert blocked(h1, LEGIT4, timeout=0) is None
    assert not reaches(ATTACKER)  # even the open port
    assert reaches(LEGIT)
    assert "vm_web1_ips_drops" in h1.table()


def test_bruteforce_blocks_on_the_protected_port(hosts: tuple[Host, Host],
                                                 server: EchoServer) -> None:
    h1, _ = hosts
    h1.install(vm_definition())
    for _ in range(5):  # the open, unprotected port: any number of connections
        assert reaches(ATTACKER, OPEN)
    for _ in range(3):  # three new connections to the protected port: not more than three
        assert reaches(ATTACKER, BRUTE)
    assert blocked(h1, ATTACKER4, timeout=0.5) is None
    assert reaches(ATTACKER, BRUTE)
    assert blocked(h1, ATTACKER4) is not None
    assert not reaches(ATTACKER, OPEN)
    assert reaches(LEGIT, BRUTE)


def test_connection_limit_is_the_kernels(hosts: tuple[Host, Host], server: EchoServer) -> None:
    """Over the limit (3 open connections per source) the next connection is dropped and the
    source blocked at once, without waiting for userspace."""
    h1, _ = hosts
    h1.pump.close()  # no userspace at all
    h1.install(vm_definition(max_connections_per_source=3))
    held = [connect(ATTACKER, VM4, OPEN) for _ in range(3)]
    try:
        assert all(held)
        assert blocked(h1, ATTACKER4, timeout=0) is None
        assert not reaches(ATTACKER)
        block = blocked(h1, ATTACKER4, timeout=0)
        assert block is not None and block.timeout_ms == 60_000
        assert reaches(LEGIT)
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


def test_blocks_expire_and_operators_manage_them(hosts: tuple[Host, Host],
                                                 server: EchoServer) -> None:
    h1, _ = hosts
    h1.install(vm_definition())
    h1.ips.block("web1", ip(ATTACKER4), 2)
    h1.ips.block("web1", ip(LEGIT4))
    [mine] = [b for b in h1.ips.blocks("web1") if b.source == ip(ATTACKER4)]
    assert mine.timeout_ms == 2000 and 1500 < mine.expires_ms <= 2000
    assert not reaches(ATTACKER) and not reaches(LEGIT)
    assert h1.ips.unblock("web1", ip(LEGIT4)) and not h1.ips.unblock("web1", ip(LEGIT4))
    assert reaches(LEGIT)
    time.sleep(2.2)
    assert h1.ips.blocks("web1") == []
    assert reaches(ATTACKER)
    with pytest.raises(Exception, match="own address"):
        h1.ips.block("web1", ip(VM4))


def test_an_unblock_forgets_the_sources_detection_in_progress(hosts: tuple[Host, Host],
                                                              server: EchoServer) -> None:
    h1, _ = hosts
    scope = h1.install(vm_definition())
    knock(ATTACKER, CLOSED[:5])  # one closed port short of a scan
    deadline = time.monotonic() + 3
    while h1.ips.count(scope) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h1.ips.count(scope) == 1
    tracker = h1.ips.track(scope)
    try:
        assert not h1.ips.unblock("web1", ip(ATTACKER4))  # there was no block
        assert h1.ips.count(scope) == 0
        # A migration in progress deletes the detection on the destination too.
        assert [decode_record(r)[0] for r in tracker.collect().deletes] == [
            RecordKey("web1", "track", ip(ATTACKER4))]
    finally:
        tracker.close()
    knock(ATTACKER, CLOSED[5:6])  # the sixth closed port starts from zero: no scan
    assert blocked(h1, ATTACKER4, timeout=1) is None
    assert reaches(ATTACKER)


def test_blocks_move_to_another_host_with_their_remaining_time(
        hosts: tuple[Host, Host], server: EchoServer) -> None:
    h1, h2 = hosts
    scope = h1.install(vm_definition())
    knock(ATTACKER, CLOSED[:6])
    assert blocked(h1, ATTACKER4) is not None
    time.sleep(1.5)  # let the block age: the destination must not restart it
    records = h1.ips.snapshot(scope)
    destination = h2.install(vm_definition())
    result = h2.ips.apply(destination, records, [])
    assert (result.applied, result.rejected) == (len(records), 0)
    [there] = [b for b in h2.ips.blocks("web1") if b.source == ip(ATTACKER4)]
    [here] = [b for b in h1.ips.blocks("web1") if b.source == ip(ATTACKER4)]
    assert there.timeout_ms == here.timeout_ms == 60_000
    assert abs(there.expires_ms - here.expires_ms) < 1000
    assert there.expires_ms < 59_000
    attach(H2)  # the VM now runs behind h2
    assert not reaches(ATTACKER)
    assert reaches(LEGIT)


def test_a_half_done_scan_finishes_on_the_destination(hosts: tuple[Host, Host],
                                                      server: EchoServer) -> None:
    h1, h2 = hosts
    scope = h1.install(vm_definition())
    tracker = h1.ips.track(scope)
    try:
        knock(ATTACKER, CLOSED[:3])
        time.sleep(0.2)
        delta = tracker.collect()
    finally:
        tracker.close()
    [(key, state)] = [decode_record(r) for r in delta.upserts]
    assert key == RecordKey("web1", "track", ip(ATTACKER4))
    assert isinstance(state, SourceState) and len(state.closed) == 3
    destination = h2.install(vm_definition())
    assert h2.ips.count(destination) == 0
    assert h2.ips.apply(destination, delta.upserts, []).applied == 1
    attach(H2)
    # Three more closed ports: only with the imported three are they more than five.
    knock(ATTACKER, CLOSED[3:6])
    assert blocked(h2, ATTACKER4) is not None
    assert not reaches(ATTACKER)
    assert reaches(LEGIT)


def test_changes_are_tracked(hosts: tuple[Host, Host], server: EchoServer) -> None:
    h1, _ = hosts
    scope = h1.install(vm_definition())
    tracker = h1.ips.track(scope)
    try:
        assert len(tracker.collect()) == 0
        knock(ATTACKER, CLOSED[:6])  # a scan: the source's detection, then its block
        assert blocked(h1, ATTACKER4) is not None
        assert os.read(tracker.fileno(), 8)  # the tracker's eventfd turned readable
        delta = tracker.collect()
        upserts = [decode_record(r)[0] for r in delta.upserts]
        deletes = [decode_record(r)[0] for r in delta.deletes]
        assert upserts == [RecordKey("web1", "block", ip(ATTACKER4))]
        assert deletes == [RecordKey("web1", "track", ip(ATTACKER4))]
        assert len(tracker.collect()) == 0  # nothing new
        h1.ips.unblock("web1", ip(ATTACKER4))
        # The block's delete (and its detection's, which an unblock forgets too).
        kinds = sorted(decode_record(r)[0].kind for r in tracker.collect().deletes)
        assert kinds == ["block", "track"]
    finally:
        tracker.close()


def test_destination_rejects_foreign_records(hosts: tuple[Host, Host]) -> None:
    _, h2 = hosts
    scope = h2.install(vm_definition())
    foreign = [encode_record("web2", Block(ip("10.78.0.99"), 1000, 1000)),
               encode_record("web1", Block(ip(VM4), 1000, 1000)),
               b"not json"]
    result = h2.ips.apply(scope, foreign, [])
    assert (result.applied, result.rejected) == (0, 3)
    assert "record of VM 'web2'" in result.reasons[0]
    assert h2.ips.blocks("web1") == []


def test_purge_removes_everything(hosts: tuple[Host, Host], server: EchoServer) -> None:
    h1, _ = hosts
    scope = h1.install(vm_definition())
    knock(ATTACKER, CLOSED[:6])
    assert blocked(h1, ATTACKER4) is not None
    h1.ips.purge(scope)
    assert not any(name in h1.table() for name in ("block4", "conns4", "ips_drops", "nseh-ips"))
    assert h1.ips.count(scope) == 0
    assert reaches(ATTACKER) and reaches(LEGIT)  # the firewall policy alone remains
    h1.firewall.remove_vm("web1")
    assert "vm_web1" not in h1.table()
    h1.ips.purge(scope)  # nothing left: no error


def test_a_vm_without_ips_has_nothing_to_move(hosts: tuple[Host, Host]) -> None:
    _, h2 = hosts
    plain = VMDefinition.from_json({"name": "web1", "network": {"ipv4": f"{VM4}/24"}})
    scope = VMScope(plain, MARK)
    h2.firewall.install_vm(plain, MARK)
    assert h2.ips.export_policy(scope) is None
    h2.ips.import_policy(scope, None)
    tracker = h2.ips.track(scope)
    try:
        assert len(tracker.collect()) == 0
    finally:
        tracker.close()
    assert h2.ips.snapshot(scope) == [] and h2.ips.count(scope) == 0
    assert h2.ips.apply(scope, [], [], replace=True).reasons == []
    rejected = h2.ips.apply(scope, [encode_record("web1", Block(ip(ATTACKER4), 9, 9))], [])
    assert rejected.rejected == 1 and "has no IPS" in rejected.reasons[0]
    with pytest.raises(Exception, match="no IPS"):
        h2.ips.block("web1", ip(ATTACKER4))


def test_agent_api_lists_blocks_and_unblocks(hosts: tuple[Host, Host], server: EchoServer,
                                             tmp_path: Path) -> None:
    """The agent's ips.* handlers, on an agent object in h1 (no agent process, no QEMU)."""
    import asyncio

    from nseh.agent.config import AgentConfig
    from nseh.agent.host import HostAgent
    from nseh.agent.vms import VM, VMState
    from nseh.api.server import ApiError

    with netns(H1):
        agent = HostAgent(AgentConfig(host="h1", state_dir=tmp_path, accel="tcg",
                                      api_socket=tmp_path / "agent.sock",
                                      management_address="10.99.0.1"))
    definition = vm_definition()
    scope = VMScope(definition, MARK)
    agent.firewall.install_vm(definition, MARK)
    agent.ips.import_policy(scope, agent.ips.export_policy(scope))
    agent.vms["web1"] = VM(definition, MARK, VMState.RUNNING, tmp_path / "web1", "tcg")

    def call(handler: Any, **params: Any) -> Any:
        return asyncio.run(handler(params, lambda event: None))

    assert call(agent.ips_block, name="web1", source=ATTACKER4, seconds=30) == {
        "name": "web1", "source": ATTACKER4, "timeout_s": 30.0}
    assert not reaches(ATTACKER) and reaches(LEGIT)
    [listed] = call(agent.ips_list, name="web1")["blocks"]
    assert listed["source"] == ATTACKER4 and 27 < listed["expires_s"] <= 30  # a drop took 1 s
    assert call(agent.ips_unblock, name="web1", source=ATTACKER4)["unblocked"]
    assert reaches(ATTACKER)
    for params, code in (({"name": "web1", "source": "nope"}, "bad-request"),
                         ({"name": "web1", "source": ATTACKER4, "seconds": 0}, "bad-request"),
                         ({"name": "web1", "source": VM4}, "ips"),
                         ({"name": "web9", "source": ATTACKER4}, "not-found")):
        with pytest.raises(ApiError) as raised:
            call(agent.ips_block, **params)
        assert raised.value.code == code
