"""Namespaces, links, addresses and sysctls of the lab.

Every link is created from inside a lab namespace (veth peers go straight into their target
namespace), so the root network namespace is never touched, not even by a killed run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from socket import AF_INET, AF_INET6

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from nseh.lab import layout
from nseh.lab.state import LabError
from nseh.oneline import one_line

# In every lab namespace: no IPv6 DAD, so v6 addresses are usable at once. Set before any
# link exists there, so every link inherits it from `default`.
_BASE_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}
# In host namespaces: strict conntrack (DESIGN), bridged traffic through the inet family, and
# routing from the public interface to VMs (floating addresses).
_HOST_SYSCTLS = {
    "net.netfilter.nf_conntrack_tcp_loose": "0",
    "net.bridge.bridge-nf-call-iptables": "1",
    "net.bridge.bridge-nf-call-ip6tables": "1",
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}
# The fabric routes between the VM network and the public one.
_FABRIC_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}


def lab_namespaces() -> list[str]:
    """Existing network namespaces that belong to the lab (`nseh-*`)."""
    return sorted(n for n in netns.listnetns() if n.startswith(layout.NAMESPACE_PREFIX))


@contextlib.contextmanager
def failing_as(what: str) -> Iterator[None]:
    """A failure of the kernel or of pyroute2 (its child processes included) becomes a
    one-line LabError that names `what` could not be done."""
    try:
        yield
    except LabError:
        raise
    except NetlinkError as exc:
        raise LabError(f"cannot {what}: {os.strerror(exc.code)}") from exc
    except (OSError, RuntimeError, ValueError, IndexError) as exc:
        detail = one_line(str(exc).strip()) or type(exc).__name__
        raise LabError(f"cannot {what}: {detail}") from exc


def create_namespace(name: str) -> None:
    """Create the namespace; it is mounted at /run/netns/<name> when this returns.

    `ip netns add` makes the file and mounts the namespace on it in one process, and exits
    when both are done. (Not pyroute2's `netns.create`: it forks this multi-threaded process
    to do that and SIGKILLs the child if it has not answered within 2 s, whatever step it
    was at.) The mount is checked, since every later step opens the namespace by its path.
    """
    if name in netns.listnetns():
        raise LabError(f"network namespace {name} already exists; run `nseh lab down` first")
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise LabError(f"cannot create network namespace {name}: "
                       f"{one_line(result.stderr.strip()) or f'status {result.returncode}'}")
    path = f"/run/netns/{name}"
    with failing_as(f"create network namespace {name}"):
        mounted = os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    if not mounted:
        raise LabError(f"cannot create network namespace {name}: {path} is not a namespace "
                       "mount")
    set_sysctls(name, _BASE_SYSCTLS)


def remove_namespace(name: str) -> None:
    """Unmount and unlink the namespace; it goes away once nothing uses it any more."""
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


def set_sysctls(namespace: str, values: dict[str, str]) -> None:
    # /proc/sys/net shows the namespace of the process that opens it, hence a process inside.
    argv = layout.netns_exec_argv(
        namespace, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        raise LabError(f"cannot set sysctls in {namespace}: {detail}")


def read_sysctl(namespace: str, key: str) -> str:
    argv = layout.netns_exec_argv(namespace, ["sysctl", "-n", key])
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def _index(ipr: IPRoute, ifname: str) -> int:
    return ipr.link_lookup(ifname=ifname)[0]


def _add_bridge(ipr: IPRoute, name: str, address: str | None = None) -> int:
    # STP off and no forward delay: ports forward at once. Multicast snooping off: the lab
    # has no MLD/IGMP querier, and snooped state would go stale when a VM moves hosts.
    extra = {"address": address} if address else {}
    with failing_as(f"create bridge {name} in {ipr.status['netns']}"):
        ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0,
                 br_mcast_snooping=0, **extra)
        index = _index(ipr, name)
        ipr.link("set", index=index, state="up")
    return index


def _add_fabric_port(ipr: IPRoute, bridge: int, port: str, peer: str, peer_ns: str) -> None:
    """A veth whose `port` end joins a fabric bridge and whose `peer` end is in `peer_ns`."""
    with failing_as(f"create veth {port} in {ipr.status['netns']} with its peer {peer} in "
                    f"{peer_ns}"):
        ipr.link("add", ifname=port, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_ns})
        ipr.link("set", index=_index(ipr, port), master=bridge, state="up")


def _add_addresses(ipr: IPRoute, index: int, *addresses: tuple[str, int]) -> None:
    for address, prefixlen in addresses:
        with failing_as(f"add address {address}/{prefixlen} in {ipr.status['netns']}"):
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


@contextlib.contextmanager
def _open(namespace: str) -> Iterator[IPRoute]:
    """rtnetlink in `namespace`; any other failure there is named by the namespace."""
    # flags=0: never create a namespace by accident (pyroute2's default is O_CREAT).
    with failing_as(f"set up network namespace {namespace}"), IPRoute(
            netns=namespace, flags=0) as ipr:
        yield ipr


def build_fabric(hosts: int, clients: int) -> None:
    """The switch with a port per host (VM, management and public network) and per client,
    and the router between the VM network and the public one."""
    with _open(layout.FABRIC_NAMESPACE) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        vmnet = _add_bridge(ipr, layout.FABRIC_VM_BRIDGE, layout.ROUTER_MAC)
        mgmt = _add_bridge(ipr, layout.FABRIC_MGMT_BRIDGE)
        public = _add_bridge(ipr, layout.FABRIC_PUBLIC_BRIDGE)
        for i in range(1, hosts + 1):
            _add_fabric_port(ipr, vmnet, layout.host_fabric_vm_port(i), layout.HOST_UPLINK,
                             layout.host_namespace(i))
            _add_fabric_port(ipr, mgmt, layout.host_fabric_mgmt_port(i), layout.HOST_MGMT_LINK,
                             layout.host_namespace(i))
            _add_fabric_port(ipr, public, layout.host_fabric_public_port(i),
                             layout.HOST_PUBLIC_LINK, layout.host_namespace(i))
        for j in range(1, clients + 1):
            _add_fabric_port(ipr, vmnet, layout.client_fabric_port(j), layout.CLIENT_LINK,
                             layout.client_namespace(j))
        _add_addresses(ipr, vmnet, (str(layout.ROUTER4), layout.VM_SUBNET4.prefixlen),
                       (str(layout.ROUTER6), layout.VM_SUBNET6.prefixlen))
        _add_addresses(ipr, public,
                       (str(layout.PUBLIC_ROUTER4), layout.PUBLIC_SUBNET4.prefixlen),
                       (str(layout.PUBLIC_ROUTER6), layout.PUBLIC_SUBNET6.prefixlen))
    set_sysctls(layout.FABRIC_NAMESPACE, _FABRIC_SYSCTLS)


def build_host(index: int) -> None:
    """br-vm with the uplink as its port, the management link and the public link (no
    address: the agent adds its VMs' floating addresses); needs `build_fabric`."""
    namespace = layout.host_namespace(index)
    with _open(namespace) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        br_vm = _add_bridge(ipr, layout.HOST_VM_BRIDGE)
        ipr.link("set", index=_index(ipr, layout.HOST_UPLINK), master=br_vm, state="up")
        mgmt0 = _index(ipr, layout.HOST_MGMT_LINK)
        ipr.link("set", index=mgmt0, state="up")
        ipr.link("set", index=_index(ipr, layout.HOST_PUBLIC_LINK), state="up")
        _add_addresses(ipr, mgmt0,
                       (str(layout.host_mgmt_ipv4(index)), layout.MGMT_SUBNET4.prefixlen),
                       (str(layout.host_mgmt_ipv6(index)), layout.MGMT_SUBNET6.prefixlen))
    # After the bridge exists: the br_netfilter sysctls need the bridge code in place.
    set_sysctls(namespace, _HOST_SYSCTLS)


def build_client(index: int) -> None:
    """eth0 on the VM network with the client's addresses and the router as gateway."""
    with _open(layout.client_namespace(index)) as ipr:
        ipr.link("set", index=_index(ipr, "lo"), state="up")
        eth0 = _index(ipr, layout.CLIENT_LINK)
        ipr.link("set", index=eth0, state="up")
        _add_addresses(ipr, eth0,
                       (str(layout.client_ipv4(index)), layout.VM_SUBNET4.prefixlen),
                       (str(layout.client_ipv6(index)), layout.VM_SUBNET6.prefixlen))
        ipr.route("add", family=AF_INET, dst="0.0.0.0/0", gateway=str(layout.ROUTER4))
        ipr.route("add", family=AF_INET6, dst="::/0", gateway=str(layout.ROUTER6))
