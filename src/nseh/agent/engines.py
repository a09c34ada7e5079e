"""Security engines: the host-side protections of a VM whose state migrates with it.

Every engine offers the same operations for one VM, so the migration orchestrator moves
any engine's security context (SC) without knowing what is inside:

- `export_policy` / `import_policy`: the engine's configuration for the VM (a JSON value),
  installed on the destination before its QEMU accepts the incoming stream;
- `snapshot`: the VM's whole state as opaque records (bytes);
- `track`: a `ChangeTracker` that collects what changes from now on;
- `check`: which received records really belong to the VM (destination side);
- `apply`: install records and deletions (destination side);
- `purge`: remove all of the VM's state.

The firewall engine is the first: its policy is the VM's nftables rules, its state the VM's
conntrack entries, kept as ctnetlink bytes end to end.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Protocol

from nseh.agent.conntrack import Conntrack, ConntrackEvents, EventsOverrun, EventType
from nseh.agent.ctnetlink import AddressScope, ConntrackFormatError, entry_key
from nseh.agent.firewall import Firewall
from nseh.definition import Policy, VMDefinition

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# At most this many rejection reasons are reported per batch; the count is always exact.
MAX_REASONS = 5


@dataclass(frozen=True)
class VMScope:
    """What an engine needs to know of a VM on this host."""

    definition: VMDefinition
    mark: int  # the VM's ct mark on *this* host

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def addresses(self) -> frozenset[IPAddress]:
        return frozenset(self.definition.addresses)


@dataclass
class Delta:
    """What changed since the last collection, in the order it must be applied: deletions
    first, then upserts. `resync` means `upserts` is a whole snapshot that replaces the
    destination's state (after lost change events)."""

    upserts: list[bytes] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    resync: bool = False

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


@dataclass
class ApplyResult:
    applied: int = 0
    created: int = 0  # of `applied`, records new on this host (the others updated one)
    deleted: int = 0
    stale: int = 0  # updates older than what this host has, skipped (see InsertResult)
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, count: int, reason: str) -> None:
        self.rejected += count
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    def merge(self, other: ApplyResult) -> None:
        self.applied += other.applied
        self.created += other.created
        self.deleted += other.deleted
        self.stale += other.stale
        self.rejected += other.rejected
        self.reasons.extend(other.reasons[: MAX_REASONS - len(self.reasons)])


class ChangeTracker(Protocol):
    def fileno(self) -> int: ...

    def collect(self) -> Delta: ...

    def close(self) -> None: ...


class SecurityEngine(Protocol):
    name: str

    def export_policy(self, vm: VMScope) -> Any: ...

    def import_policy(self, vm: VMScope, document: Any) -> None: ...

    def snapshot(self, vm: VMScope) -> list[bytes]: ...

    def track(self, vm: VMScope) -> ChangeTracker: ...

    def apply(self, vm: VMScope, upserts: list[bytes], deletes: list[bytes],
              replace: bool = False) -> ApplyResult: ...

    def count(self, vm: VMScope) -> int: ...

    def purge(self, vm: VMScope) -> None: ...


class ConntrackTracker:
    """Collects a VM's conntrack changes from kernel events.

    Per connection it keeps the events since the last collection in order (a DESTROY
    supersedes what came before it), because UPDATE events carry only what changed and need
    the earlier NEW to make a complete entry on the destination. An event-socket overrun
    turns the next collection into a full resync.
    """

    def __init__(self, vm: VMScope) -> None:
        self.vm = vm
        self.events = ConntrackEvents()
        self.pending: dict[bytes, list[tuple[EventType, bytes]]] = {}
        self.overrun = False

    def fileno(self) -> int:
        return self.events.fileno()

    def _read(self) -> None:
        try:
            for kind, entry in self.events.read_pending(self.vm.mark):
                key = entry_key(entry)
                if kind == EventType.DESTROY:
                    self.pending[key] = [(kind, entry)]
                else:
                    self.pending.setdefault(key, []).append((kind, entry))
        except EventsOverrun:
            self.overrun = True
            self.pending.clear()

    def collect(self) -> Delta:
        self._read()
        if self.overrun:
            self.overrun = False
            with Conntrack() as ct:
                return Delta(upserts=ct.dump(self.vm.mark), resync=True)
        delta = Delta()
        for events in self.pending.values():
            for kind, entry in events:
                if kind == EventType.DESTROY:
                    delta.deletes.append(entry)
                else:
                    delta.upserts.append(entry)
        self.pending.clear()
        return delta

    def close(self) -> None:
        self.events.close()


class FirewallEngine:
    """The per-VM stateful firewall: nftables policy + conntrack state."""

    name = "firewall"

    def __init__(self, firewall: Firewall) -> None:
        self.firewall = firewall

    def export_policy(self, vm: VMScope) -> Any:
        return vm.definition.policy.model_dump(mode="json")

    def import_policy(self, vm: VMScope, document: Any) -> None:
        policy = Policy.model_validate(document)
        self.firewall.install_vm(vm.definition.model_copy(update={"policy": policy}), vm.mark)

    def snapshot(self, vm: VMScope) -> list[bytes]:
        with Conntrack() as ct:
            return ct.dump(vm.mark)

    def track(self, vm: VMScope) -> ConntrackTracker:
        return ConntrackTracker(vm)

    def count(self, vm: VMScope) -> int:
        with Conntrack() as ct:
            return ct.count(vm.mark)

    def purge(self, vm: VMScope) -> None:
        with Conntrack() as ct:
            ct.flush(vm.mark)

    def _in_scope(self, vm: VMScope, entries: list[bytes], result: ApplyResult) -> list[bytes]:
        """The entries that are the VM's connections: in the default conntrack zone, with
        one of the VM's addresses in their tuples. Others are rejected and reported."""
        scope = AddressScope(vm.addresses)
        accepted: list[bytes] = []
        for entry in entries:
            try:
                reason = scope.reason_to_reject(entry)
            except ConntrackFormatError as exc:
                reason = f"malformed entry: {exc}"
            if reason is None:
                accepted.append(entry)
            else:
                result.reject(1, f"{reason} (not a connection of {vm.name})")
        return accepted

    def apply(self, vm: VMScope, upserts: list[bytes], deletes: list[bytes],
              replace: bool = False) -> ApplyResult:
        result = ApplyResult()
        deletes = self._in_scope(vm, deletes, result)
        upserts = self._in_scope(vm, upserts, result)
        with Conntrack() as ct:
            if replace:
                ct.flush(vm.mark)
            if deletes:
                result.deleted = ct.delete(deletes)
            if upserts:
                inserted = ct.insert(upserts, mark=vm.mark)
                result.applied = inserted.created + inserted.updated
                result.created = inserted.created
                result.stale = inserted.stale
                for _, code, summary in inserted.failures:
                    result.reject(1, f"kernel refused {summary}: error {code}")
        return result
