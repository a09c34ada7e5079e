"""The IPS detector of one VM: a pure state machine, no I/O and no clock of its own.

It is fed events (new connections to protected ports, attempts on closed ports) with their
timestamps, and answers with a `Detection` when a source crosses a threshold of the VM's
`IpsPolicy`; the engine then blocks the source. What it has learned so far — per source, the
closed ports touched and the recent connections to protected ports — is exported as
`SourceState`s with *ages* (seconds before "now"), because monotonic clocks of two hosts
cannot be compared; importing them on another host rebases the ages on that host's clock.

Windows are sliding: a port scan is "more than `portscan.ports` distinct closed (protocol,
port) pairs touched within the last `portscan.seconds`", brute force "more than
`bruteforce.connections` new connections to the protected ports within the last
`bruteforce.seconds`". Memory is bounded: at most `max_sources` sources are tracked (the one
seen longest ago is forgotten first), and per source at most threshold + 1 timestamps.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from nseh.definition import IpsPolicy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IPPROTO_TCP = 6
MAX_SOURCES = 4096


class EventKind(enum.Enum):
    CLOSED = "closed"  # a new connection the VM's policy drops: a closed port
    NEW = "new"  # a new TCP connection to a protected port
    LIMIT = "limit"  # the kernel blocked a source over its connection limit


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    source: IPAddress
    protocol: int
    port: int
    at: float  # seconds, on the caller's monotonic clock


@dataclass(frozen=True, slots=True)
class Detection:
    source: IPAddress
    reason: str
    by_kernel: bool = False  # the kernel blocked the source already (connection limit)


@dataclass(frozen=True, slots=True)
class SourceState:
    """A source's detection in progress, with ages in seconds (>= 0) instead of times."""

    source: IPAddress
    closed: tuple[tuple[int, int, float], ...] = ()  # (protocol, port, age)
    connections: tuple[float, ...] = ()  # ages of new connections to protected ports


@dataclass
class _Source:
    closed: dict[tuple[int, int], float] = field(default_factory=dict)  # -> last touched
    connections: deque[float] = field(default_factory=deque)

    def prune(self, policy: IpsPolicy, now: float) -> None:
        if policy.portscan is None:
            self.closed.clear()
        else:
            horizon = now - policy.portscan.seconds
            self.closed = {key: at for key, at in self.closed.items() if at > horizon}
        if policy.bruteforce is None:
            self.connections.clear()
        else:
            horizon = now - policy.bruteforce.seconds
            while self.connections and self.connections[0] <= horizon:
                self.connections.popleft()

    def __bool__(self) -> bool:
        return bool(self.closed or self.connections)


class Detector:
    def __init__(self, policy: IpsPolicy, *, max_sources: int = MAX_SOURCES) -> None:
        self.policy = policy
        self.max_sources = max_sources
        # Least recently seen first, so the oldest is evicted when the table is full.
        self._sources: OrderedDict[IPAddress, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def reconfigure(self, policy: IpsPolicy, now: float) -> None:
        self.policy = policy
        self.expire(now)

    def observe(self, event: Event) -> Detection | None:
        """Account for `event`; a detection means: block `event.source` now. The source's
        state is then forgotten (a blocked source sends nothing the VM's chains log)."""
        policy = self.policy
        if event.kind == EventKind.LIMIT:
            self.forget(event.source)
            limit = policy.max_connections_per_source
            return Detection(event.source, f"more than {limit} connections", by_kernel=True)
        if event.kind == EventKind.CLOSED:
            if policy.portscan is None or event.port == 0:
                return None
        elif (policy.bruteforce is None or event.protocol != IPPROTO_TCP
              or event.port not in policy.bruteforce.ports):
            return None
        state = self._touch(event.source)
        state.prune(policy, event.at)
        if event.kind == EventKind.CLOSED and policy.portscan is not None:
            state.closed[(event.protocol, event.port)] = event.at
            if len(state.closed) > policy.portscan.ports:
                self.forget(event.source)
                return Detection(event.source, f"port scan: {len(state.closed)} closed ports "
                                               f"within {policy.portscan.seconds} s")
        elif policy.bruteforce is not None:
            state.connections.append(event.at)
            if len(state.connections) > policy.bruteforce.connections:
                self.forget(event.source)
                ports = ",".join(map(str, policy.bruteforce.ports))
                return Detection(event.source, f"brute force: {len(state.connections)} "
                                               f"new connections to port {ports} within "
                                               f"{policy.bruteforce.seconds} s")
        return None

    def _touch(self, source: IPAddress) -> _Source:
        state = self._sources.get(source)
        if state is None:
            if len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
            state = self._sources[source] = _Source()
        else:
            self._sources.move_to_end(source)
        return state

    def forget(self, source: IPAddress) -> None:
        self._sources.pop(source, None)

    def expire(self, now: float) -> None:
        """Drop what fell out of the windows, and sources left with nothing."""
        for source in list(self._sources):
            state = self._sources[source]
            state.prune(self.policy, now)
            if not state:
                del self._sources[source]

    def sources(self) -> list[IPAddress]:
        return list(self._sources)

    def export(self, now: float, sources: list[IPAddress] | None = None) -> list[SourceState]:
        """The detections in progress (of `sources`, or all), ages relative to `now`."""
        self.expire(now)
        wanted = self._sources if sources is None else sources
        exported: list[SourceState] = []
        for source in wanted:
            state = self._sources.get(source)
            if state is not None:
                exported.append(SourceState(
                    source,
                    tuple(sorted((proto, port, round(now - at, 3))
                                 for (proto, port), at in state.closed.items())),
                    tuple(round(now - at, 3) for at in state.connections)))
        return exported

    def load(self, state: SourceState, now: float) -> None:
        """Replace a source's state with an exported one, rebased on `now`."""
        self.forget(state.source)
        loaded = self._touch(state.source)
        for proto, port, age in state.closed:
            loaded.closed[(proto, port)] = now - age
        loaded.connections.extend(sorted(now - age for age in state.connections))
        loaded.prune(self.policy, now)
        if not loaded:
            self.forget(state.source)

    def clear(self) -> None:
        self._sources.clear()
