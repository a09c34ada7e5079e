"""Per-VM intrusion prevention (IPS) whose state migrates with the VM.

Detection, prevention and migration of a VM's `[policy.ips]` (`nseh.definition.IpsPolicy`).

Where it runs
-------------
Only packets that open a connection reach a VM's inbound chain (the base chain accepts
established traffic first), so the IPS sees connections, never the packets inside them. The
firewall gives every VM's inbound chain two hook chains that the IPS fills (`inet nseh`)::

    chain vm_<name>_in { ct mark set <mark>; jump vm_<name>_in_head;
                         <allow rules>; jump vm_<name>_in_tail; counter ... drop }
    chain vm_<name>_in_head {
        ip saddr @vm_<name>_block4 counter name vm_<name>_ips_drops drop    # the blocklist
        ip6 saddr @vm_<name>_block6 counter name vm_<name>_ips_drops drop
        # connection limit per source, in the kernel: over the limit, block at once
        add @vm_<name>_conns4 { ip saddr ct count over N }
            add @vm_<name>_block4 { ip saddr timeout <block_seconds>s }
            log group G prefix "nseh-ips <name> limit" counter name ... drop
        (same for IPv6)
        # brute force: new TCP connections to protected ports go to userspace
        ct status ! confirmed tcp dport { <ports> } limit rate 100/second log group G
            prefix "nseh-ips <name> new"
    }
    chain vm_<name>_in_tail {      # reached only by what the policy is about to drop
        ct status ! confirmed limit rate 100/second log group G prefix "nseh-ips <name> closed"
    }
    set vm_<name>_block4 { type ipv4_addr; flags dynamic,timeout }   # + block6, conns4/6

`ct status ! confirmed` keeps retransmitted SYNs of one connection from counting twice. The
`limit` statements cap what Python can be asked to look at per VM; above them events are
lost, never queued (a flood cannot starve the agent; detection just sees a sample).

Detection
---------
The connection limit is enforced by the kernel (`ct count`), which blocks the source itself
and logs a `limit` event. Port scans and brute force are decided in userspace by a pure state
machine per VM (`nseh.agent.ipsdetect.Detector`), fed by NFLOG (`nseh.agent.nflog`) with one
event per logged packet: the prefix names the VM and the kind, the packet's first bytes give
source, protocol and port. A detection adds the source to the VM's blocklist with the
policy's `block_seconds`; the kernel expires it. Operators list, add and remove blocks
(`IpsEngine.blocks/block/unblock`). Every block and unblock is logged.

What migrates (the `SecurityEngine` interface)
----------------------------------------------
- policy: the VM's `IpsPolicy` (JSON), installed on the destination before QEMU starts;
- records (versioned JSON, one object per record, `RECORD_VERSION`):
  `block`: a blocklist element with its whole timeout and what is left of it, in ms (read
  from nft's text listing: its JSON output truncates both to seconds), re-added on the
  destination with `timeout T expires E`; `track`: one source's detection in progress (closed
  ports and connection times as ages, see `ipsdetect`). Deletes carry only kind and source;
- changes: a collection reads the blocks of the sources touched since the last one (every
  block change touches its source, kernel-made blocks through their NFLOG event), and the
  whole blocklist only after an NFLOG overrun or when many sources were touched
  (`IpsTracker`); detector sources are marked when an event touches them;
- scope on the destination: a record is taken only if it names the VM, has a source of an
  address family the VM has and that is not one of the VM's own addresses, a block within
  1 ms..`MAX_BLOCK_SECONDS`, and a detection no bigger than the VM's thresholds.

Not carried: the kernel's per-source connection counts (`ct count` lists cannot be written
from userspace; a source's connections that moved are not counted on the destination until
they are replaced by new ones). A blocked source's *established* connections are not cut
(blocks act on new connections).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import nftables

from nseh.agent.engines import ApplyResult, Delta, VMScope
from nseh.agent.firewall import FAMILY, TABLE, vm_in_hook
from nseh.agent.ipsdetect import Detection, Detector, Event, EventKind, SourceState
from nseh.agent.nflog import LoggedPacket, NflogError, NflogSocket, packet_header
from nseh.definition import MAX_BLOCK_SECONDS, IpsPolicy

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

GROUP = 7472  # the host's NFLOG group for IPS events
LOG_RATE = 100  # logged packets per second and VM, per kind (burst twice that)
PREFIX = "nseh-ips"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 1 << 20
# A block whose deadline moved less than this between two collections did not change.
DEADLINE_TOLERANCE = 0.25
# Above this many touched sources a collection reads the whole blocklist (one nft call)
# rather than one element per source.
MAX_TOUCHED_READ = 32

_PREFIX = re.compile(rf"^{PREFIX} ([a-z][a-z0-9-]{{0,10}}) (closed|new|limit)$")
_ELEMENT = re.compile(r"([0-9a-fA-F:.]+) timeout ([0-9dhms]+) expires ([0-9dhms]+)")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")


class IpsError(RuntimeError):
    """An IPS operation failed; the message is one line."""


class RecordError(ValueError):
    """A record that is not a valid IPS record; the message is one line."""


@dataclass(frozen=True, slots=True)
class Block:
    """A blocklist element: the block's whole duration and what is left of it."""

    source: IPAddress
    timeout_ms: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class RecordKey:
    vm: str
    kind: Literal["block", "track"]
    source: IPAddress


# ---------------------------------------------------------------------------------------------
# Names and rendering (pure): libnftables JSON commands.


def block_set(name: str, version: int) -> str:
    return f"vm_{name}_block{version}"


def conns_set(name: str, version: int) -> str:
    return f"vm_{name}_conns{version}"


def ips_drop_counter(name: str) -> str:
    return f"vm_{name}_ips_drops"


def log_prefix(name: str, kind: EventKind) -> str:
    return f"{PREFIX} {name} {kind.value}"


def _obj(**fields: Any) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, **fields}


def _saddr(version: int) -> dict[str, Any]:
    return {"payload": {"protocol": "ip" if version == 4 else "ip6", "field": "saddr"}}


def _log(name: str, kind: EventKind, group: int) -> dict[str, Any]:
    return {"log": {"prefix": log_prefix(name, kind), "group": group, "snaplen": 64}}


_UNCONFIRMED = {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "confirmed"}}
_LIMIT = {"limit": {"rate": LOG_RATE, "burst": 2 * LOG_RATE, "per": "second"}}


def render_ips(name: str, policy: IpsPolicy, group: int = GROUP) -> list[dict[str, Any]]:
    """Commands that install (or replace) a VM's IPS, once its sets exist (`render_ips_sets`).
    Replacing keeps the blocklists' elements and the drop counter; the hook chains are
    refilled."""
    head, tail = vm_in_hook(name, "head"), vm_in_hook(name, "tail")
    counter = ips_drop_counter(name)
    commands: list[dict[str, Any]] = [{"add": {"counter": _obj(name=counter)}}]
    for chain in (head, tail):
        commands += [{"add": {"chain": _obj(name=chain)}}, {"flush": {"chain": _obj(name=chain)}}]

    rules: list[tuple[str, list[dict[str, Any]]]] = []
    for version in (4, 6):
        rules.append((head, [
            {"match": {"op": "==", "left": _saddr(version),
                       "right": "@" + block_set(name, version)}},
            {"counter": counter}, {"drop": None}]))
    if policy.max_connections_per_source is not None:
        for version in (4, 6):
            rules.append((head, [
                {"set": {"op": "add", "elem": _saddr(version),
                         "set": "@" + conns_set(name, version),
                         "stmt": [{"ct count": {"val": policy.max_connections_per_source,
                                                "inv": True}}]}},
                {"set": {"op": "add", "set": "@" + block_set(name, version),
                         "elem": {"elem": {"val": _saddr(version),
                                           "timeout": policy.block_seconds}}}},
                _log(name, EventKind.LIMIT, group), {"counter": counter}, {"drop": None}]))
    if policy.bruteforce is not None:
        ports = sorted(policy.bruteforce.ports)
        rules.append((head, [
            _UNCONFIRMED,
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": ports[0] if len(ports) == 1 else {"set": ports}}},
            _LIMIT, _log(name, EventKind.NEW, group)]))
    if policy.portscan is not None:
        rules.append((tail, [_UNCONFIRMED, _LIMIT, _log(name, EventKind.CLOSED, group)]))
    commands += [{"add": {"rule": _obj(chain=chain, expr=expr)}} for chain, expr in rules]
    return commands


def render_ips_sets(name: str) -> str:
    """nft commands (text) that create a VM's sets as `dynamic`, so that the kernel lets
    rules add to them (the connection limit), also when a later policy starts doing so. nft's
    JSON (1.0.6) has no such flag; run these before `render_ips`'s commands. Idempotent."""
    lines: list[str] = []
    for version in (4, 6):
        key = "ipv4_addr" if version == 4 else "ipv6_addr"
        lines += [f"add set {FAMILY} {TABLE} {block_set(name, version)} "
                  f"{{ type {key}; flags dynamic,timeout; }}",
                  f"add set {FAMILY} {TABLE} {conns_set(name, version)} "
                  f"{{ type {key}; flags dynamic; }}"]
    return "\n".join(lines)


def render_ips_removal(name: str, existing: Iterable[str]) -> list[dict[str, Any]]:
    """Commands that remove a VM's IPS objects, of those that `existing` names (the firewall
    may already have removed the hook chains with the VM's policy)."""
    present = set(existing)
    commands: list[dict[str, Any]] = []
    for position in ("head", "tail"):
        chain = vm_in_hook(name, position)
        if chain in present:
            # The chain's rules reference the sets: empty it; the firewall owns the chain.
            commands.append({"flush": {"chain": _obj(name=chain)}})
    for version in (4, 6):
        for set_name in (block_set(name, version), conns_set(name, version)):
            if set_name in present:
                commands.append({"delete": {"set": _obj(name=set_name)}})
    if ips_drop_counter(name) in present:
        commands.append({"delete": {"counter": _obj(name=ips_drop_counter(name))}})
    return commands


def element_commands(name: str, blocks: Iterable[Block], unblocks: Iterable[IPAddress]) -> str:
    """nft commands (text: JSON cannot give timeouts in ms) that set blocks and remove
    others; an existing element is replaced, an absent one deleted without an error."""
    lines: list[str] = []
    for source in unblocks:
        where = f"{FAMILY} {TABLE} {block_set(name, source.version)}"
        # add-then-delete removes the element whether or not it existed, in one transaction.
        lines += [f"add element {where} {{ {source} }}", f"delete element {where} {{ {source} }}"]
    for block in blocks:
        where = f"{FAMILY} {TABLE} {block_set(name, block.source.version)}"
        lines += [f"add element {where} {{ {block.source} }}",
                  f"delete element {where} {{ {block.source} }}",
                  f"add element {where} {{ {block.source} timeout {block.timeout_ms}ms "
                  f"expires {block.expires_ms}ms }}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Parsing (pure).


def parse_duration_ms(text: str) -> int:
    """nft's time format ("1d2h3m4s5ms", "5m", "80ms") in milliseconds."""
    found = _DURATION.match(text)
    if not text or found is None:
        raise IpsError(f"cannot read nft duration {text!r}")
    days, hours, minutes, seconds, millis = (int(part or 0) for part in found.groups())
    return (((days * 24 + hours) * 60 + minutes) * 60 + seconds) * 1000 + millis


def parse_blocks(listing: str) -> list[Block]:
    """The elements of blocklist sets in nft's text listing (`nft list set ...`)."""
    blocks: list[Block] = []
    for address, timeout, expires in _ELEMENT.findall(listing):
        try:
            source = ipaddress.ip_address(address)
        except ValueError:
            raise IpsError(f"blocklist element {address!r} is not an address") from None
        blocks.append(Block(source, parse_duration_ms(timeout), parse_duration_ms(expires)))
    return blocks


def parse_event(packet: LoggedPacket, now: float) -> tuple[str, Event] | None:
    """(VM name, event) of an IPS log message; None for other prefixes or bad packets."""
    found = _PREFIX.match(packet.prefix)
    if found is None:
        return None
    try:
        header = packet_header(packet.family, packet.payload)
    except NflogError:
        return None
    return found.group(1), Event(EventKind(found.group(2)), header.source, header.protocol,
                                 header.port, now)


# ---------------------------------------------------------------------------------------------
# Records (pure): versioned JSON objects.


def encode_record(vm: str, record: Block | SourceState) -> bytes:
    data: dict[str, Any] = {"v": RECORD_VERSION, "vm": vm, "source": str(record.source)}
    if isinstance(record, Block):
        data |= {"kind": "block", "timeout_ms": record.timeout_ms,
                 "expires_ms": record.expires_ms}
    else:
        data |= {"kind": "track", "closed": [list(item) for item in record.closed],
                 "connections": list(record.connections)}
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def encode_key(key: RecordKey) -> bytes:
    return json.dumps({"v": RECORD_VERSION, "vm": key.vm, "kind": key.kind,
                       "source": str(key.source)}, separators=(",", ":"),
                      sort_keys=True).encode()


def _integer(data: dict[str, Any], name: str, low: int, high: int) -> int:
    value = data.get(name)
    if type(value) is not int or not low <= value <= high:
        raise RecordError(f"{name} {value!r} is not an integer in {low}..{high}")
    return value


def _age(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= 86_400:
        raise RecordError(f"age {value!r} is not a number of seconds in 0..86400")
    return float(value)


def decode_record(data: bytes) -> tuple[RecordKey, Block | SourceState | None]:
    """A record (or a delete's key: then the value is None); RecordError if malformed."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(data)} bytes is larger than {MAX_RECORD_BYTES}")
    try:
        fields = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(fields, dict) or fields.get("v") != RECORD_VERSION:
        raise RecordError(f"not a version {RECORD_VERSION} IPS record")
    vm, kind = fields.get("vm"), fields.get("kind")
    if not isinstance(vm, str) or kind not in ("block", "track"):
        raise RecordError("record without a VM name or with an unknown kind")
    try:
        source = ipaddress.ip_address(fields.get("source"))
    except ValueError:
        raise RecordError(f"source {fields.get('source')!r} is not an address") from None
    key = RecordKey(vm, kind, source)
    if kind == "block":
        if "timeout_ms" not in fields:
            return key, None
        limit = MAX_BLOCK_SECONDS * 1000
        timeout = _integer(fields, "timeout_ms", 1, limit)
        expires = _integer(fields, "expires_ms", 1, timeout)
        return key, Block(source, timeout, expires)
    if "closed" not in fields:
        return key, None
    closed, connections = fields.get("closed"), fields.get("connections")
    if not isinstance(closed, list) or not isinstance(connections, list):
        raise RecordError("track record without closed and connections lists")
    ports: list[tuple[int, int, float]] = []
    for item in closed:
        if not (isinstance(item, list) and len(item) == 3):
            raise RecordError(f"closed port {item!r} is not [protocol, port, age]")
        ports.append((_integer({"protocol": item[0]}, "protocol", 0, 255),
                      _integer({"port": item[1]}, "port", 1, 65535), _age(item[2])))
    return key, SourceState(source, tuple(ports), tuple(_age(age) for age in connections))


def scope_reason(vm: VMScope, policy: IpsPolicy, key: RecordKey,
                 value: Block | SourceState | None) -> str | None:
    """Why a record does not belong to `vm` as the destination configured it, or None."""
    if key.vm != vm.name:
        return f"record of VM {key.vm!r}"
    if key.source in vm.addresses:
        return f"source {key.source} is the VM's own address"
    if key.source.version not in {address.version for address in vm.addresses}:
        return f"source {key.source} is of an address family the VM does not have"
    if isinstance(value, SourceState):
        scan, brute = policy.portscan, policy.bruteforce
        if value.closed and (scan is None or len(value.closed) > scan.ports):
            return f"{len(value.closed)} closed ports exceed the VM's port-scan threshold"
        if value.connections and (brute is None or len(value.connections) > brute.connections):
            return f"{len(value.connections)} connections exceed the VM's brute-force threshold"
    return None


# ---------------------------------------------------------------------------------------------
# The engine (I/O).


@dataclass
class _VmIps:
    scope: VMScope
    policy: IpsPolicy
    detector: Detector


class IpsTracker:
    """A VM's IPS changes since the last collection (none for a VM without an IPS). Its file
    descriptor (an eventfd) turns readable when a source was touched.

    Every change of a blocklist or of a detection in progress touches its source: detections
    and operators' blocks here, and the kernel's own blocks (connection limit) through the
    one NFLOG event each of them logs. So a collection reads only the touched sources' blocks,
    unless NFLOG events were lost (socket overrun) or many sources were touched: then the
    whole blocklist is read and diffed (a resync of the blocks)."""

    def __init__(self, engine: IpsEngine, name: str, blocks: dict[IPAddress, float],
                 overruns: int) -> None:
        self.engine = engine
        self.name = name
        self.blocks = blocks  # source -> deadline on this host's clock, as last collected
        self.overruns = overruns  # the NFLOG socket's overruns, as last collected
        self.touched: set[IPAddress] = set()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def touch(self, source: IPAddress) -> None:
        self.touched.add(source)
        os.eventfd_write(self._fd, 1)

    def fileno(self) -> int:
        return self._fd

    def collect(self) -> Delta:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        return self.engine._collect(self)

    def close(self) -> None:
        self.engine._untrack(self)
        os.close(self._fd)


class IpsEngine:
    """The IPS of every VM of this host. Create it (and call `start`) inside the host's network
    namespace; thread-safe (the agent's event loop feeds it, SC transfer threads read it)."""

    name = "ips"

    def __init__(self, *, group: int = GROUP, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.group = group
        self.clock = clock
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._text = nftables.Nftables()  # for element timeouts in ms, both ways
        self._lock = threading.RLock()
        self._vms: dict[str, _VmIps] = {}
        self._trackers: dict[str, list[IpsTracker]] = {}
        self._nflog: NflogSocket | None = None

    # -- nft -------------------------------------------------------------------------------

    def _run(self, commands: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
        rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise IpsError(f"{what}: {' '.join(error.split())}")
        return output["nftables"] if output else []

    def _run_text(self, commands: str, what: str) -> str:
        rc, output, error = self._text.cmd(commands)
        if rc != 0:
            raise IpsError(f"{what}: {' '.join(error.split())}")
        return str(output)

    def _existing(self) -> set[str]:
        """Names of the chains, sets and counters in the host table (empty if none)."""
        tables = self._run([{"list": {"tables": {"family": FAMILY}}}], "list tables")
        if not any(item.get("table", {}).get("name") == TABLE for item in tables):
            return set()
        listing = self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}],
                            "list table")
        return {body["name"] for item in listing for kind, body in item.items()
                if kind in ("chain", "set", "counter")}

    def _read_block(self, name: str, source: IPAddress) -> Block | None:
        """One source's block, None if it is not blocked."""
        rc, output, error = self._text.cmd(
            f"get element {FAMILY} {TABLE} {block_set(name, source.version)} {{ {source} }}")
        if rc != 0:
            if "No such file or directory" in error:
                return None
            raise IpsError(f"read the block of {source} for {name}: {' '.join(error.split())}")
        return next(iter(parse_blocks(str(output))), None)

    def _overruns(self) -> int:
        return self._nflog.overruns if self._nflog is not None else 0

    def _read_blocks(self, name: str) -> list[Block]:
        # One set per call: nft 1.0.6 finds only the first set of a multi-set listing.
        return [block for version in (4, 6) for block in parse_blocks(self._run_text(
            f"list set {FAMILY} {TABLE} {block_set(name, version)}",
            f"list the blocklists of {name}"))]

    def _vm(self, name: str) -> _VmIps:
        vm = self._vms.get(name)
        if vm is None:
            raise IpsError(f"VM {name} has no IPS on this host")
        return vm

    # -- detection ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start receiving IPS events (NFLOG) in the current network namespace."""
        self._nflog = NflogSocket(self.group)

    def stop(self) -> None:
        if self._nflog is not None:
            self._nflog.close()
            self._nflog = None

    def fileno(self) -> int:
        if self._nflog is None:
            raise IpsError("the IPS is not started")
        return self._nflog.fileno()

    def poll(self) -> list[tuple[str, Detection]]:
        """Read the pending events and act on them; the detections made."""
        if self._nflog is None:
            raise IpsError("the IPS is not started")
        try:
            packets = self._nflog.read_pending()
        except NflogError as exc:
            log.error("IPS events: %s", exc)
            return []
        return self.process(packets, self.clock())

    def process(self, packets: Iterable[LoggedPacket], now: float) -> list[tuple[str, Detection]]:
        """Feed logged packets to their VMs' detectors; block the sources detected."""
        detections: list[tuple[str, Detection]] = []
        with self._lock:
            for packet in packets:
                parsed = parse_event(packet, now)
                vm = self._vms.get(parsed[0]) if parsed else None
                if parsed is None or vm is None:
                    continue
                event = parsed[1]
                for tracker in self._trackers.get(vm.scope.name, []):
                    tracker.touch(event.source)
                detection = vm.detector.observe(event)
                if detection is not None:
                    detections.append((vm.scope.name, detection))
            blocks: dict[str, list[Block]] = {}
            for name, detection in detections:
                policy = self._vms[name].policy
                log.warning("IPS %s: blocked %s for %d s: %s", name, detection.source,
                            policy.block_seconds, detection.reason)
                if not detection.by_kernel:
                    ms = policy.block_seconds * 1000
                    blocks.setdefault(name, []).append(Block(detection.source, ms, ms))
            for name, added in blocks.items():
                self._run_text(element_commands(name, added, []), f"block sources of {name}")
            for vm in self._vms.values():
                vm.detector.expire(now)
        return detections

    # -- operators ---------------------------------------------------------------------------

    def blocks(self, name: str) -> list[Block]:
        with self._lock:
            self._vm(name)
            return self._read_blocks(name)

    def block(self, name: str, source: IPAddress, seconds: int | None = None) -> Block:
        """Block `source` for `seconds` (the VM's `block_seconds` if None)."""
        with self._lock:
            vm = self._vm(name)
            ms = (seconds if seconds is not None else vm.policy.block_seconds) * 1000
            block = Block(source, ms, ms)
            reason = scope_reason(vm.scope, vm.policy, RecordKey(name, "block", source), block)
            if reason is not None or not 1 <= ms <= MAX_BLOCK_SECONDS * 1000:
                raise IpsError(f"cannot block {source} for {name}: "
                               f"{reason or f'{ms // 1000} s is not in 1..{MAX_BLOCK_SECONDS}'}")
            self._run_text(element_commands(name, [block], []), f"block {source} for {name}")
            vm.detector.forget(source)
            for tracker in self._trackers.get(name, []):
                tracker.touch(source)  # its detection in progress is gone: a delete to send
            log.warning("IPS %s: blocked %s for %d s by an operator", name, source, ms // 1000)
            return block

    def unblock(self, name: str, source: IPAddress) -> bool:
        """Remove a block, and the source's detection in progress (the operator vouches for
        it: its detections start from zero); whether there was a block."""
        with self._lock:
            vm = self._vm(name)
            present = any(b.source == source for b in self._read_blocks(name))
            if present:
                self._run_text(element_commands(name, [], [source]),
                               f"unblock {source} for {name}")
                log.warning("IPS %s: unblocked %s by an operator", name, source)
            tracked = source in vm.detector.sources()
            vm.detector.forget(source)
            if present or tracked:
                for tracker in self._trackers.get(name, []):
                    tracker.touch(source)
            return present

    # -- SecurityEngine ----------------------------------------------------------------------

    def export_policy(self, vm: VMScope) -> Any:
        policy = vm.definition.policy.ips
        return None if policy is None else policy.model_dump(mode="json")

    def import_policy(self, vm: VMScope, document: Any) -> None:
        if document is None:
            self.purge(vm)
            return
        try:
            policy = IpsPolicy.model_validate(document)
        except ValueError as exc:
            raise IpsError(f"IPS policy of {vm.name}: {' '.join(str(exc).split())}") from None
        with self._lock:
            self._run_text(render_ips_sets(vm.name), f"create the IPS sets of {vm.name}")
            self._run(render_ips(vm.name, policy, self.group), f"install the IPS of {vm.name}")
            known = self._vms.get(vm.name)
            if known is None:
                self._vms[vm.name] = _VmIps(vm, policy, Detector(policy))
            else:
                known.scope, known.policy = vm, policy
                known.detector.reconfigure(policy, self.clock())

    def snapshot(self, vm: VMScope) -> list[bytes]:
        with self._lock:
            known = self._vms.get(vm.name)
            if known is None:
                return []
            records = [encode_record(vm.name, b) for b in self._read_blocks(vm.name)]
            records += [encode_record(vm.name, s) for s in known.detector.export(self.clock())]
            return records

    def track(self, vm: VMScope) -> IpsTracker:
        with self._lock:
            deadlines: dict[IPAddress, float] = {}
            if vm.name in self._vms:
                now = self.clock()
                deadlines = {b.source: now + b.expires_ms / 1000
                             for b in self._read_blocks(vm.name)}
            tracker = IpsTracker(self, vm.name, deadlines, self._overruns())
            self._trackers.setdefault(vm.name, []).append(tracker)
            return tracker

    def _collect(self, tracker: IpsTracker) -> Delta:
        with self._lock:
            name = tracker.name
            known = self._vms.get(name)
            if known is None:
                return Delta()
            now = self.clock()
            touched = sorted(tracker.touched, key=str)
            tracker.touched.clear()
            overruns = self._overruns()
            if overruns != tracker.overruns or len(touched) > MAX_TOUCHED_READ:
                tracker.overruns = overruns
                blocks = {b.source: b for b in self._read_blocks(name)}
                gone = tracker.blocks.keys() - blocks.keys()
            else:
                found = {s: self._read_block(name, s) for s in touched}
                blocks = {s: b for s, b in found.items() if b is not None}
                gone = {s for s, b in found.items() if b is None} & tracker.blocks.keys()
            delta = Delta()
            for source, block in blocks.items():
                before = tracker.blocks.get(source)
                if before is None or abs(before - (now + block.expires_ms / 1000)) > \
                        DEADLINE_TOLERANCE:
                    delta.upserts.append(encode_record(name, block))
                tracker.blocks[source] = now + block.expires_ms / 1000
            delta.deletes += [encode_key(RecordKey(name, "block", source)) for source in gone]
            for source in gone:
                del tracker.blocks[source]
            states = {s.source: s for s in known.detector.export(now, touched)}
            for source in touched:
                if source in states:
                    delta.upserts.append(encode_record(name, states[source]))
                else:
                    delta.deletes.append(encode_key(RecordKey(name, "track", source)))
            return delta

    def _untrack(self, tracker: IpsTracker) -> None:
        with self._lock:
            trackers = self._trackers.get(tracker.name, [])
            if tracker in trackers:
                trackers.remove(tracker)
            if not trackers:
                self._trackers.pop(tracker.name, None)

    def count(self, vm: VMScope) -> int:
        with self._lock:
            known = self._vms.get(vm.name)
            if known is None:
                return 0
            known.detector.expire(self.clock())
            return len(self._read_blocks(vm.name)) + len(known.detector)

    def purge(self, vm: VMScope) -> None:
        with self._lock:
            self._vms.pop(vm.name, None)
            commands = render_ips_removal(vm.name, self._existing())
            if commands:
                self._run(commands, f"remove the IPS of {vm.name}")

    def apply(self, vm: VMScope, upserts: list[bytes], deletes: list[bytes],
              replace: bool = False) -> ApplyResult:
        result = ApplyResult()
        with self._lock:
            known = self._vms.get(vm.name)
            if known is None:
                if upserts or deletes:
                    result.reject(len(upserts) + len(deletes), f"VM {vm.name} has no IPS here")
                return result
            now = self.clock()
            if replace:
                known.detector.clear()
                self._run([{"flush": {"set": _obj(name=block_set(vm.name, v))}} for v in (4, 6)],
                          f"flush the blocklists of {vm.name}")
            blocks: list[Block] = []
            unblocks: list[IPAddress] = []
            for items, deleting in ((deletes, True), (upserts, False)):
                for item in items:
                    try:
                        key, value = decode_record(item)
                    except RecordError as exc:
                        result.reject(1, f"malformed IPS record: {exc}")
                        continue
                    if (value is None) != deleting:
                        result.reject(1, f"IPS {key.kind} record of {key.source}: "
                                         f"{'a value' if deleting else 'no value'} in a "
                                         f"{'delete' if deleting else 'upsert'}")
                        continue
                    reason = scope_reason(vm, known.policy, key, value)
                    if reason is not None:
                        result.reject(1, f"{reason} (not IPS state of {vm.name})")
                        continue
                    if isinstance(value, Block):
                        blocks.append(value)
                    elif isinstance(value, SourceState):
                        known.detector.load(value, now)
                    elif key.kind == "block":
                        unblocks.append(key.source)
                    else:
                        known.detector.forget(key.source)
                    if deleting:
                        result.deleted += 1
                    else:
                        result.applied += 1
            if blocks or unblocks:
                self._run_text(element_commands(vm.name, blocks, unblocks),
                               f"apply the blocklists of {vm.name}")
        return result
