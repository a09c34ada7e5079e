"""The lab's contract: namespace and link names, addresses and run-directory paths.

Other parts of nseh, its tests and the demo rely on these; import them rather than
hard-coding addresses.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from nseh.inventory import LAB_INVENTORY

MAX_HOSTS = 9
MAX_CLIENTS = 9

# Every lab namespace starts with this; `nsehtest-*` (other test suites) does not.
NAMESPACE_PREFIX = "nseh-"
FABRIC_NAMESPACE = "nseh-fabric"

# Fabric switch bridges.
FABRIC_VM_BRIDGE = "vmnet"
FABRIC_MGMT_BRIDGE = "mgmt"
# The "internet" side: the router owns PUBLIC_ROUTER4 and PUBLIC_ROUTER6 on it and routes
# between it and the VM network; hosts own their VMs' floating addresses (from PUBLIC_SUBNET4
# and PUBLIC_SUBNET6) on it.
FABRIC_PUBLIC_BRIDGE = "public"
# The router address sits on vmnet; a fixed MAC keeps it from changing as ports come and go
# (a bridge otherwise takes the lowest port MAC), which would leave stale neighbour entries.
ROUTER_MAC = "02:00:0a:00:00:01"

# Host side.
HOST_VM_BRIDGE = "br-vm"
HOST_UPLINK = "uplink"
HOST_MGMT_LINK = "mgmt0"
HOST_PUBLIC_LINK = "pub0"

# Client side.
CLIENT_LINK = "eth0"

VM_SUBNET4 = IPv4Network("10.0.0.0/24")
VM_SUBNET6 = IPv6Network("fd00::/64")
ROUTER4 = IPv4Address("10.0.0.1")
ROUTER6 = IPv6Address("fd00::1")
MGMT_SUBNET4 = IPv4Network("10.99.0.0/24")
MGMT_SUBNET6 = IPv6Network("fd99::/64")
PUBLIC_SUBNET4 = IPv4Network("203.0.113.0/24")  # TEST-NET-3
PUBLIC_ROUTER4 = IPv4Address("203.0.113.1")
PUBLIC_SUBNET6 = IPv6Network("2001:db8:203::/64")  # in the documentation prefix
PUBLIC_ROUTER6 = IPv6Address("2001:db8:203::1")

LAB_DIR = LAB_INVENTORY.parent
LAB_STATE_FILE = LAB_DIR / "lab.json"
# Where a failed `up` keeps the agents' logs, since undoing the lab removes LAB_DIR.
FAILED_UP_DIR = LAB_DIR.parent / "lab-failed"
# Outside LAB_DIR, because `down` removes LAB_DIR while holding the lock.
LAB_LOCK_FILE = LAB_DIR.parent / "lab.lock"


AGENT_PID_FILE = "agent.pid"
AGENT_LOG_FILE = "agent.log"


def host_name(index: int) -> str:
    return f"h{index}"


def namespace_of(name: str) -> str:
    """The namespace of lab host or client `name` ("h1" -> "nseh-h1")."""
    return f"{NAMESPACE_PREFIX}{name}"


def host_namespace(index: int) -> str:
    return namespace_of(host_name(index))


def host_mgmt_ipv4(index: int) -> IPv4Address:
    return MGMT_SUBNET4.network_address + index


def host_mgmt_ipv6(index: int) -> IPv6Address:
    # Written like the IPv4 one ("fd99::1" for host 1), i.e. as a hex literal.
    return IPv6Address(f"{MGMT_SUBNET6.network_address}{index}")


def host_fabric_vm_port(index: int) -> str:
    return f"{host_name(index)}-vm"


def host_fabric_mgmt_port(index: int) -> str:
    return f"{host_name(index)}-mgmt"


def host_fabric_public_port(index: int) -> str:
    return f"{host_name(index)}-pub"


def client_name(index: int) -> str:
    return f"c{index}"


def client_namespace(index: int) -> str:
    return namespace_of(client_name(index))


def client_ipv4(index: int) -> IPv4Address:
    return VM_SUBNET4.network_address + 200 + index


def client_ipv6(index: int) -> IPv6Address:
    # "fd00::201" for client 1: the decimal digits read as a hex literal, like the IPv4 one.
    return IPv6Address(f"{VM_SUBNET6.network_address}{200 + index}")


def client_fabric_port(index: int) -> str:
    return f"{client_name(index)}-vm"


def host_dir(host: str) -> Path:
    return LAB_DIR / host


def agent_config_path(host: str) -> Path:
    return host_dir(host) / "agent.toml"


def agent_socket_path(host: str) -> Path:
    return host_dir(host) / "agent.sock"


def agent_state_dir(host: str) -> Path:
    return host_dir(host) / "state"


def agent_log_path(host: str) -> Path:
    return host_dir(host) / AGENT_LOG_FILE


def agent_pid_path(host: str) -> Path:
    return host_dir(host) / AGENT_PID_FILE


def agent_endpoint(host: str) -> str:
    return f"unix://{agent_socket_path(host)}"


def netns_exec_argv(namespace: str, argv: list[str]) -> list[str]:
    """The argv that runs `argv` inside the network namespace `namespace`."""
    return ["ip", "netns", "exec", namespace, *argv]
