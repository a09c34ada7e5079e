"""The host's virtual network for VMs: one tap per VM, a port of the host's VM bridge."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class NetworkError(RuntimeError):
    """The host's VM network cannot be set up as asked; one-line message."""


def tap_name(vm_name: str) -> str:
    # VM names are at most 11 characters, so this stays within IFNAMSIZ (15).
    return f"tap-{vm_name}"


def create_tap(vm_name: str, bridge: str) -> str:
    """Create the VM's tap (replacing a stale one) as an up port of `bridge`; returns its name."""
    name = tap_name(vm_name)
    with IPRoute() as ipr:
        bridges = ipr.link_lookup(ifname=bridge)
        if not bridges:
            raise NetworkError(f"VM bridge {bridge!r} does not exist on this host")
        if ipr.link_lookup(ifname=name):
            ipr.link("del", ifname=name)
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            ipr.link("set", ifname=name, master=bridges[0], state="up")
        except NetlinkError as exc:
            raise NetworkError(f"cannot create tap {name}: {exc}") from None
    return name


def delete_tap(vm_name: str) -> None:
    """Remove the VM's tap if it exists."""
    name = tap_name(vm_name)
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            ipr.link("del", ifname=name)
