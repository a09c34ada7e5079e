"""VM definitions: what a VM is (memory, addresses, MAC) and the security policy it runs behind.

A definition is a TOML file written by the operator, for example::

    name = "web1"
    memory_mib = 128

    [network]
    ipv4 = "10.0.0.10/24"
    ipv6 = "fd00::10/64"
    gateway4 = "10.0.0.1"
    floating_ipv4 = "203.0.113.10"   # optional public address the host 1:1-NATs to ipv4
    floating_ipv6 = "2001:db8:203::10"   # optional, likewise (NAT66) to ipv6

    [[policy.inbound]]          # allow rules; everything else is dropped
    proto = "tcp"
    ports = [7, 80]
    peers = ["10.0.0.0/24", "fd00::/64"]   # sources; empty or absent = anywhere

    [[policy.inbound]]
    proto = "icmp"              # echo requests, ICMP and ICMPv6

    [[policy.outbound]]
    proto = "tcp"
    ports = [7]                 # destinations' ports

    [policy.ips]                # optional intrusion prevention (nseh.agent.ips)
    portscan = { ports = 10, seconds = 30 }     # > 10 distinct closed ports in 30 s
    bruteforce = { ports = [22], connections = 5, seconds = 60 }
    max_connections_per_source = 50
    block_seconds = 300         # how long a detected source stays blocked

Loading never raises anything but `DefinitionError`, whose message is one line that names
the file and the offending field. The agent that installs a policy bounds its size (its
`[limits] policy_rules`); the model alone does not.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nseh.oneline import first_validation_error, read_toml

# VM names end up in nft chain names, tap names (15 chars max with a 4-char prefix) and paths.
VM_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,10}$"
# Inbound and outbound allow rules of one VM an agent installs, unless configured otherwise.
DEFAULT_MAX_POLICY_RULES = 1000


class DefinitionError(ValueError):
    """A VM definition that cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

Port = Annotated[int, Field(ge=1, le=65535)]


class Rule(_Strict):
    """One allow rule. `peers` are sources for inbound rules, destinations for outbound ones."""

    proto: Literal["tcp", "udp", "icmp", "any"]
    ports: tuple[Port, ...] = ()
    peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @field_validator("peers", mode="before")
    @classmethod
    def _non_strict_networks(cls, value: Any) -> Any:
        # Accept host bits set ("10.0.0.5/24") the way nft does, rather than failing.
        if isinstance(value, list | tuple):
            return tuple(ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v
                         for v in value)
        return value

    @model_validator(mode="after")
    def _ports_need_a_port_protocol(self) -> Rule:
        if self.ports and self.proto not in ("tcp", "udp"):
            raise ValueError(f"ports are only valid with proto tcp or udp, not {self.proto}")
        return self


# IPS thresholds are strict integers: TOML `true` or "10" is a mistake, not a number.
Count = Annotated[int, Field(strict=True, ge=1, le=100_000)]
Seconds = Annotated[int, Field(strict=True, ge=1, le=86_400)]
# Longest block: a week. Blocks are also bounded so a migrated record cannot pin a source forever.
MAX_BLOCK_SECONDS = 7 * 86_400


class PortScan(_Strict):
    """A source that touches more than `ports` distinct closed ports within `seconds`."""

    ports: Count
    seconds: Seconds


class BruteForce(_Strict):
    """A source that opens more than `connections` new TCP connections to the protected
    `ports` (together) within `seconds`."""

    ports: tuple[Port, ...] = Field(min_length=1)
    connections: Count
    seconds: Seconds

    @field_validator("ports")
    @classmethod
    def _distinct(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise ValueError("ports must be distinct")
        return value


class IpsPolicy(_Strict):
    """Intrusion prevention for a VM: what counts as an attack, and how long its source is
    blocked. Without any detection the VM still has a blocklist operators can fill."""

    portscan: PortScan | None = None
    bruteforce: BruteForce | None = None
    max_connections_per_source: Annotated[int, Field(strict=True, ge=1, le=65_535)] | None = None
    block_seconds: Annotated[int, Field(strict=True, ge=1, le=MAX_BLOCK_SECONDS)] = 300


class Policy(_Strict):
    inbound: tuple[Rule, ...] = ()
    outbound: tuple[Rule, ...] = ()
    ips: IpsPolicy | None = None

    @model_validator(mode="after")
    def _within_the_rule_limit(self, info: ValidationInfo) -> Policy:
        limit = (info.context or {}).get("max_policy_rules")
        rules = len(self.inbound) + len(self.outbound)
        if limit is not None and rules > limit:
            raise ValueError(f"{rules} rules exceed limits.policy_rules = {limit}")
        return self


class Network(_Strict):
    ipv4: ipaddress.IPv4Interface | None = None
    ipv6: ipaddress.IPv6Interface | None = None
    gateway4: ipaddress.IPv4Address | None = None
    gateway6: ipaddress.IPv6Address | None = None
    mac: str | None = Field(default=None, pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
    # Public addresses the VM's host owns and 1:1-NATs to `ipv4` / `ipv6`; the guest never
    # sees them.
    floating_ipv4: ipaddress.IPv4Address | None = None
    floating_ipv6: ipaddress.IPv6Address | None = None

    def _floating_fields(self) -> list[tuple[str, IPAddress | None, IPInterface | None]]:
        return [("floating_ipv4", self.floating_ipv4, self.ipv4),
                ("floating_ipv6", self.floating_ipv6, self.ipv6)]

    @property
    def floating(self) -> list[tuple[IPAddress, IPInterface]]:
        """Each floating address with the VM's interface address it translates to."""
        return [(floating, interface) for _, floating, interface in self._floating_fields()
                if floating is not None and interface is not None]

    @model_validator(mode="after")
    def _has_an_address(self) -> Network:
        if self.ipv4 is None and self.ipv6 is None:
            raise ValueError("a VM needs an ipv4 or an ipv6 address")
        for field, floating, interface in self._floating_fields():
            if floating is None:
                continue
            if interface is None:
                raise ValueError(f"{field} needs an ipv{floating.version} address to "
                                 "translate to")
            if (floating.is_multicast or floating.is_loopback or floating.is_link_local
                    or floating.is_unspecified):
                raise ValueError(f"{field} {floating} is not a unicast address a host can own")
            if floating in interface.network:
                raise ValueError(f"{field} {floating} is inside the VM's own "
                                 f"network {interface.network}")
        if self.mac is not None and int(self.mac[:2], 16) & 1:
            raise ValueError(f"mac {self.mac} is a multicast address")
        return self


class VMDefinition(_Strict):
    name: str = Field(pattern=VM_NAME_PATTERN)
    # The Debian guest kernel panics at boot with less than 96 MiB.
    memory_mib: int = Field(default=128, ge=96, le=65536)
    vcpus: int = Field(default=1, ge=1, le=64)
    network: Network
    policy: Policy = Policy()

    @property
    def mac(self) -> str:
        """The configured MAC, or a stable locally administered one derived from the name."""
        if self.network.mac:
            return self.network.mac
        digest = hashlib.sha256(self.name.encode()).digest()
        return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])

    @property
    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """The VM's own addresses (without prefix length)."""
        return [iface.ip for iface in (self.network.ipv4, self.network.ipv6) if iface is not None]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Any, *, origin: str = "definition",
                  max_policy_rules: int | None = None) -> VMDefinition:
        """Validate a definition; with `max_policy_rules`, a larger policy is refused."""
        try:
            return cls.model_validate(data, context={"max_policy_rules": max_policy_rules})
        except ValidationError as exc:
            raise DefinitionError(f"{origin}: {first_validation_error(exc)}") from None


def load_definition(path: Path, *, name: str | None = None) -> VMDefinition:
    """Read and validate a VM definition file; `name`, if given, replaces the file's."""
    data = read_toml(path, DefinitionError)
    if name is not None:
        data["name"] = name
    return VMDefinition.from_json(data, origin=str(path))
