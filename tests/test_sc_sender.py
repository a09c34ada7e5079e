"""The source's side of the SC transfer, over a scripted channel (no sockets)."""

import asyncio
from collections import deque

from nseh.agent.engines import Delta, VMScope
from nseh.definition import VMDefinition
from nseh.migration.sc_transfer import ScSender
from nseh.sc import wire

WEB1 = VMScope(VMDefinition.from_json({"name": "web1", "network": {"ipv4": "10.0.0.10/24"}}),
               mark=7)


class ScriptedChannel:
    """The source's end of an SC channel: the destination's replies come from a script;
    what the source sends is recorded."""

    max_frame_bytes = wire.DEFAULT_MAX_FRAME_BYTES
    max_entries_per_frame = 65_536

    def __init__(self, *replies: wire.Message) -> None:
        self.replies = deque(replies)
        self.sent: list[wire.Message] = []

    async def send(self, message: wire.Message) -> None:
        self.sent.append(message)

    async def send_many(self, messages: list[wire.Message]) -> None:
        self.sent.extend(messages)

    async def receive(self, timeout: float | None) -> wire.Message:
        return self.replies.popleft()

    def close(self) -> None:
        pass


class ScriptedTracker:
    def __init__(self, *deltas: Delta) -> None:
        self.deltas = deque(deltas)

    def collect(self) -> Delta:
        return self.deltas.popleft()

    def close(self) -> None:
        pass


def sender(channel: ScriptedChannel, *deltas: Delta) -> ScSender:
    sc = ScSender(channel, [], WEB1, "precopy")  # type: ignore[arg-type]
    sc.trackers["firewall"] = ScriptedTracker(*deltas)  # type: ignore[assignment]
    sc.stats.engines["firewall"] = 0
    return sc


def test_a_final_delta_with_changes_waits_until_the_destination_installed_it():
    channel = ScriptedChannel(wire.FinalAck(1, 2, 0, 0, []))
    sc = sender(channel, Delta(upserts=[b"a", b"b"]))
    asyncio.run(sc.send_final())
    assert [type(m) for m in channel.sent] == [wire.Entries, wire.Final]
    assert not channel.replies  # the FINAL_ACK was read
    assert sc.stats.final_delta == 2


def test_an_empty_final_delta_sends_nothing_and_waits_for_nothing():
    channel = ScriptedChannel()  # a read would fail: there is nothing to read
    sc = sender(channel, Delta())
    asyncio.run(sc.send_final())
    assert channel.sent == [] and sc.stats.final_delta == 0


def test_a_resync_is_sent_even_without_entries():
    channel = ScriptedChannel(wire.FinalAck(1, 0, 0, 0, []))
    sc = sender(channel, Delta(resync=True))
    asyncio.run(sc.send_final())
    assert [type(m) for m in channel.sent] == [wire.Resync, wire.Final]
