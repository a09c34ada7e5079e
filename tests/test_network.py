"""Floating addresses on the host's public interface: the announcement frames (pure), and a
real claim and release whose announcement a neighbour's kernel takes.

Namespaces of the kernel test (removed in teardown; leftovers of a killed run first)::

    nsehtest-nwh (host: br-vm, pub0) ---- nsehtest-nwn (neighbour: eth0 203.0.113.1/24,
                                                        2001:db8:203::1/64)
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nseh.agent.network import (
    claim_floating,
    gratuitous_arp,
    release_floating,
    unsolicited_neighbour_advertisement,
)
from nseh.lab.netns import call_in_namespace

MAC = "52:54:00:ab:cd:ef"
HOST, NEIGHBOUR = "nsehtest-nwh", "nsehtest-nwn"
STALE_MAC = "02:00:00:00:00:99"  # where the neighbour believes the address is, before
FLOATING = {4: "203.0.113.10", 6: "2001:db8:203::10"}
VM_ADDRESS = {4: "10.0.0.10", 6: "fd00::10"}


def ones_complement_sum(data: bytes) -> int:
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_unsolicited_neighbour_advertisement_bytes() -> None:
    address = ipaddress.IPv6Address("2001:db8:203::10")
    frame = unsolicited_neighbour_advertisement(MAC, address)
    mac = bytes.fromhex(MAC.replace(":", ""))
    # Ethernet: to the all-nodes multicast MAC, from the host, IPv6.
    assert frame[:14] == bytes.fromhex("333300000001") + mac + b"\x86\xdd"
    ipv6, icmp = frame[14:54], frame[54:]
    version_class_flow, payload_length, next_header, hop_limit = struct.unpack(
        "!IHBB", ipv6[:8])
    assert version_class_flow == 6 << 28
    assert (payload_length, next_header, hop_limit) == (len(icmp), 58, 255) == (32, 58, 255)
    assert ipv6[8:24] == address.packed  # from the address itself
    assert ipv6[24:40] == ipaddress.IPv6Address("ff02::1").packed
    # ICMPv6 neighbour advertisement, code 0; flags: override only (not router, not solicited).
    assert icmp[0:2] == bytes([136, 0])
    assert icmp[4:8] == bytes([0x20, 0, 0, 0])
    assert icmp[8:24] == address.packed  # the target
    assert icmp[24:32] == bytes([2, 1]) + mac  # target link-layer address option, 8 octets
    # The checksum covers the pseudo-header: a correct one makes the sum all ones.
    pseudo = ipv6[8:40] + struct.pack("!I3xB", len(icmp), 58)
    assert ones_complement_sum(pseudo + icmp) == 0xFFFF


def test_gratuitous_arp_bytes() -> None:
    address = ipaddress.IPv4Address("203.0.113.10")
    frame = gratuitous_arp(MAC, address)
    mac = bytes.fromhex(MAC.replace(":", ""))
    assert frame[:14] == b"\xff" * 6 + mac + b"\x08\x06"
    assert frame[14:22] == bytes.fromhex("0001080006040001")  # Ethernet/IPv4 request
    assert frame[22:42] == mac + address.packed + b"\0" * 6 + address.packed


# ---------------------------------------------------------------------------------------------
# A real claim: the neighbour's kernel must take the announcement.


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


def delete_namespaces(*names: str) -> None:
    for name in names:
        if Path(f"/run/netns/{name}").exists():
            sh("ip", "netns", "delete", name, check=False)


@pytest.fixture
def link() -> Iterator[str]:
    """Host and neighbour on one link; yields the MAC of the host's public interface."""
    delete_namespaces(HOST, NEIGHBOUR)
    try:
        for name in (HOST, NEIGHBOUR):
            sh("ip", "netns", "add", name)
            sh("ip", "netns", "exec", name, "sysctl", "-qw",
               "net.ipv6.conf.default.accept_dad=0")
        sh("ip", "-n", HOST, "link", "add", "pub0", "type", "veth", "peer", "name", "eth0",
           "netns", NEIGHBOUR)
        sh("ip", "-n", HOST, "link", "add", "br-vm", "type", "bridge")
        for name, links in ((HOST, ("pub0", "br-vm")), (NEIGHBOUR, ("eth0",))):
            for link_name in links:
                sh("ip", "-n", name, "link", "set", link_name, "up")
        sh("ip", "-n", NEIGHBOUR, "addr", "add", "203.0.113.1/24", "dev", "eth0")
        sh("ip", "-n", NEIGHBOUR, "addr", "add", "2001:db8:203::1/64", "dev", "eth0")
        yield json.loads(sh("ip", "-n", HOST, "-j", "link", "show", "pub0").stdout)[0]["address"]
    finally:
        delete_namespaces(HOST, NEIGHBOUR)


def neighbour_entry(address: str) -> str:
    return sh("ip", "-n", NEIGHBOUR, "neigh", "show", address, "dev", "eth0").stdout.strip()


def host_state(version: int) -> tuple[str, str]:
    """The host's addresses on pub0 and its routes of that IP version."""
    family = f"-{version}"
    return (sh("ip", "-n", HOST, family, "addr", "show", "pub0").stdout,
            sh("ip", "-n", HOST, family, "route", "show").stdout)


@pytest.mark.parametrize("version", [4, 6])
def test_claim_owns_routes_and_announces_and_release_gives_up(link: str, version: int) -> None:
    floating = ipaddress.ip_address(FLOATING[version])
    vm_address = ipaddress.ip_address(VM_ADDRESS[version])
    # The neighbour still believes the address is at another MAC (the former owner).
    sh("ip", "-n", NEIGHBOUR, "neigh", "replace", str(floating), "lladdr", STALE_MAC,
       "dev", "eth0", "nud", "stale")
    assert f"lladdr {STALE_MAC}" in neighbour_entry(str(floating))
    call_in_namespace(HOST, claim_floating, floating, vm_address, "pub0", "br-vm")
    addresses, routes = host_state(version)
    assert f"{floating}/{floating.max_prefixlen} " in addresses
    assert "tentative" not in addresses.split(str(floating))[1].split("\n")[0]
    assert f"{vm_address} dev br-vm" in routes
    assert f"lladdr {link}" in neighbour_entry(str(floating)), "announcement not taken"
    call_in_namespace(HOST, claim_floating, floating, vm_address, "pub0", "br-vm")  # again
    call_in_namespace(HOST, release_floating, floating, vm_address, "pub0")
    addresses, routes = host_state(version)
    assert str(floating) not in addresses and str(vm_address) not in routes
    call_in_namespace(HOST, release_floating, floating, vm_address, "pub0")  # gone: no error
