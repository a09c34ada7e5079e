"""The host's virtual network for VMs: one tap per VM, a port of the host's VM bridge; and
the floating addresses of the VMs running here, owned on the host's public interface.

A host that runs a VM with a floating address holds that address (/32) on its public
interface, so it answers ARP for it, and routes the DNATed traffic to the VM over the VM
bridge. When the VM moves, the destination claims the address and announces it with
gratuitous ARP (neighbours and switches learn the new owner at once); the source releases it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

ETH_P_ARP = 0x0806
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


def claim_floating(floating: ipaddress.IPv4Address, vm_address: ipaddress.IPv4Address,
                   public_interface: str, bridge: str) -> None:
    """Own `floating` on the public interface, route `vm_address` over the VM bridge, and
    announce the address. Idempotent."""
    with IPRoute() as ipr:
        public = _link(ipr, public_interface, "public interface")
        vm_bridge = _link(ipr, bridge, "VM bridge")
        try:
            ipr.addr("add", index=public, address=str(floating), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise NetworkError(f"cannot add {floating} to {public_interface}: "
                                   f"{exc}") from None
        try:
            ipr.route("replace", dst=f"{vm_address}/32", oif=vm_bridge)
        except NetlinkError as exc:
            raise NetworkError(f"cannot route {vm_address} via {bridge}: {exc}") from None
        mac = ipr.get_links(public)[0].get_attr("IFLA_ADDRESS")
    frame = gratuitous_arp(mac, floating)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((public_interface, ETH_P_ARP))
        for i in range(ANNOUNCEMENTS):
            if i:
                time.sleep(ANNOUNCE_INTERVAL)
            sock.send(frame)


def release_floating(floating: ipaddress.IPv4Address, vm_address: ipaddress.IPv4Address,
                     public_interface: str) -> None:
    """Give up `floating` and the route to the VM; no error for what is already gone."""
    with IPRoute() as ipr:
        for release in (
            lambda: ipr.route("del", dst=f"{vm_address}/32"),
            lambda: ipr.addr("del", index=_link(ipr, public_interface, "public interface"),
                             address=str(floating), prefixlen=32),
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
