"""The host's virtual network for VMs: one tap per VM, a port of the host's VM bridge; and
the floating addresses of the VMs running here, owned on the host's public interface.

A host that runs a VM with a floating address holds that address (/32, or /128 for IPv6)
on its public interface, so it answers ARP or neighbour solicitations for it, and routes the
DNATed traffic to the VM over the VM bridge. When the VM moves, the destination claims the
address and announces it — gratuitous ARP for IPv4, unsolicited neighbour advertisements with
the override flag for IPv6 — so neighbours and switches learn the new owner at once; the
source releases it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
ND_NEIGHBOR_ADVERT = 136
ND_OPT_TARGET_LINKADDR = 2
NA_FLAG_OVERRIDE = 0x20000000
# Neighbour discovery messages are only accepted with the largest hop limit (RFC 4861 7.1.2).
ND_HOP_LIMIT = 255
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = bytes.fromhex("333300000001")  # 33:33 + the low 32 bits of ff02::1
IFA_F_NODAD = 0x02
# Announcements per claim, like QEMU's announce-self: one lost frame must not strand a VM.
ANNOUNCEMENTS = 3
ANNOUNCE_INTERVAL = 0.02


class NetworkError(RuntimeError):
    """The host's VM network cannot be set up as asked; one-line message."""


def tap_name(vm_name: str) -> str:
    # VM names are at most 11 characters, so this stays within IFNAMSIZ (15).
    return f"tap-{vm_name}"


def create_tap(vm_name: str, bridge: str) -> str:
    """Create the VM's tap (replacing a stale one) as an up port of `bridge`; returns its name."""
    name = tap_name(vm_name)
    with IPRoute() as ipr:
        vm_bridge = _link(ipr, bridge, "VM bridge")
        if ipr.link_lookup(ifname=name):
            ipr.link("del", ifname=name)
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            ipr.link("set", ifname=name, master=vm_bridge, state="up")
        except NetlinkError as exc:
            raise NetworkError(f"cannot create tap {name}: {exc}") from None
    return name


def delete_tap(vm_name: str) -> None:
    """Remove the VM's tap if it exists."""
    name = tap_name(vm_name)
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            ipr.link("del", ifname=name)


def gratuitous_arp(mac: str, address: ipaddress.IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request from `mac` for its own `address` (RFC 5227 style
    announcement: sender and target protocol address are both `address`)."""
    hardware = bytes.fromhex(mac.replace(":", ""))
    arp = (b"\x00\x01" b"\x08\x00" b"\x06\x04" b"\x00\x01"  # Ethernet/IPv4, request
           + hardware + address.packed + b"\x00" * 6 + address.packed)
    return b"\xff" * 6 + hardware + ETH_P_ARP.to_bytes(2, "big") + arp


def unsolicited_neighbour_advertisement(mac: str, address: ipaddress.IPv6Address) -> bytes:
    """An Ethernet frame with an ICMPv6 neighbour advertisement from `address` for itself to
    all nodes (ff02::1), override flag set and `mac` as target link-layer address (RFC 4861
    7.2.6): receivers replace the link-layer address they hold for `address`."""
    hardware = bytes.fromhex(mac.replace(":", ""))
    body = (NA_FLAG_OVERRIDE.to_bytes(4, "big") + address.packed
            + bytes([ND_OPT_TARGET_LINKADDR, 1]) + hardware)  # option length in 8 octets
    length = 4 + len(body)  # with the ICMPv6 type, code and checksum
    pseudo_header = (address.packed + ALL_NODES.packed
                     + struct.pack("!I3xB", length, IPPROTO_ICMPV6))
    checksum = internet_checksum(pseudo_header + bytes([ND_NEIGHBOR_ADVERT, 0, 0, 0]) + body)
    icmp = struct.pack("!BBH", ND_NEIGHBOR_ADVERT, 0, checksum) + body
    ipv6 = (struct.pack("!IHBB", 6 << 28, length, IPPROTO_ICMPV6, ND_HOP_LIMIT)
            + address.packed + ALL_NODES.packed)
    return ALL_NODES_MAC + hardware + ETH_P_IPV6.to_bytes(2, "big") + ipv6 + icmp


def internet_checksum(data: bytes) -> int:
    """The 16-bit one's complement of the one's complement sum of `data` (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def announcement(mac: str, address: IPAddress) -> tuple[int, bytes]:
    """The Ethernet protocol and frame that tell the link `mac` now owns `address`."""
    if isinstance(address, ipaddress.IPv4Address):
        return ETH_P_ARP, gratuitous_arp(mac, address)
    return ETH_P_IPV6, unsolicited_neighbour_advertisement(mac, address)


def claim_floating(floating: IPAddress, vm_address: IPAddress, public_interface: str,
                   bridge: str) -> None:
    """Own `floating` on the public interface, route `vm_address` over the VM bridge, and
    announce the address. Idempotent."""
    with IPRoute() as ipr:
        public = _link(ipr, public_interface, "public interface")
        vm_bridge = _link(ipr, bridge, "VM bridge")
        try:
            # No duplicate address detection: the address moves between hosts and must be
            # usable at once (DAD would hold an IPv6 address tentative for a second or more).
            ipr.addr("add", index=public, address=str(floating),
                     prefixlen=floating.max_prefixlen, flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise NetworkError(f"cannot add {floating} to {public_interface}: "
                                   f"{exc}") from None
        try:
            ipr.route("replace", dst=f"{vm_address}/{vm_address.max_prefixlen}",
                      oif=vm_bridge)
        except NetlinkError as exc:
            raise NetworkError(f"cannot route {vm_address} via {bridge}: {exc}") from None
        mac = ipr.get_links(public)[0].get_attr("IFLA_ADDRESS")
    protocol, frame = announcement(mac, floating)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((public_interface, protocol))
        for i in range(ANNOUNCEMENTS):
            if i:
                time.sleep(ANNOUNCE_INTERVAL)
            sock.send(frame)


def release_floating(floating: IPAddress, vm_address: IPAddress,
                     public_interface: str) -> None:
    """Give up `floating` and the route to the VM; no error for what is already gone."""
    with IPRoute() as ipr:
        for release in (
            lambda: ipr.route("del", dst=f"{vm_address}/{vm_address.max_prefixlen}"),
            lambda: ipr.addr("del", index=_link(ipr, public_interface, "public interface"),
                             address=str(floating), prefixlen=floating.max_prefixlen),
        ):
            try:
                release()
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise NetworkError(f"cannot release {floating}: {exc}") from None


def _link(ipr: IPRoute, name: str, role: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkError(f"{role} {name!r} does not exist on this host")
    return found[0]
