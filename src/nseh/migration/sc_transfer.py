"""Moving a VM's security context (SC) over the SC channel.

`ScSender` runs on the source: a bulk copy, rounds of changes, and the final delta inside
QEMU's stop window. `receive_sc` runs on the destination: it checks that every record
belongs to the migrating VM, installs it, and acknowledges each round with what it did.
Both are thin asyncio layers over the engines (`nseh.agent.engines`) and the framed
channel (`nseh.sc.channel`, `nseh.sc.wire`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nseh.agent.engines import (
    MAX_REASONS,
    ApplyResult,
    ChangeTracker,
    Delta,
    SecurityEngine,
    VMScope,
)
from nseh.sc.channel import Channel, ChannelError
from nseh.sc.wire import (
    PROTOCOL_VERSION,
    Abort,
    Commit,
    Deletes,
    Entries,
    Error,
    Final,
    FinalAck,
    Hello,
    HelloAck,
    Message,
    Resync,
    RoundAck,
    RoundEnd,
    batch_entries,
)

log = logging.getLogger(__name__)

SC_MODES = ("none", "stopcopy", "precopy")
# The destination acknowledges every round; a silent one (host or link down) fails the
# migration after this long. 100,000 entries are applied in about a second here.
ACK_TIMEOUT = 30.0
RECEIVE_TIMEOUT = 600.0
LOG_ROUNDS_FROM = 1000  # rounds of at least this many records are logged with their timing
STREAM_BATCH_BYTES = 1 << 20  # at most this much SC per ENTRIES/DELETES frame sent
STREAM_GROUP = 2  # frames per write (and drain) of a big round
# Batches up to this size are applied on the event loop: a worker thread's hand-over costs
# more than such a batch takes (it matters in the stop window, where every record waits).
INLINE_APPLY_RECORDS = 500
# Entries one incoming migration may create for its VM (the agent's
# `[limits] sc_entries_per_vm`); the frame limits are the wire's.
DEFAULT_MAX_SC_ENTRIES = 1_000_000


class ScError(RuntimeError):
    """The SC transfer failed or the peer refused it; one-line message."""


class ScLimitError(ScError):
    """The source sent more than this host accepts for one VM."""


@dataclass
class ScStats:
    """What the SC transfer of one migration cost; part of the migration report."""

    entries: int = 0  # records sent, all rounds
    deletes: int = 0
    bytes: int = 0
    rounds: int = 0  # change rounds after the bulk copy (precopy)
    resyncs: int = 0
    final_delta: int = 0  # records sent inside the stop window
    stop_window_ms: float = 0.0  # SC time inside QEMU's stop window
    # How long QEMU stayed paused in pre-switchover, by the stamps of its own events
    # (pre-switchover -> device): stop_window_ms plus the source agent's reaction to the
    # first event and QEMU's to `migrate-continue`.
    pause_ms: float | None = None
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    destination_entries: int | None = None  # the VM's entries on the destination at the end
    engines: dict[str, int] = field(default_factory=dict)  # engines carried -> records sent

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop_window_ms"] = round(self.stop_window_ms, 2)
        if self.pause_ms is not None:
            data["pause_ms"] = round(self.pause_ms, 2)
        return data


class ScSender:
    """The source side, for one migration."""

    def __init__(self, channel: Channel, engines: Sequence[SecurityEngine], scope: VMScope,
                 mode: str) -> None:
        self.channel = channel
        self.engines = list(engines)
        self.scope = scope
        self.mode = mode
        self.stats = ScStats(engines={engine.name: 0 for engine in self.engines})
        self.trackers: dict[str, ChangeTracker] = {}
        self.round = 0

    async def hello(self, source_host: str) -> None:
        await self.channel.send(Hello(PROTOCOL_VERSION, source_host, self.scope.name, self.mode))
        reply = await self._receive()
        if not isinstance(reply, HelloAck):
            raise ScError(f"destination answered HELLO with {type(reply).__name__}")
        if not reply.accepted:
            raise ScError(f"destination refused the SC: {reply.reason}")

    def start_tracking(self) -> None:
        """Start collecting changes; must happen before the bulk snapshot, so none is lost."""
        for engine in self.engines:
            self.trackers[engine.name] = engine.track(self.scope)

    async def send_bulk(self) -> None:
        """Round 0: every engine's whole state."""
        started = time.perf_counter()
        snapshots = {e.name: await asyncio.to_thread(e.snapshot, self.scope)
                     for e in self.engines}
        dumped = time.perf_counter()
        await self._send_round({n: Delta(upserts=s) for n, s in snapshots.items()}, final=False)
        log.info("SC bulk copy of %s: %d records; snapshot %.0f ms, sent and applied %.0f ms",
                 self.scope.name, sum(map(len, snapshots.values())),
                 (dumped - started) * 1000, (time.perf_counter() - dumped) * 1000)

    async def send_changes(self) -> int:
        """One pre-copy round of what changed since the last one; returns its size."""
        deltas = await asyncio.to_thread(self._collect)
        size = sum(len(d) for d in deltas.values())
        if size:
            self.stats.rounds += 1
            await self._send_round(deltas, final=False)
        return size

    async def send_final(self) -> None:
        """Inside the stop window: the final delta (precopy) or everything (stopcopy)."""
        started = time.perf_counter()
        if self.mode == "stopcopy":
            deltas = {e.name: Delta(upserts=await asyncio.to_thread(e.snapshot, self.scope))
                      for e in self.engines}
        else:
            deltas = self._collect()  # the last round's worth of changes: quick, and urgent
        self.stats.final_delta = sum(len(d) for d in deltas.values())
        collected = time.perf_counter()
        if not any(len(d) or d.resync for d in deltas.values()):
            # Every earlier round was acknowledged as installed: the destination has it all,
            # and QEMU need not wait for a round trip.
            self.stats.stop_window_ms = (collected - started) * 1000
            log.info("final SC of %s: nothing changed since the last round", self.scope.name)
            return
        await self._send_round(deltas, final=True)
        self.stats.stop_window_ms = (time.perf_counter() - started) * 1000
        log.info("final SC of %s: %d records, collected in %.1f ms, sent and applied in "
                 "%.1f ms", self.scope.name, self.stats.final_delta,
                 (collected - started) * 1000, (time.perf_counter() - collected) * 1000)

    async def commit(self) -> None:
        await self.channel.send(Commit())

    async def abort(self, reason: str) -> None:
        try:
            await self.channel.send(Abort(reason), timeout=5)
        except ChannelError as exc:
            log.info("could not tell the destination to abort: %s", exc)

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers.clear()
        self.channel.close()

    def _collect(self) -> dict[str, Delta]:
        return {name: tracker.collect() for name, tracker in self.trackers.items()}

    async def _send_round(self, deltas: dict[str, Delta], *, final: bool) -> None:
        self.round += 1
        messages = round_messages(deltas, self.round, self.channel.max_frame_bytes,
                                  self.channel.max_entries_per_frame, final=final)
        entries = sum(len(delta.upserts) for delta in deltas.values())
        deletes = sum(len(delta.deletes) for delta in deltas.values())
        for engine, delta in deltas.items():
            self.stats.resyncs += delta.resync
            self.stats.engines[engine] += len(delta)
            self.stats.bytes += sum(map(len, delta.upserts)) + sum(map(len, delta.deletes))
        # Small rounds (the final delta above all) go in one write; big ones stream.
        group: list[Message] = []
        for message in messages:
            group.append(message)
            if isinstance(message, Entries | Deletes) and len(group) >= STREAM_GROUP:
                await self.channel.send_many(group)
                group = []
        await self.channel.send_many(group)
        self.stats.entries += entries
        self.stats.deletes += deletes
        ack = await self._receive()
        expected = FinalAck if final else RoundAck
        if not isinstance(ack, expected) or ack.round != self.round:
            raise ScError(f"expected {expected.__name__} for round {self.round}, "
                          f"got {type(ack).__name__}")
        self.stats.rejected += ack.rejected
        self.stats.reasons.extend(ack.reasons[: MAX_REASONS - len(self.stats.reasons)])

    async def _receive(self) -> Message:
        try:
            message = await self.channel.receive(ACK_TIMEOUT)
        except ChannelError as exc:
            raise ScError(f"SC channel: {exc}") from None
        if isinstance(message, Error):
            raise ScError(f"destination reported {message.code}: {message.reason}")
        return message


def round_messages(deltas: dict[str, Delta], round_: int, max_frame_bytes: int,
                   max_entries_per_frame: int, *, final: bool) -> list[Message]:
    """The messages of one round, as the sender sends them: per engine a RESYNC if needed,
    its deletions, its upserts, then ROUND_END (or FINAL) with the round's counts."""
    messages: list[Message] = []
    # Batches well below the frame limits: written one by one, a big round streams
    # (bounded memory here) and the destination applies a batch while the next arrives.
    limits = (min(max_frame_bytes, STREAM_BATCH_BYTES), max_entries_per_frame)
    for engine, delta in deltas.items():
        if delta.resync:
            messages.append(Resync(engine, round_))
        for batch in batch_entries(delta.deletes, *limits):
            messages.append(Deletes(engine, round_, batch))
        for batch in batch_entries(delta.upserts, *limits):
            messages.append(Entries(engine, round_, batch))
    entries = sum(len(delta.upserts) for delta in deltas.values())
    deletes = sum(len(delta.deletes) for delta in deltas.values())
    messages.append(Final(round_, entries, deletes) if final
                    else RoundEnd(round_, entries, deletes))
    return messages


# -- destination ---------------------------------------------------------------------------

# Given the VM name and the peer (the source host's certificate name), the scope of an
# incoming VM this host expects from that peer, or the reason it refuses.
ScopeLookup = Callable[[str, str], "VMScope | str"]


async def receive_sc(channel: Channel, engines: Sequence[SecurityEngine], lookup: ScopeLookup,
                     max_entries: int = DEFAULT_MAX_SC_ENTRIES) -> None:
    """Serve one incoming SC transfer until COMMIT, ABORT or the channel closes.

    Nothing is installed for a VM this host does not expect from that peer, and a record that
    is not the VM's own is rejected and reported, never installed. A transfer that creates
    more than `max_entries` entries here is refused and what it installed purged at once. On
    ABORT the VM's state received so far is purged (the source stays authoritative).
    """
    by_name = {engine.name: engine for engine in engines}
    hello = await channel.receive(RECEIVE_TIMEOUT)
    if not isinstance(hello, Hello):
        await channel.send(Error("protocol", f"expected HELLO, got {type(hello).__name__}"))
        return
    scope = lookup(hello.vm, channel.peer)
    if isinstance(scope, str):
        log.warning("refused SC for %s from %s: %s", hello.vm, channel.peer, scope)
        await channel.send(HelloAck(False, scope))
        return
    if hello.protocol_version != PROTOCOL_VERSION:
        await channel.send(HelloAck(False, f"protocol version {hello.protocol_version} "
                                           f"unsupported (this host speaks {PROTOCOL_VERSION})"))
        return
    await channel.send(HelloAck(True))
    log.info("receiving SC of %s from %s (%s)", scope.name, channel.peer, hello.mode)
    try:
        try:
            await _install_rounds(channel, by_name, scope, max_entries)
        except ScLimitError as exc:
            log.error("SC transfer of %s from %s refused: %s", scope.name, channel.peer, exc)
            await _purge(engines, scope)  # the migration cannot succeed any more
            await channel.send(Error("limit", str(exc)))
            # The source may still be sending its round: read on, so that it can finish and
            # read why (rather than leave that to the few seconds of the TLS shutdown); it
            # aborts once it has read the error.
            while not isinstance(await channel.receive(RECEIVE_TIMEOUT), Abort):
                pass
    except ScError as exc:
        log.error("SC transfer of %s from %s failed: %s", scope.name, channel.peer, exc)
        await channel.send(Error("protocol", str(exc)))
    except ChannelError as exc:
        # Whether the VM stays here is the orchestrator's call (commit or abort), not ours.
        log.error("SC channel of %s from %s broke: %s", scope.name, channel.peer, exc)


async def _install_rounds(channel: Channel, engines: dict[str, SecurityEngine], scope: VMScope,
                          max_entries: int) -> None:
    """Install the rounds of one transfer until COMMIT or ABORT."""
    result = ApplyResult()
    created = dict.fromkeys(engines, 0)  # entries this transfer created here, per engine
    round_started: float | None = None  # when the round's first batch arrived
    applying = 0.0  # seconds the round's batches took to apply
    stale = 0  # updates older than what was here already, all rounds (see InsertResult)
    while True:
        message = await channel.receive(RECEIVE_TIMEOUT)
        if round_started is None:
            round_started = time.perf_counter()
        match message:
            case Resync(engine=name):
                await asyncio.to_thread(_engine(engines, name).apply, scope, [], [], True)
                created[name] = 0
            case Deletes(engine=name, keys=keys):
                deleted = await _apply(_engine(engines, name), scope, [], keys)
                created[name] = max(0, created[name] - deleted.deleted)
                result.merge(deleted)
            case Entries(engine=name, entries=entries):
                # Checked after the batch: only the engine knows which entries are new here
                # (an update of a connection sent before must not count again).
                started = time.perf_counter()
                applied = await _apply(_engine(engines, name), scope, entries, [])
                applying += time.perf_counter() - started
                created[name] += applied.created
                result.merge(applied)
                if sum(created.values()) > max_entries:
                    raise ScLimitError(
                        f"SC of {scope.name} exceeds limits.sc_entries_per_vm = {max_entries}: "
                        f"{sum(created.values())} entries created")
            case RoundEnd(round=round_) | Final(round=round_):
                ack_type = FinalAck if isinstance(message, Final) else RoundAck
                await channel.send(ack_type(round_, result.applied, result.deleted,
                                            result.rejected, result.reasons))
                if result.rejected:
                    log.warning("SC of %s from %s: rejected %d records: %s", scope.name,
                                channel.peer, result.rejected, "; ".join(result.reasons))
                if result.applied >= LOG_ROUNDS_FROM:
                    log.info("SC round %d of %s: %d records in %.0f ms, %.0f ms of it applying",
                             round_, scope.name, result.applied,
                             (time.perf_counter() - round_started) * 1000, applying * 1000)
                stale += result.stale
                result, round_started, applying = ApplyResult(), None, 0.0
            case Commit():
                log.info("SC of %s committed (%d stale updates skipped: older than the state "
                         "already here)", scope.name, stale)
                return
            case Abort(reason=reason):
                # The VM stays on the source: what arrived here must not linger.
                log.info("source aborted the SC of %s: %s", scope.name, reason)
                await _purge(engines.values(), scope)
                return
            case _:
                raise ScError(f"unexpected {type(message).__name__} during SC transfer")


async def _apply(engine: SecurityEngine, scope: VMScope, upserts: list[bytes],
                 deletes: list[bytes]) -> ApplyResult:
    if len(upserts) + len(deletes) <= INLINE_APPLY_RECORDS:
        return engine.apply(scope, upserts, deletes)
    return await asyncio.to_thread(engine.apply, scope, upserts, deletes)


async def _purge(engines: Iterable[SecurityEngine], scope: VMScope) -> None:
    for engine in engines:
        await asyncio.to_thread(engine.purge, scope)


def _engine(engines: dict[str, SecurityEngine], name: str) -> SecurityEngine:
    try:
        return engines[name]
    except KeyError:
        raise ScError(f"unknown security engine {name!r}") from None
