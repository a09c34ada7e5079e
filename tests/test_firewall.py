"""The per-VM firewall: renderer unit tests, and real packets through real namespaces.

Lab topology of the packet tests (all namespaces are removed in teardown)::

    nsehtest-fv (VM stand-in)          nsehtest-fh (host)               nsehtest-fc (client)
    eth0 10.77.0.10 fd77::10  ---- fh-vm [br-vm] fh-cl ----  eth0 10.77.0.20 fd77::20
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import selectors
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nseh.agent.firewall import (
    Firewall,
    FirewallError,
    render_base,
    render_vm_policy,
    render_vm_removal,
)
from nseh.definition import VMDefinition

HOST, VM, CLIENT = "nsehtest-fh", "nsehtest-fv", "nsehtest-fc"
VM4, VM6 = "10.77.0.10", "fd77::10"
CLIENT4, CLIENT6 = "10.77.0.20", "fd77::20"
MARK = 0x2A
DROP_TIMEOUT = 1.0  # seconds a connect may take before it counts as dropped

# ---------------------------------------------------------------------------------------------
# Helpers: namespaces, listeners, clients.

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the block (this thread only) inside a named network namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            # Guard: nothing in these tests may touch the root namespace's firewall.
            assert os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(target).st_ino
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def in_ns(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", name, *args, check=check)


def delete_namespaces(*names: str) -> None:
    for name in names:
        if Path(f"/run/netns/{name}").exists():
            sh("ip", "netns", "delete", name, check=False)


class InNetns:
    """Calls the wrapped object's methods inside a network namespace."""

    def __init__(self, target: Any, namespace: str) -> None:
        self._target = target
        self._namespace = namespace

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        method = getattr(self._target, attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            with netns(self._namespace):
                return method(*args, **kwargs)

        return call


class EchoServer:
    """TCP echo listeners (IPv4 and IPv6) on some ports inside a namespace, served by one thread."""

    def __init__(self, namespace: str, ports: list[int]) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        with netns(namespace):
            for port in ports:
                listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("::", port))
                listener.listen(16)
                self._selector.register(listener, selectors.EVENT_READ, "listener")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock is self._wake_read:
                    return
                if key.data == "listener":
                    conn, _ = sock.accept()
                    self._selector.register(conn, selectors.EVENT_READ, "conn")
                    continue
                try:
                    data = sock.recv(4096)
                    if data:
                        sock.sendall(data)
                        continue
                except OSError:
                    pass
                self._selector.unregister(sock)
                sock.close()

    def close(self) -> None:
        self._wake_write.send(b"x")
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_write.close()


def connect(namespace: str, address: str, port: int) -> socket.socket | None:
    """A connected TCP socket from inside `namespace`, or None if the SYN went unanswered."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns(namespace):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(DROP_TIMEOUT)
    try:
        sock.connect((address, port))
    except TimeoutError:
        sock.close()
        return None
    return sock


def echoes(sock: socket.socket, payload: bytes) -> bool:
    """Whether `payload` comes back over an established connection within the timeout."""
    sock.sendall(payload)
    try:
        return sock.recv(len(payload)) == payload
    except TimeoutError:
        return False


def pings(namespace: str, address: str) -> bool:
    return in_ns(namespace, "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0


def conntrack_list(mark: int | None = None) -> str:
    """The host's conntrack table (only entries with `mark`, if given)."""
    args = ["conntrack", "-L"] + (["-m", str(mark)] if mark is not None else [])
    return in_ns(HOST, *args).stdout


def definition(floating: str | None = None, name: str = "web1", floating6: str | None = None,
               **policy: Any) -> VMDefinition:
    network = {"ipv4": f"{VM4}/24", "ipv6": f"{VM6}/64"}
    if floating:
        network["floating_ipv4"] = floating
    if floating6:
        network["floating_ipv6"] = floating6
    return VMDefinition.from_json({"name": name, "network": network, "policy": policy})


# The policy the packet tests run: TCP 8080 from anywhere, TCP 8081 only from a network the
# client is not in, ping over IPv4 only (peers are IPv4), outbound TCP 9090 only.
LAB_POLICY: dict[str, Any] = {
    "inbound": [
        {"proto": "tcp", "ports": [8080]},
        {"proto": "tcp", "ports": [8081], "peers": ["10.99.0.0/16", "fd99::/64"]},
        {"proto": "icmp", "peers": ["10.77.0.0/24"]},
    ],
    "outbound": [{"proto": "tcp", "ports": [9090]}],
}

# ---------------------------------------------------------------------------------------------
# Renderer unit tests (pure).


def _rules(commands: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [c["add"]["rule"]["expr"] for c in commands
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def _elements(commands: list[dict[str, Any]]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for c in commands:
        if "element" in c.get("add", {}):
            found.setdefault(c["add"]["element"]["name"], []).extend(c["add"]["element"]["elem"])
    return found


def test_base_chain_order() -> None:
    commands = render_base()
    chain = next(c["add"]["chain"] for c in commands if "chain" in c.get("add", {}))
    assert (chain["hook"], chain["policy"], chain["prio"]) == ("forward", "drop", 0)
    rules = _rules(commands, "forward")
    assert rules[0][0]["match"]["left"] == {"payload": {"protocol": "icmpv6", "field": "type"}}
    assert rules[1] == [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                   "right": ["established", "related"]}}, {"accept": None}]
    assert rules[2][1:] == [{"counter": "invalid_drops"}, {"drop": None}]
    assert [r[0]["vmap"]["data"] for r in rules[3:7]] == ["@out4", "@out6", "@in4", "@in6"]
    assert [r[0]["match"]["right"] for r in rules[7:]] == ["@out4", "@out6"]


def test_vm_policy_rules_and_dispatch() -> None:
    vm = definition(
        inbound=[
            {"proto": "tcp", "ports": [80, 7, 80]},
            {"proto": "udp", "ports": [53]},
            {"proto": "icmp"},
            {"proto": "tcp", "ports": [22], "peers": ["10.1.0.0/16", "10.1.2.0/24", "fd00::/64"]},
            {"proto": "any", "peers": ["fd01::5"]},
            {"proto": "udp", "peers": ["0.0.0.0/0"]},
        ],
        outbound=[{"proto": "any"}, {"proto": "icmp", "peers": ["10.2.0.0/24"]}],
    )
    commands = render_vm_policy(vm, 0x1234)
    mark = [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": 0x1234}}]
    tcp = {"payload": {"protocol": "tcp", "field": "dport"}}
    accept = {"accept": None}
    assert _rules(commands, "vm_web1_in") == [
        mark,
        [{"jump": {"target": "vm_web1_in_head"}}],  # other engines' hook chains
        [{"match": {"op": "==", "left": tcp, "right": {"set": [7, 80]}}}, accept],
        [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                    "right": 53}}, accept],
        [{"match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "type"}},
                    "right": "echo-request"}}, accept],
        [{"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
                    "right": "echo-request"}}, accept],
        # Overlapping peers are collapsed; each family becomes its own rule.
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                    "right": {"prefix": {"addr": "10.1.0.0", "len": 16}}}},
         {"match": {"op": "==", "left": tcp, "right": 22}}, accept],
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                    "right": {"prefix": {"addr": "fd00::", "len": 64}}}},
         {"match": {"op": "==", "left": tcp, "right": 22}}, accept],
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                    "right": "fd01::5"}}, accept],
        # A /0 peer restricts the family only.
        [{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
         {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}, accept],
        [{"jump": {"target": "vm_web1_in_tail"}}],
        [{"counter": "vm_web1_in_drops"}, {"drop": None}],
    ]
    # Outbound: peers are destinations, allowed traffic returns to the base chain.
    assert _rules(commands, "vm_web1_out") == [
        mark,
        [{"return": None}],
        [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                    "right": {"prefix": {"addr": "10.2.0.0", "len": 24}}}},
         {"match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "type"}},
                    "right": "echo-request"}}, {"return": None}],
        [{"counter": "vm_web1_out_drops"}, {"drop": None}],
    ]
    assert _elements(commands) == {
        "out4": [[VM4, {"jump": {"target": "vm_web1_out"}}]],
        "in4": [[VM4, {"goto": {"target": "vm_web1_in"}}]],
        "out6": [[VM6, {"jump": {"target": "vm_web1_out"}}]],
        "in6": [[VM6, {"goto": {"target": "vm_web1_in"}}]],
    }


def test_vm_policy_renders_only_the_vms_families() -> None:
    vm = VMDefinition.from_json({"name": "v4only", "network": {"ipv4": "10.0.0.5/24"}})
    commands = render_vm_policy(vm, 1)
    assert set(_elements(commands)) == {"out4", "in4"}
    # No rules: only the mark, the hook jumps and the counted drop.
    assert len(_rules(commands, "vm_v4only_in")) == 4


@pytest.mark.parametrize("mark", [0, -1, 2**32])
def test_mark_out_of_range(mark: int) -> None:
    with pytest.raises(FirewallError, match="ct mark"):
        render_vm_policy(definition(), mark)


@pytest.mark.parametrize(("version", "protocol", "floating", "address", "network"), [
    (4, "ip", "203.0.113.10", VM4, "10.77.0.0"),
    (6, "ip6", "2001:db8:203::10", VM6, "fd77::"),
])
def test_floating_address_renders_a_1_to_1_nat(version: int, protocol: str, floating: str,
                                               address: str, network: str) -> None:
    vm = definition(**{"floating" if version == 4 else "floating6": floating})
    commands = render_vm_policy(vm, 1)
    dnat, snat = f"vm_web1_dnat{version}", f"vm_web1_snat{version}"
    assert _rules(commands, dnat) == [[{"dnat": {"family": protocol, "addr": address}}]]
    assert _rules(commands, snat) == [[
        {"match": {"op": "!=", "left": {"payload": {"protocol": protocol, "field": "daddr"}},
                   "right": {"prefix": {"addr": network, "len": 24 if version == 4 else 64}}}},
        {"snat": {"family": protocol, "addr": floating}}]]
    elements = _elements(commands)
    assert elements[f"dnat{version}"] == [[floating, {"goto": {"target": dnat}}]]
    assert elements[f"snat{version}"] == [[address, {"goto": {"target": snat}}]]
    other = 6 if version == 4 else 4  # only the family that has a floating address
    assert f"dnat{other}" not in elements and f"snat{other}" not in elements
    assert not any(name.endswith("nat4") or name.endswith("nat6")
                   for name in _elements(render_vm_policy(definition(), 1)))


def test_nat_base_chains_dispatch_both_families() -> None:
    commands = render_base()
    for chain, field, kind in (("nat_in", "daddr", "dnat"), ("nat_out", "saddr", "snat")):
        assert _rules(commands, chain) == [
            [{"vmap": {"key": {"payload": {"protocol": protocol, "field": field}},
                       "data": f"@{kind}{version}"}}]
            for version, protocol in ((4, "ip"), (6, "ip6"))]


def test_removal_commands() -> None:
    commands = render_vm_removal("web1", [ipaddress.ip_address(VM4)])
    deleted = [(kind, body["name"]) for c in commands if "delete" in c
               for kind, body in c["delete"].items()]
    assert ("element", "out4") in deleted and ("element", "in4") in deleted
    assert ("chain", "vm_web1_in") in deleted and ("counter", "vm_web1_out_drops") in deleted
    assert not any(name in ("out6", "in6") for _, name in deleted)


@pytest.fixture
def scratch_ns() -> Iterator[str]:
    name = "nsehtest-fchk"
    delete_namespaces(name)
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        delete_namespaces(name)


def test_nft_accepts_rendered_json(scratch_ns: str, tmp_path: Path) -> None:
    """nft itself checks the JSON (parse, evaluation and a kernel dry run, no commit)."""
    vm = definition(**LAB_POLICY)
    batches = {
        "install": render_base() + render_vm_policy(vm, MARK),
        "install-remove": render_base() + render_vm_policy(vm, MARK) + render_vm_removal(
            "web1", [ipaddress.ip_address(VM4), ipaddress.ip_address(VM6)]),
        "floating-install-remove": render_base() + render_vm_policy(
            definition(floating="203.0.113.10", floating6="2001:db8:203::10", **LAB_POLICY),
            MARK) + render_vm_removal(
            "web1", [ipaddress.ip_address(VM4), ipaddress.ip_address(VM6)],
            {"dnat4": {ipaddress.ip_address("203.0.113.10")},
             "snat4": {ipaddress.ip_address(VM4)},
             "dnat6": {ipaddress.ip_address("2001:db8:203::10")},
             "snat6": {ipaddress.ip_address(VM6)}}),
    }
    for label, commands in batches.items():
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"nftables": commands}))
        result = in_ns(scratch_ns, "nft", "-c", "-j", "-f", str(path), check=False)
        assert result.returncode == 0, f"{label}: {result.stderr}"


# ---------------------------------------------------------------------------------------------
# Real packets.


@pytest.fixture(scope="module")
def lab() -> Iterator[None]:
    delete_namespaces(HOST, VM, CLIENT)  # leftovers of a killed run
    try:
        for name in (HOST, VM, CLIENT):
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", HOST, "link", "add", "br-vm", "type", "bridge")
        sh("ip", "-n", HOST, "link", "set", "br-vm", "up")
        for port, peer_ns, addr4, addr6 in (("fh-vm", VM, VM4, VM6),
                                            ("fh-cl", CLIENT, CLIENT4, CLIENT6)):
            sh("ip", "-n", HOST, "link", "add", port, "type", "veth",
               "peer", "name", "eth0", "netns", peer_ns)
            sh("ip", "-n", HOST, "link", "set", port, "master", "br-vm", "up")
            sh("ip", "-n", peer_ns, "addr", "add", f"{addr4}/24", "dev", "eth0")
            sh("ip", "-n", peer_ns, "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", peer_ns, "link", "set", "eth0", "up")
        yield
    finally:
        delete_namespaces(HOST, VM, CLIENT)


@pytest.fixture
def firewall(lab: None) -> Iterator[Any]:
    """A fresh host firewall in nsehtest-fh, strict conntrack, an empty conntrack table."""
    with netns(HOST):
        fw = Firewall()
    host_fw = InNetns(fw, HOST)
    try:
        host_fw.ensure_base()
        # After ensure_base: its ct rules make conntrack active in the namespace.
        in_ns(HOST, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
        yield host_fw
    finally:
        host_fw.destroy()
        in_ns(HOST, "conntrack", "-F", check=False)
        del host_fw, fw  # the nft context holds a socket in the namespace


@pytest.fixture
def vm_server(lab: None) -> Iterator[EchoServer]:
    server = EchoServer(VM, [8080, 8081, 8082])
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def client_server(lab: None) -> Iterator[EchoServer]:
    server = EchoServer(CLIENT, [9090, 9091])
    try:
        yield server
    finally:
        server.close()


@contextmanager
def connected(namespace: str, address: str, port: int) -> Iterator[socket.socket]:
    sock = connect(namespace, address, port)
    assert sock is not None, f"connect from {namespace} to [{address}]:{port} was dropped"
    try:
        yield sock
    finally:
        sock.close()


def assert_dropped(namespace: str, address: str, port: int) -> None:
    sock = connect(namespace, address, port)
    if sock is not None:
        sock.close()
        pytest.fail(f"connect from {namespace} to [{address}]:{port} was accepted")


def test_ensure_base_sets_bridge_sysctls_and_is_idempotent(firewall: Any) -> None:
    for sysctl in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        assert in_ns(HOST, "cat", f"/proc/sys/net/bridge/{sysctl}").stdout.strip() == "1"
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    before = in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout
    firewall.ensure_base()
    assert in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout == before


def test_nothing_passes_without_a_policy(firewall: Any, vm_server: EchoServer) -> None:
    assert_dropped(CLIENT, VM4, 8080)
    assert not pings(CLIENT, VM4)


def test_inbound_policy(firewall: Any, vm_server: EchoServer) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    for address in (VM4, VM6):
        with connected(CLIENT, address, 8080) as sock:
            assert echoes(sock, b"hello")
    drops = firewall.counters()["vm_web1_in_drops"]
    assert_dropped(CLIENT, VM4, 8082)  # listening, but not in the policy
    assert_dropped(CLIENT, VM6, 8081)  # in the policy, but not from the client's network
    counted = firewall.counters()["vm_web1_in_drops"] - drops
    assert counted >= 2  # at least one SYN each (retransmissions are dropped too)
    assert pings(CLIENT, VM4)
    assert not pings(CLIENT, VM6)  # the ICMP rule's peers are IPv4 only


def test_outbound_policy(firewall: Any, client_server: EchoServer) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    for address in (CLIENT4, CLIENT6):
        with connected(VM, address, 9090) as sock:
            assert echoes(sock, b"out")
    drops = firewall.counters()["vm_web1_out_drops"]
    assert_dropped(VM, CLIENT4, 9091)
    assert firewall.counters()["vm_web1_out_drops"] > drops
    assert not pings(VM, CLIENT4)  # the VM's own pings are outbound: not allowed


def test_conntrack_entries_carry_the_vm_mark(firewall: Any, vm_server: EchoServer) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    with connected(CLIENT, VM4, 8080) as sock:
        assert echoes(sock, b"x")
        entries = conntrack_list(MARK)
        assert f"src={CLIENT4} dst={VM4}" in entries and "dport=8080" in entries
        assert f"mark={MARK}" in entries


def test_strict_conntrack_drops_a_forgotten_connection(
        firewall: Any, vm_server: EchoServer) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    with connected(CLIENT, VM4, 8080) as sock:
        assert echoes(sock, b"one")
        assert echoes(sock, b"two")  # established traffic keeps flowing
        invalid = firewall.counters()["invalid_drops"]
        in_ns(HOST, "conntrack", "-F")
        assert not echoes(sock, b"three")
        assert firewall.counters()["invalid_drops"] > invalid


def test_flush_conntrack_by_mark(firewall: Any, vm_server: EchoServer) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    with connected(CLIENT, VM4, 8080) as old:
        # Replacing the policy with another mark: new connections get the new mark.
        firewall.install_vm(definition(**LAB_POLICY), MARK + 1)
        with connected(CLIENT, VM6, 8080) as new:
            assert echoes(old, b"a") and echoes(new, b"b")
            firewall.flush_conntrack(MARK)
            assert conntrack_list(MARK) == ""
            assert f"src={CLIENT6}" in conntrack_list(MARK + 1)
            assert echoes(new, b"c")
            invalid = firewall.counters()["invalid_drops"]
            assert not echoes(old, b"d")
            assert firewall.counters()["invalid_drops"] > invalid


def test_remove_vm_drops_everything_again(firewall: Any, vm_server: EchoServer) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    assert firewall.installed_vms() == {"web1": MARK}
    with connected(CLIENT, VM4, 8080) as sock:
        assert echoes(sock, b"x")
    firewall.remove_vm("web1")
    assert firewall.installed_vms() == {}
    assert not any(name.startswith("vm_") for name in firewall.counters())
    assert_dropped(CLIENT, VM4, 8080)
    assert not pings(CLIENT, VM4)
    firewall.remove_vm("web1")  # absent: no error


def nat_listing() -> str:
    """The NAT maps and the VMs' NAT chains as the kernel holds them."""
    listing = in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout
    return "\n".join(line.strip() for line in listing.splitlines()
                     if "_dnat" in line or "_snat" in line or "elements" in line)


def test_floating_address_nat_is_installed_replaced_and_removed(firewall: Any) -> None:
    firewall.install_vm(definition(floating="203.0.113.10", floating6="2001:db8:203::10",
                                   **LAB_POLICY), MARK)
    listing = nat_listing()
    assert "203.0.113.10 : goto vm_web1_dnat4" in listing
    assert f"{VM4} : goto vm_web1_snat4" in listing
    assert "2001:db8:203::10 : goto vm_web1_dnat6" in listing
    assert f"{VM6} : goto vm_web1_snat6" in listing
    firewall.install_vm(definition(floating="203.0.113.11", **LAB_POLICY), MARK)
    listing = nat_listing()
    assert "203.0.113.11 : goto vm_web1_dnat4" in listing and "203.0.113.10" not in listing
    assert "vm_web1_dnat6" not in listing and "2001:db8:203::10" not in listing
    with pytest.raises(FirewallError, match=r"floating address 203\.0\.113\.11 belongs to web1"):
        firewall.install_vm(VMDefinition.from_json({"name": "web2", "network": {
            "ipv4": "10.77.0.11/24", "floating_ipv4": "203.0.113.11"}}), MARK + 1)
    firewall.install_vm(definition(floating6="2001:db8:203::11", **LAB_POLICY), MARK)
    with pytest.raises(FirewallError, match=r"floating address 2001:db8:203::11 belongs to web1"):
        firewall.install_vm(VMDefinition.from_json({"name": "web2", "network": {
            "ipv6": "fd77::11/64", "floating_ipv6": "2001:db8:203::11"}}), MARK + 1)
    firewall.install_vm(definition(**LAB_POLICY), MARK)  # no floating address any more
    assert "_dnat" not in nat_listing() and "_snat" not in nat_listing()
    firewall.install_vm(definition(floating="203.0.113.10", floating6="2001:db8:203::10",
                                   **LAB_POLICY), MARK)
    firewall.remove_vm("web1")
    assert "vm_web1" not in in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout


def test_replace_drops_stale_addresses_and_keeps_counters(
        firewall: Any, vm_server: EchoServer) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    assert_dropped(CLIENT, VM4, 8082)
    drops = firewall.counters()["vm_web1_in_drops"]
    v4_only = VMDefinition.from_json({
        "name": "web1", "network": {"ipv4": f"{VM4}/24"}, "policy": LAB_POLICY})
    firewall.install_vm(v4_only, 0x77)
    assert firewall.installed_vms() == {"web1": 0x77}
    assert firewall.counters()["vm_web1_in_drops"] == drops
    with connected(CLIENT, VM4, 8080) as sock:
        assert echoes(sock, b"x")
    assert_dropped(CLIENT, VM6, 8080)  # fd77::10 is no longer the VM's: policy drop
    assert firewall.counters()["vm_web1_in_drops"] == drops


def test_address_conflict_changes_nothing(firewall: Any) -> None:
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    before = in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout
    thief = VMDefinition.from_json({"name": "thief", "network": {"ipv4": f"{VM4}/24"}})
    with pytest.raises(FirewallError, match=f"^install VM thief: address {VM4} belongs to web1"):
        firewall.install_vm(thief, 7)
    assert in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout == before


def test_failed_transaction_changes_nothing(firewall: Any) -> None:
    """An nft error (here: a foreign map element on the VM's address) aborts the whole
    transaction, and its text reaches the caller on one line."""
    firewall.install_vm(definition(**LAB_POLICY), MARK)
    in_ns(HOST, "nft", "add", "element", "inet", "nseh", "in4", "{ 10.77.0.30 : drop }")
    before = in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout
    other = VMDefinition.from_json({"name": "other", "network": {"ipv4": "10.77.0.30/24"}})
    with pytest.raises(FirewallError) as raised:
        firewall.install_vm(other, 7)
    assert str(raised.value) == "install VM other: Could not process rule: File exists"
    assert in_ns(HOST, "nft", "list", "table", "inet", "nseh").stdout == before
    assert firewall.installed_vms() == {"web1": MARK}


def test_operations_need_the_base_table(firewall: Any) -> None:
    firewall.destroy()
    firewall.destroy()  # absent: no error
    with pytest.raises(FirewallError, match="ensure_base"):
        firewall.install_vm(definition(), MARK)
