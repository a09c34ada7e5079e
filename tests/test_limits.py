"""What an agent accepts is bounded, and input beyond a bound is refused with one line that
names the limit (as the agent configuration's `[limits]` table does) and its value: entries
of one incoming migration, and API request lines. (The SC frame limits are tested with the
wire format and the channel, the policy limit with the definitions.)"""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from test_sc_channel import cluster, run, serving  # noqa: F401 (cluster: a fixture)

from nseh.agent.engines import ApplyResult, VMScope
from nseh.api import protocol as api
from nseh.api.client import AgentClient, AgentError
from nseh.api.server import ApiServer, Emit
from nseh.definition import VMDefinition
from nseh.migration.sc_transfer import ScError, ScSender, receive_sc
from nseh.sc import wire
from nseh.sc.channel import Channel, ChannelError, connect

WEB1 = VMScope(VMDefinition.from_json({"name": "web1", "network": {"ipv4": "10.0.0.10/24"}}),
               mark=7)


# --- entries of one incoming migration ------------------------------------------------------

class ScriptedChannel:
    """The destination's end of an SC channel: the source's messages come from a script;
    what the destination sends is recorded. The source closes the channel after the script."""

    peer = "h1"

    def __init__(self, *messages: wire.Message) -> None:
        self.incoming = deque([wire.Hello(1, "h1", "web1", "precopy"), *messages])
        self.sent: list[wire.Message] = []

    async def receive(self, timeout: float | None) -> wire.Message:
        if not self.incoming:
            raise ChannelError("h1 closed the channel")
        return self.incoming.popleft()

    async def send(self, message: wire.Message) -> None:
        self.sent.append(message)


class TableEngine:
    """An engine whose state is a set of entries: sending a present entry again updates it
    (creates nothing)."""

    name = "firewall"

    def __init__(self) -> None:
        self.table: set[bytes] = set()
        self.batches: list[list[bytes]] = []  # every batch of upserts it was asked to apply

    def apply(self, vm: VMScope, upserts: list[bytes], deletes: list[bytes],
              replace: bool = False) -> ApplyResult:
        result = ApplyResult()
        if replace:
            self.table.clear()
        for key in deletes:
            if key in self.table:
                self.table.remove(key)
                result.deleted += 1
        if upserts:
            self.batches.append(upserts)
        for entry in upserts:
            result.applied += 1
            if entry not in self.table:
                self.table.add(entry)
                result.created += 1
        return result

    def purge(self, vm: VMScope) -> None:
        self.table.clear()


def receive(channel: ScriptedChannel, engine: TableEngine, max_entries: int) -> None:
    asyncio.run(receive_sc(channel, [engine], lambda vm, peer: WEB1,
                           max_entries))


def upserts(round_: int, *entries: bytes) -> wire.Entries:
    return wire.Entries("firewall", round_, list(entries))


def test_entries_sent_again_in_later_rounds_do_not_count_against_the_limit():
    engine = TableEngine()
    channel = ScriptedChannel(
        upserts(1, b"a", b"b", b"c"), wire.RoundEnd(1, 3, 0),
        upserts(2, b"a", b"b", b"c"), wire.RoundEnd(2, 3, 0),  # updates of the same connections
        upserts(3, b"a"), wire.Final(3, 1, 0), wire.Commit())
    receive(channel, engine, max_entries=3)
    assert channel.sent == [wire.HelloAck(True), wire.RoundAck(1, 3, 0, 0),
                            wire.RoundAck(2, 3, 0, 0), wire.FinalAck(3, 1, 0, 0)]
    assert engine.table == {b"a", b"b", b"c"}


def test_deletions_and_a_resync_make_room_again():
    engine = TableEngine()
    channel = ScriptedChannel(
        upserts(1, b"a", b"b"), wire.Deletes("firewall", 1, [b"a"]), upserts(1, b"c"),
        wire.RoundEnd(1, 3, 1),
        wire.Resync("firewall", 2), upserts(2, b"d", b"e"), wire.Final(2, 2, 0), wire.Commit())
    receive(channel, engine, max_entries=2)
    assert channel.sent == [wire.HelloAck(True), wire.RoundAck(1, 3, 1, 0),
                            wire.FinalAck(2, 2, 0, 0)]
    assert engine.table == {b"d", b"e"}


def test_a_transfer_past_the_limit_is_refused_and_purged_at_once():
    engine = TableEngine()
    channel = ScriptedChannel(
        upserts(1, b"a", b"b"), upserts(1, b"c", b"d"),
        # What the source sent before it read the refusal: skipped, not installed.
        upserts(1, b"e"), wire.RoundEnd(1, 5, 0), wire.Abort("destination reported limit"))
    receive(channel, engine, max_entries=3)
    assert channel.sent == [wire.HelloAck(True), wire.Error(
        "limit", "SC of web1 exceeds limits.sc_entries_per_vm = 3: 4 entries created")]
    assert engine.batches == [[b"a", b"b"], [b"c", b"d"]]
    assert engine.table == set()
    assert not channel.incoming  # it read on until the source's ABORT


def test_a_source_that_closes_after_the_refusal_finds_nothing_left_behind():
    engine = TableEngine()
    channel = ScriptedChannel(upserts(1, b"a", b"b"))
    receive(channel, engine, max_entries=1)
    assert [type(message) for message in channel.sent] == [wire.HelloAck, wire.Error]
    assert engine.table == set()


class SnapshotEngine:
    """The source's side of an engine: a snapshot of many entries."""

    name = "firewall"

    def snapshot(self, vm: VMScope) -> list[bytes]:
        return [b"%099d" % number for number in range(100_000)]  # 10 MB: more than socket buffers


def test_over_a_real_channel_the_source_reads_why_and_the_destination_keeps_nothing(
        cluster):  # noqa: F811 (the fixture imported above)
    engine = TableEngine()

    async def main() -> None:
        async def destination(channel: Channel) -> None:
            await receive_sc(channel, [engine], lambda vm, peer: WEB1,
                             max_entries=1000)

        async with serving(cluster.h2, destination) as port:
            channel = await connect("127.0.0.1", port, cluster.h1, "h2", 5)
            sender = ScSender(channel, [SnapshotEngine()], WEB1, "stopcopy")
            await sender.hello("h1")
            with pytest.raises(ScError, match=r"^destination reported limit: SC of web1 exceeds "
                                              r"limits\.sc_entries_per_vm = 1000: "):
                await sender.send_final()  # all 100,000 entries in one round
            await sender.abort("refused")
            await channel.aclose()

    run(main())
    assert engine.table == set() and engine.batches


# --- API request lines ----------------------------------------------------------------------

async def host_info(params: dict[str, Any], emit: Emit) -> dict[str, Any]:
    return {"host": "h1", **params}


async def huge(params: dict[str, Any], emit: Emit) -> str:
    return "x" * api.MAX_MESSAGE_BYTES


def exchange(tmp_path: Path, handlers: dict[str, Any], max_request_bytes: int,
             *lines: bytes) -> tuple[list[bytes], Any]:
    """Send raw lines to a unix-socket API server; its reply lines until it closes the
    connection, and what a regular host.info call returns afterwards."""
    async def scenario() -> tuple[list[bytes], Any]:
        path = tmp_path / "api.sock"
        server = await ApiServer(handlers, max_request_bytes).serve_unix(path)
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.writelines(lines)
            writer.write_eof()  # the server answers, then closes
            replies = []
            async with asyncio.timeout(10):
                while line := await reader.readline():
                    replies.append(line)
            writer.close()
            return replies, await AgentClient(f"unix://{path}").call("host.info", timeout=10)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(scenario())


def test_a_request_line_over_the_limit_is_answered_with_an_error_naming_it(tmp_path):
    padded = b'{"id": 1, "method": "host.info", "params": {"pad": "%s"}}\n' % (b"x" * 2000)
    replies, after = exchange(tmp_path, {"host.info": host_info}, 1024, padded)
    assert [api.decode(line) for line in replies] == [api.Error(
        0, "too-large", "request line exceeds limits.api_request_bytes = 1024 bytes")]
    assert after == {"host": "h1"}  # the agent serves the next connection as before


def test_a_request_within_the_limit_is_served(tmp_path):
    small = b'{"id": 1, "method": "host.info", "params": {"pad": "%s"}}\n' % (b"x" * 900)
    replies, _ = exchange(tmp_path, {"host.info": host_info}, 1024, small)
    assert len(replies) == 1 and api.decode(replies[0]).result["pad"] == "x" * 900


def test_a_request_nested_too_deeply_is_a_protocol_error_not_a_dropped_connection(tmp_path):
    replies, _ = exchange(tmp_path, {"host.info": host_info}, api.MAX_MESSAGE_BYTES,
                          b"[" * 100_000 + b"\n",
                          b'{"id": 2, "method": "host.info", "params": {}}\n')
    assert [api.decode(line) for line in replies] == [
        api.Error(0, "protocol", "not JSON: nested too deeply"),
        api.Result(2, {"host": "h1"})]  # and the connection goes on


def test_a_result_too_large_for_the_protocol_is_answered_with_an_error(tmp_path):
    replies, _ = exchange(tmp_path, {"host.info": host_info, "huge": huge},
                          api.MAX_MESSAGE_BYTES, b'{"id": 3, "method": "huge", "params": {}}\n')
    error = api.decode(replies[0])
    assert isinstance(error, api.Error) and (error.id, error.code) == (3, "too-large")
    assert error.message.startswith("the result of huge is too large: message of ")


def test_a_reply_line_over_the_protocol_maximum_is_an_agent_error(tmp_path):
    async def endless_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"x" * (api.MAX_MESSAGE_BYTES + 1))
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        path = tmp_path / "agent.sock"
        server = await asyncio.start_unix_server(endless_reply, path)
        try:
            with pytest.raises(AgentError,
                               match=f"exceeds {api.MAX_MESSAGE_BYTES} bytes") as info:
                await AgentClient(f"unix://{path}").call("host.info", timeout=10)
            assert info.value.code == "protocol"
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
