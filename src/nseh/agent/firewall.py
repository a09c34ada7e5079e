"""The per-VM stateful firewall: one shared nftables table per host, one policy per VM.

Bridged VM traffic reaches the `inet` FORWARD hook through br_netfilter (the kernel has no
conntrack in the `bridge` family). The host table `inet nseh` looks like this::

    table inet nseh {
        counter invalid_drops                    # strict conntrack: unknown mid-stream packets
        map out4 { type ipv4_addr : verdict }    # VM address -> jump vm_<name>_out
        map out6 { type ipv6_addr : verdict }
        map in4  { type ipv4_addr : verdict }    # VM address -> goto vm_<name>_in
        map in6  { type ipv6_addr : verdict }
        chain forward {
            type filter hook forward priority filter; policy drop;
            icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert,
                          nd-router-solicit, nd-router-advert } accept
            ct state established,related accept
            ct state invalid counter name "invalid_drops" drop
            ip saddr vmap @out4         # a VM's outbound policy: allowed -> return, else drop
            ip6 saddr vmap @out6
            ip daddr vmap @in4          # a VM's inbound policy: allowed -> accept, else drop
            ip6 daddr vmap @in6
            ip saddr @out4 accept       # a local VM's traffic that passed its outbound policy
            ip6 saddr @out6 accept
        }
        counter vm_<name>_in_drops / vm_<name>_out_drops
        chain vm_<name>_out { ct mark set <mark>; <allow rules> return; counter ... drop }
        chain vm_<name>_in  { ct mark set <mark>; jump vm_<name>_in_head;
                              <allow rules> accept; jump vm_<name>_in_tail; counter ... drop }
        chain vm_<name>_in_head / vm_<name>_in_tail     # hook chains, see below

        # Floating IPs (1:1 NAT, NAT66 for IPv6), for VMs that have one:
        map dnat4 { type ipv4_addr : verdict }   # floating address -> goto vm_<name>_dnat4
        map snat4 { type ipv4_addr : verdict }   # VM address -> goto vm_<name>_snat4
        map dnat6 / snat6                        # the same for IPv6
        chain nat_in  { type nat hook prerouting priority dstnat;
                        ip daddr vmap @dnat4; ip6 daddr vmap @dnat6 }
        chain nat_out { type nat hook postrouting priority srcnat;
                        ip saddr vmap @snat4; ip6 saddr vmap @snat6 }
        chain vm_<name>_dnat4 { dnat ip to <VM address> }
        chain vm_<name>_snat4 { ip daddr != <VM network> snat ip to <floating address> }
        chain vm_<name>_dnat6 / vm_<name>_snat6  # the same with ip6
    }

Only packets that open a connection reach a VM's chains, so `ct mark set` marks exactly the
VM's new connections; the kernel can then select a VM's conntrack entries by mark. For
traffic between two VMs on the same host the destination VM's mark wins (its chain runs
last).

The hook chains are where other security engines act on a VM's new inbound connections
(the IPS, `nseh.agent.ips`): `head` before the allow rules (it may drop), `tail` after them,
reached only by what the policy drops. The firewall creates them empty and removes them with
the VM, but never flushes them when it replaces a policy: their rules belong to those engines.

A VM's policy is added, replaced and removed in one nft transaction each, so a VM is never
reachable with a half-installed policy.

Inbound traffic to a floating address is routed by the host (it owns the address on its
public interface, see `network.py`) after DNAT, so the VM's inbound policy sees the VM's
own address; the VM's replies are bridged and un-NATed by the same conntrack entry. The
VM's traffic to other networks leaves with the floating address as its source.

A `Firewall` acts on the network namespace it was created in (libnftables binds its
netlink socket when the context is created).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nftables
from pyroute2 import NFCTSocket
from pyroute2.netlink.exceptions import NetlinkError

from nseh.definition import Rule, VMDefinition

FAMILY = "inet"
TABLE = "nseh"
BASE_CHAIN = "forward"
NAT_IN_CHAIN = "nat_in"
NAT_OUT_CHAIN = "nat_out"
DNAT = "dnat"
SNAT = "snat"
INVALID_COUNTER = "invalid_drops"
MARK_MAX = 0xFFFFFFFF

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Neighbour discovery is untracked by conntrack and bridged through the ip6 hooks, so without
# this rule IPv6 address resolution between VMs and the fabric would hit the policy drop.
_ND_TYPES = ("nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit", "nd-router-advert")
_VM_CHAIN = re.compile(r"^vm_([a-z][a-z0-9-]{0,10})_(in|out|[ds]nat[46])$")
_NAT_MAP = re.compile(r"^[ds]nat[46]$")
# IP version -> the nft protocol (payload, NAT family) and the map key type.
_PROTOCOL = {4: "ip", 6: "ip6"}
_KEY_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_BRIDGE_SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")
_BRIDGE_SYSCTL_DIR = Path("/proc/sys/net/bridge")


class FirewallError(RuntimeError):
    """A firewall operation failed; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Pure rendering: libnftables JSON commands (the items of {"nftables": [...]}).


def vm_chain(name: str, direction: str) -> str:
    """Name of a VM's inbound ("in"), outbound ("out") or NAT chain (named like the NAT map
    that leads to it: "dnat4", "snat6", ...)."""
    return f"vm_{name}_{direction}"


def vm_in_hook(name: str, position: str) -> str:
    """Name of a hook chain of a VM's inbound chain: "head" runs before the allow rules,
    "tail" after them (only for what the policy drops)."""
    return f"vm_{name}_in_{position}"


def vm_drop_counter(name: str, direction: str) -> str:
    """Name of the counter of packets dropped by a VM's default drop in one direction."""
    return f"vm_{name}_{direction}_drops"


def _map_name(direction: str, version: int) -> str:
    """"out4", "in6", "dnat4", "snat6", ..."""
    return f"{direction}{version}"


def _obj(**fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, **fields}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _one_or_set(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else {"set": values}


def _network_value(network: IPNetwork) -> Any:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def render_base() -> list[dict[str, Any]]:
    """Commands that create the host table (idempotent: re-running re-asserts the base chain
    and keeps the maps, the VM chains and the counters)."""
    commands: list[dict[str, Any]] = [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"counter": _obj(name=INVALID_COUNTER)}},
    ]
    for direction in ("out", "in", DNAT, SNAT):
        for version, key_type in _KEY_TYPE.items():
            commands.append({"add": {"map": _obj(
                name=_map_name(direction, version), type=key_type, map="verdict")}})
    chain = _obj(name=BASE_CHAIN)
    commands += [
        {"add": {"chain": {**chain, "type": "filter", "hook": "forward", "prio": 0,
                           "policy": "drop"}}},
        {"flush": {"chain": chain}},
    ]
    in_chain = _obj(chain=BASE_CHAIN)
    rules: list[list[dict[str, Any]]] = [
        [_match(_payload("icmpv6", "type"), {"set": list(_ND_TYPES)}), {"accept": None}],
        [_match({"ct": {"key": "state"}}, ["established", "related"], op="in"),
         {"accept": None}],
        [_match({"ct": {"key": "state"}}, "invalid", op="in"),
         {"counter": INVALID_COUNTER}, {"drop": None}],
    ]
    for direction, field in (("out", "saddr"), ("in", "daddr")):
        rules += _dispatch(direction, field)
    for version, protocol in _PROTOCOL.items():
        rules.append([_match(_payload(protocol, "saddr"), "@" + _map_name("out", version)),
                      {"accept": None}])
    commands += [{"add": {"rule": {**in_chain, "expr": expr}}} for expr in rules]
    for chain_name, hook, prio, field, kind in (
        (NAT_IN_CHAIN, "prerouting", -100, "daddr", DNAT),
        (NAT_OUT_CHAIN, "postrouting", 100, "saddr", SNAT),
    ):
        nat_chain = _obj(name=chain_name)
        commands += [
            {"add": {"chain": {**nat_chain, "type": "nat", "hook": hook, "prio": prio,
                               "policy": "accept"}}},
            {"flush": {"chain": nat_chain}},
        ]
        commands += [{"add": {"rule": {**_obj(chain=chain_name), "expr": expr}}}
                     for expr in _dispatch(kind, field)]
    return commands


def _dispatch(direction: str, field: str) -> list[list[dict[str, Any]]]:
    """Rules that send packets to VM chains by address, through the maps of `direction`
    (one per IP version)."""
    return [[{"vmap": {"key": _payload(protocol, field),
                       "data": "@" + _map_name(direction, version)}}]
            for version, protocol in _PROTOCOL.items()]


def _rule_exprs(rule: Rule, peer_field: str) -> list[list[dict[str, Any]]]:
    """The match expressions of one allow rule: one list per nft rule it expands to."""
    # Peers split by family; a family is rendered only if the rule names peers of it.
    families: list[tuple[int | None, list[IPNetwork]]]
    if rule.peers:
        families = []
        for version in (4, 6):
            networks = [n for n in rule.peers if n.version == version]
            if networks:
                collapsed = list(ipaddress.collapse_addresses(networks))  # type: ignore[arg-type]
                # A /0 peer means "anywhere in this family": match the family only.
                families.append((version, [] if collapsed[0].prefixlen == 0 else collapsed))
    else:
        families = [(None, [])]

    expanded: list[list[dict[str, Any]]] = []
    for version, networks in families:
        family_match: list[dict[str, Any]] = []
        if networks:
            protocol = _PROTOCOL[version]
            family_match.append(_match(_payload(protocol, peer_field),
                                       _one_or_set([_network_value(n) for n in networks])))
        elif version is not None:
            family_match.append(_match({"meta": {"key": "nfproto"}},
                                       "ipv4" if version == 4 else "ipv6"))

        if rule.proto == "icmp":
            icmp_versions = (4, 6) if version is None else (version,)
            for icmp_version in icmp_versions:
                icmp = "icmp" if icmp_version == 4 else "icmpv6"
                expanded.append([*family_match,
                                 _match(_payload(icmp, "type"), "echo-request")])
        elif rule.proto in ("tcp", "udp"):
            if rule.ports:
                proto_match = _match(_payload(rule.proto, "dport"),
                                     _one_or_set(sorted(set(rule.ports))))
            else:
                proto_match = _match({"meta": {"key": "l4proto"}}, rule.proto)
            expanded.append([*family_match, proto_match])
        else:  # any
            expanded.append(family_match)
    return expanded


def render_vm_policy(definition: VMDefinition, mark: int) -> list[dict[str, Any]]:
    """Commands that add (or, on an installed VM, replace) one VM's policy.

    Replacing keeps the VM's drop counters. Stale map elements of a replaced VM's former
    addresses are not covered here (the renderer does not know them): see `Firewall.install_vm`.
    """
    if not 1 <= mark <= MARK_MAX:
        raise FirewallError(f"VM {definition.name}: ct mark {mark} is not in 1..{MARK_MAX}")
    name = definition.name
    commands: list[dict[str, Any]] = []
    for direction, rules, peer_field, allow in (
        ("out", definition.policy.outbound, "daddr", {"return": None}),
        ("in", definition.policy.inbound, "saddr", {"accept": None}),
    ):
        chain = _obj(name=vm_chain(name, direction))
        in_chain = _obj(chain=vm_chain(name, direction))
        counter = vm_drop_counter(name, direction)
        # Inbound only: the hook chains (added, never flushed: other engines fill them).
        hooks = [vm_in_hook(name, position) for position in ("head", "tail")] \
            if direction == "in" else []
        commands += [{"add": {"chain": _obj(name=hook)}} for hook in hooks]
        commands += [
            {"add": {"counter": _obj(name=counter)}},
            {"add": {"chain": chain}},
            {"flush": {"chain": chain}},
            {"add": {"rule": {**in_chain, "expr": [
                {"mangle": {"key": {"ct": {"key": "mark"}}, "value": mark}}]}}},
        ]
        if hooks:
            commands.append({"add": {"rule": {**in_chain, "expr": [
                {"jump": {"target": hooks[0]}}]}}})
        for rule in rules:
            for exprs in _rule_exprs(rule, peer_field):
                commands.append({"add": {"rule": {**in_chain, "expr": [*exprs, allow]}}})
        if hooks:
            commands.append({"add": {"rule": {**in_chain, "expr": [
                {"jump": {"target": hooks[1]}}]}}})
        commands.append({"add": {"rule": {**in_chain, "expr": [{"counter": counter},
                                                                {"drop": None}]}}})
    for address in definition.addresses:
        # The outbound chain returns to the base chain, so it is entered with jump.
        for direction, verdict in (("out", "jump"), ("in", "goto")):
            commands.append({"add": {"element": _obj(
                name=_map_name(direction, address.version),
                elem=[[str(address), {verdict: {"target": vm_chain(name, direction)}}]])}})
    return commands + _render_floating(definition)


def _render_floating(definition: VMDefinition) -> list[dict[str, Any]]:
    """The 1:1 NAT between each floating address of a VM and its own address of that IP
    version (NAT66 for IPv6), if it has any."""
    commands: list[dict[str, Any]] = []
    for floating, interface in definition.network.floating:
        protocol = _PROTOCOL[floating.version]
        for kind, key, exprs in (
            (DNAT, floating, [{"dnat": {"family": protocol, "addr": str(interface.ip)}}]),
            # Traffic within the VM's own network keeps the VM's address.
            (SNAT, interface.ip, [
                _match(_payload(protocol, "daddr"), _network_value(interface.network),
                       op="!="),
                {"snat": {"family": protocol, "addr": str(floating)}}]),
        ):
            map_name = _map_name(kind, floating.version)
            chain = vm_chain(definition.name, map_name)
            commands += [
                {"add": {"chain": _obj(name=chain)}},
                {"flush": {"chain": _obj(name=chain)}},
                {"add": {"rule": {**_obj(chain=chain), "expr": exprs}}},
                {"add": {"element": _obj(name=map_name,
                                         elem=[[str(key), {"goto": {"target": chain}}]])}},
            ]
    return commands


def _element_removal(address: IPAddress) -> list[dict[str, Any]]:
    return [{"delete": {"element": _obj(name=_map_name(direction, address.version),
                                        elem=[str(address)])}}
            for direction in ("out", "in")]


def _nat_removal(name: str, nat_keys: dict[str, set[IPAddress]]) -> list[dict[str, Any]]:
    """Commands that remove a VM's 1:1 NAT: its NAT map elements, then the NAT chains they
    lead to (each named like its map)."""
    commands: list[dict[str, Any]] = []
    for map_name, keys in sorted(nat_keys.items()):
        commands += [{"delete": {"element": _obj(name=map_name, elem=[str(key)])}}
                     for key in sorted(keys, key=str)]
    for map_name in sorted(nat_keys):
        chain = _obj(name=vm_chain(name, map_name))
        commands += [{"flush": {"chain": chain}}, {"delete": {"chain": chain}}]
    return commands


def render_vm_removal(name: str, addresses: Iterable[IPAddress],
                      nat_keys: dict[str, set[IPAddress]] | None = None) -> list[dict[str, Any]]:
    """Commands that remove an installed VM's policy: its map elements (the VM's addresses
    as installed; `nat_keys`: its NAT map elements by map, if it has a floating address),
    chains and counters."""
    commands: list[dict[str, Any]] = _nat_removal(name, nat_keys or {})
    for address in addresses:
        commands += _element_removal(address)
    chains = [vm_chain(name, "out"), vm_chain(name, "in"), vm_in_hook(name, "head"),
              vm_in_hook(name, "tail")]  # the inbound chain jumps to the hooks: delete it first
    for chain in chains:
        # "add" first: a policy installed before the hooks existed is removed all the same.
        commands += [{"add": {"chain": _obj(name=chain)}}, {"flush": {"chain": _obj(name=chain)}},
                     {"delete": {"chain": _obj(name=chain)}}]
    for direction in ("out", "in"):
        commands.append({"delete": {"counter": _obj(name=vm_drop_counter(name, direction))}})
    return commands


# ---------------------------------------------------------------------------------------------
# I/O against the kernel.


class _TableState:
    """What the kernel holds in the host table, parsed from `nft -j list table`."""

    def __init__(self, listing: list[dict[str, Any]]) -> None:
        self.marks: dict[str, int] = {}
        self.addresses: dict[str, set[IPAddress]] = {}
        self.counters: dict[str, int] = {}
        # VM -> NAT map name -> keys (floating addresses in dnat4/6, VM addresses in snat4/6).
        self.nat_keys: dict[str, dict[str, set[IPAddress]]] = {}
        vm_names: set[str] = set()
        for item in listing:
            if "chain" in item and (found := _VM_CHAIN.match(item["chain"]["name"])):
                vm_names.add(found.group(1))
            elif "counter" in item:
                self.counters[item["counter"]["name"]] = item["counter"]["packets"]
            elif "map" in item:
                map_name = item["map"]["name"]
                for key, verdict in item["map"].get("elem", []):
                    # {"jump": {"target": chain}}; other verdicts ({"drop": null}) are not ours.
                    target = next(iter(verdict.values())) or {}
                    if not (found := _VM_CHAIN.match(target.get("target", ""))):
                        continue
                    address = ipaddress.ip_address(key)
                    if map_name.startswith("out"):
                        self.addresses.setdefault(found.group(1), set()).add(address)
                    elif _NAT_MAP.match(map_name):
                        self.nat_keys.setdefault(found.group(1), {}).setdefault(
                            map_name, set()).add(address)
            elif "rule" in item and (found := _VM_CHAIN.match(item["rule"]["chain"])):
                for expr in item["rule"]["expr"]:
                    if expr.get("mangle", {}).get("key") == {"ct": {"key": "mark"}}:
                        self.marks.setdefault(found.group(1), expr["mangle"]["value"])
        for name in vm_names:
            if name not in self.marks:
                raise FirewallError(f"table {FAMILY} {TABLE}: VM {name} has no ct mark rule")
            self.addresses.setdefault(name, set())


def _one_line(error: str) -> str:
    """nft's error messages without locations and command echoes, deduplicated, on one line."""
    messages: list[str] = []
    for line in error.splitlines():
        _, found, message = line.partition("Error: ")
        if found and message.strip() not in messages:
            messages.append(message.strip())
    return "; ".join(messages) or " ".join(error.split()) or "unknown nft error"


class Firewall:
    """The host's firewall. Create and use it inside the host's network namespace."""

    def __init__(self) -> None:
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        # install_vm reads the table, then writes it: keep concurrent callers apart.
        self._lock = threading.Lock()

    def _run(self, commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise FirewallError(f"{what}: {_one_line(error)}")
        return output["nftables"] if output else []

    def _table_exists(self) -> bool:
        tables = self._run([{"list": {"tables": {"family": FAMILY}}}], "list tables")
        return any(item.get("table", {}).get("name") == TABLE for item in tables)

    def _state(self) -> _TableState:
        if not self._table_exists():
            raise FirewallError(f"table {FAMILY} {TABLE} is missing: run ensure_base() first")
        listing = self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}],
                            "list table")
        return _TableState(listing)

    def ensure_base(self) -> None:
        """Create the host table (if missing) and route bridged traffic through it."""
        _enable_bridge_netfilter()
        with self._lock:
            self._run(render_base(), f"create table {FAMILY} {TABLE}")

    def install_vm(self, definition: VMDefinition, mark: int) -> None:
        """Install a VM's policy, or replace it if installed, in one atomic transaction."""
        commands = render_vm_policy(definition, mark)
        with self._lock:
            state = self._state()
            for other, addresses in state.addresses.items():
                if other != definition.name and (taken := addresses & set(definition.addresses)):
                    raise FirewallError(f"install VM {definition.name}: address "
                                        f"{min(taken, key=str)} belongs to {other}")
            for floating, _ in definition.network.floating:
                for other, nat_keys in state.nat_keys.items():
                    owned = nat_keys.get(_map_name(DNAT, floating.version), set())
                    if other != definition.name and floating in owned:
                        raise FirewallError(f"install VM {definition.name}: floating address "
                                            f"{floating} belongs to {other}")
            installed = state.addresses.get(definition.name, set())
            stale = installed - set(definition.addresses)
            removal = [c for address in sorted(stale, key=str) for c in _element_removal(address)]
            # A replaced VM's NAT is rendered afresh (its floating address may have changed).
            removal += _nat_removal(definition.name, state.nat_keys.get(definition.name, {}))
            self._run(removal + commands, f"install VM {definition.name}")

    def remove_vm(self, name: str) -> None:
        """Remove a VM's policy atomically; nothing happens if it is not installed."""
        with self._lock:
            state = self._state()
            if name not in state.marks:
                return
            self._run(render_vm_removal(name, sorted(state.addresses[name], key=str),
                                        state.nat_keys.get(name)),
                      f"remove VM {name}")

    def installed_vms(self) -> dict[str, int]:
        """Installed VMs and their ct marks, as the kernel holds them."""
        return dict(self._state().marks)

    def counters(self) -> dict[str, int]:
        """Packet counts of the named counters (`invalid_drops`, `vm_<name>_<in|out>_drops`)."""
        return dict(self._state().counters)

    def flush_conntrack(self, mark: int) -> None:
        """Delete the conntrack entries (IPv4 and IPv6) that carry `mark`."""
        if not 1 <= mark <= MARK_MAX:
            raise FirewallError(f"ct mark {mark} is not in 1..{MARK_MAX}")
        # One kernel-filtered flush request; AF_UNSPEC covers both address families.
        ctnetlink = NFCTSocket(nfgen_family=socket.AF_UNSPEC)
        try:
            ctnetlink.flush(mark=mark, mark_mask=MARK_MAX)
        except NetlinkError as exc:
            raise FirewallError(f"flush conntrack mark {mark:#x}: {exc.args[-1]}") from None
        finally:
            ctnetlink.close()

    def destroy(self) -> None:
        """Delete the whole host table (all VMs' policies with it); no error if absent."""
        with self._lock:
            if self._table_exists():
                self._run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}],
                          f"delete table {FAMILY} {TABLE}")


def _enable_bridge_netfilter() -> None:
    """Send bridged IPv4/IPv6 through the inet hooks (per network namespace)."""
    if not _BRIDGE_SYSCTL_DIR.is_dir():
        # br_netfilter may be a module on hosts other than the lab's kernel.
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True, check=False)
    for sysctl in _BRIDGE_SYSCTLS:
        path = _BRIDGE_SYSCTL_DIR / sysctl
        try:
            path.write_text("1\n")
        except OSError as exc:
            raise FirewallError(f"cannot enable {path}: {exc.strerror}") from None
