"""The SC channel: real TLS 1.3 over real TCP on loopback, with certificates made here."""

import asyncio
import datetime as dt
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from nseh.sc.channel import Channel, ChannelError, connect, serve
from nseh.sc.pki import (
    CertAuthority,
    HostCredentials,
    client_context,
    create_ca,
    issue_host_certificate,
    server_context,
)
from nseh.sc.wire import (
    Abort,
    Commit,
    Deletes,
    Entries,
    Error,
    Final,
    FinalAck,
    FrameDecoder,
    Hello,
    HelloAck,
    Policy,
    RoundAck,
    RoundEnd,
    batch_entries,
    encode,
    new_session,
)

LOOPBACK = ["127.0.0.1", "::1"]
TEST_TIMEOUT = 60.0


@dataclass
class Cluster:
    ca: CertAuthority
    h1: HostCredentials  # the migration source: TLS client
    h2: HostCredentials  # the destination: TLS server
    h3: HostCredentials


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    ca = create_ca(tmp_path / "ca")
    return Cluster(ca, *(issue_host_certificate(ca, name, LOOPBACK, tmp_path / name)
                         for name in ("h1", "h2", "h3")))


def run(coroutine: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await coroutine
    asyncio.run(bounded())


Handler = Callable[[Channel], Awaitable[None]]


@asynccontextmanager
async def serving(creds: HostCredentials, handler: Handler, address: str = "127.0.0.1",
                  **options) -> AsyncIterator[int]:
    """A running SC server on a free loopback port; closed however the test ends."""
    async with await serve(address, 0, creds, handler, **options) as server:
        yield server.port


class Recorder:
    """An on_channel handler that records what it saw and can run a script."""

    def __init__(self, script: Handler | None = None) -> None:
        self.script = script
        self.peers: list[str] = []
        self.errors: list[ChannelError] = []
        self.done = asyncio.Event()

    async def __call__(self, channel: Channel) -> None:
        self.peers.append(channel.peer)
        try:
            if self.script is not None:
                await self.script(channel)
        except ChannelError as exc:
            self.errors.append(exc)
        finally:
            self.done.set()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


ALL_MESSAGES = [
    Hello(1, "h1", "web1", "precopy"),
    HelloAck(True),
    HelloAck(False, "VM web1 is not expected here"),
    Policy("firewall", {"rules": ["tcp dport 80 accept"], "mark": 7}),
    Entries("firewall", 1, [b"\x01\x02", b"", b"x" * 300]),
    Deletes("firewall", 2, [b"key"]),
    RoundEnd(1, 3, 0),
    RoundAck(1, 2, 0, 1, ["EEXIST"]),
    Final(3, 10, 2),
    FinalAck(3, 10, 2, 0),
    Commit(),
    Abort("source VM stopped"),
    Error("internal", "nft failed"),
]


@pytest.mark.parametrize("address", LOOPBACK)
def test_a_valid_pair_exchanges_every_message_type(cluster, caplog, address):
    caplog.set_level(logging.INFO, "nseh.sc.channel")

    async def echo(channel: Channel) -> None:
        for _ in ALL_MESSAGES:
            await channel.send(await channel.receive(timeout=5))

    async def main() -> None:
        server = Recorder(echo)
        async with (serving(cluster.h2, server, address) as port,
                    await connect(address, port, cluster.h1, "h2", timeout=5) as channel):
            assert channel.peer == "h2"
            await channel.send_many(ALL_MESSAGES)
            echoed = [await channel.receive(timeout=5) for _ in ALL_MESSAGES]
            assert echoed == ALL_MESSAGES
            await server.done.wait()
        assert server.peers == ["h1"] and server.errors == []

    run(main())
    assert any("SC channel from h1" in r.getMessage() and "accepted" in r.getMessage()
               for r in caplog.records)


def test_both_directions_share_the_session_of_the_source(cluster):
    session = new_session()
    seen: list[bytes | None] = []

    async def answer(channel: Channel) -> None:
        await channel.receive(timeout=5)
        seen.append(channel.session)
        await channel.send(HelloAck(True))

    async def main() -> None:
        async with (serving(cluster.h2, Recorder(answer)) as port,
                    await connect("127.0.0.1", port, cluster.h1, "h2", 5,
                                  session=session) as channel):
            await channel.send(Hello(1, "h1", "vm", "precopy"))
            assert await channel.receive(timeout=5) == HelloAck(True)
            assert channel.session == session

    run(main())
    assert seen == [session]


async def _refused_client(creds: HostCredentials, port: int, expected_peer: str = "h2") -> str:
    """Connect and wait for an answer; return the client's ChannelError."""
    with pytest.raises(ChannelError) as info:
        # With TLS 1.3 the client's handshake may finish before the server has checked the
        # client's certificate: the refusal then arrives at the first read. (Nothing is sent:
        # data the server never reads could turn its close into a reset.)
        channel = await connect("127.0.0.1", port, creds, expected_peer, timeout=5)
        try:
            await channel.receive(timeout=5)
        finally:
            await channel.aclose()
    return str(info.value)


# How a client learns that the server refused its certificate during the handshake.
HANDSHAKE_REFUSAL = r"^h2 closed the channel before sending any frame$|TLS error: TLSV1_ALERT"


def test_a_client_certificate_from_another_ca_is_refused_in_the_handshake(tmp_path, cluster,
                                                                         caplog):
    other = create_ca(tmp_path / "other-ca")
    intruder = issue_host_certificate(other, "h1", LOOPBACK, tmp_path / "intruder")
    # The intruder trusts the real CA, so only its own certificate is wrong.
    intruder = HostCredentials("h1", intruder.cert_path, intruder.key_path, cluster.h1.ca_path)

    async def main() -> None:
        server = Recorder()
        async with serving(cluster.h2, server) as port:
            error = await _refused_client(intruder, port)
            await until(lambda: refusals(caplog))
        assert server.peers == []  # on_channel never ran: no frame was read
        assert re.search(HANDSHAKE_REFUSAL, error)

    run(main())
    assert "certificate refused: unable to get local issuer certificate" in refusals(caplog)[0]


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(tmp_path, cluster):
    other = create_ca(tmp_path / "other-ca")
    fake = issue_host_certificate(other, "h2", LOOPBACK, tmp_path / "fake")
    fake = HostCredentials("h2", fake.cert_path, fake.key_path, cluster.h2.ca_path)

    async def main() -> None:
        server = Recorder()
        async with serving(fake, server) as port:
            with pytest.raises(ChannelError, match="certificate refused: unable to get local"):
                await connect("127.0.0.1", port, cluster.h1, "h2", timeout=5)
        assert server.peers == []

    run(main())


def test_an_expired_client_certificate_is_refused(tmp_path, cluster, caplog):
    now = dt.datetime.now(dt.UTC)
    expired = issue_host_certificate(cluster.ca, "h1", LOOPBACK, tmp_path / "old",
                                     not_before=now - dt.timedelta(days=30),
                                     not_after=now - dt.timedelta(days=1))

    async def main() -> None:
        server = Recorder()
        async with serving(cluster.h2, server) as port:
            assert re.search(HANDSHAKE_REFUSAL, await _refused_client(expired, port))
            await until(lambda: refusals(caplog))
        assert server.peers == []

    run(main())
    assert "certificate has expired" in refusals(caplog)[0]


def test_an_expired_server_certificate_is_refused_by_the_client(tmp_path, cluster):
    now = dt.datetime.now(dt.UTC)
    expired = issue_host_certificate(cluster.ca, "h2", LOOPBACK, tmp_path / "old",
                                     not_before=now - dt.timedelta(days=30),
                                     not_after=now - dt.timedelta(days=1))

    async def main() -> None:
        async with serving(expired, Recorder()) as port:
            with pytest.raises(ChannelError, match="certificate has expired"):
                await connect("127.0.0.1", port, cluster.h1, "h2", timeout=5)

    run(main())


def test_a_revoked_client_certificate_is_refused_before_any_frame(cluster, caplog):
    serial = cluster.ca.revoke(cluster.h1.cert_path)

    async def main() -> None:
        server = Recorder()
        async with serving(cluster.h2, server) as port:
            error = await _refused_client(cluster.h1, port)
        assert server.peers == []
        assert error == "h2 closed the channel before sending any frame"

    run(main())
    assert f"certificate serial {serial:X} is revoked" in refusals(caplog)[0]


def test_a_revocation_applies_to_the_next_connection_without_a_restart(cluster):
    async def main() -> None:
        server = Recorder()
        async with (serving(cluster.h2, server) as port,
                    await connect("127.0.0.1", port, cluster.h1, "h2", 5) as channel):
            await channel.send(Commit())
            await until(lambda: server.peers == ["h1"])
            cluster.ca.revoke(cluster.h1.cert_path)
            await _refused_client(cluster.h1, port)
        assert server.peers == ["h1"]

    run(main())


def test_a_revoked_server_certificate_is_refused_by_the_client(cluster):
    cluster.ca.revoke(cluster.h2.cert_path)

    async def main() -> None:
        async with serving(cluster.h2, Recorder()) as port:
            with pytest.raises(ChannelError, match=r"refused: certificate serial .* is revoked"):
                await connect("127.0.0.1", port, cluster.h1, "h2", timeout=5)

    run(main())


def test_a_missing_revocation_list_refuses_everyone(cluster):
    cluster.ca.revoked_path.unlink()

    async def main() -> None:
        server = Recorder()
        async with serving(cluster.h2, server) as port:
            with pytest.raises(ChannelError, match="cannot read revocation list"):
                await connect("127.0.0.1", port, cluster.h1, "h2", timeout=5)
        assert server.peers == []

    run(main())


def test_a_peer_that_is_not_allowed_is_refused(cluster, caplog):
    async def main() -> None:
        server = Recorder()
        async with serving(cluster.h2, server, allowed_peers=lambda peer: peer == "h3") as port:
            await _refused_client(cluster.h1, port)
            async with await connect("127.0.0.1", port, cluster.h3, "h2", 5) as channel:
                await channel.send(Commit())
                await until(lambda: server.peers == ["h3"])

    run(main())
    assert "host 'h1' is not allowed" in refusals(caplog)[0]


def test_a_valid_certificate_of_the_wrong_host_is_refused_by_the_client(cluster):
    async def main() -> None:
        server = Recorder()
        # h3 answers at the address where the source expects h2.
        async with serving(cluster.h3, server) as port:
            with pytest.raises(ChannelError, match="certificate refused: Hostname mismatch"):
                await connect("127.0.0.1", port, cluster.h1, "h2", timeout=5)
        assert server.peers == []

    run(main())


def test_a_plain_tcp_client_sending_garbage_is_dropped(cluster, caplog):
    async def main() -> None:
        server = Recorder()
        async with serving(cluster.h2, server) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                # Even a well-formed SC frame is garbage without TLS.
                writer.write(encode(Hello(1, "h1", "vm", "precopy"), new_session(), 1))
                writer.write(os.urandom(4096))
                async with asyncio.timeout(5):
                    while await reader.read(65536):  # until the server hangs up
                        pass
            finally:
                writer.close()
            await until(lambda: refusals(caplog))
        assert server.peers == []

    run(main())
    assert "TLS error" in refusals(caplog)[0]


def test_a_silent_tcp_client_is_dropped_after_the_handshake_timeout(cluster, caplog):
    async def main() -> None:
        async with serving(cluster.h2, Recorder(), handshake_timeout=0.3) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                started = time.monotonic()
                async with asyncio.timeout(5):
                    assert await reader.read() == b""
                assert time.monotonic() - started < 3
            finally:
                writer.close()
            await until(lambda: refusals(caplog))

    run(main())
    assert "TLS handshake timed out" in refusals(caplog)[0]


async def _raw_tls_client(creds: HostCredentials, port: int, server: str = "h2"):
    """A TLS client of the right cluster that writes whatever bytes a test wants."""
    return await asyncio.open_connection("127.0.0.1", port, ssl=client_context(creds),
                                         server_hostname=server)


@pytest.mark.parametrize("corruption", ["bad magic", "flipped sequence", "payload overrun"])
def test_a_corrupted_frame_closes_the_channel_on_the_receiving_side(cluster, corruption):
    session = new_session()
    hello = encode(Hello(1, "h1", "vm", "precopy"), session, 1)
    second = bytearray(encode(Abort("bye"), session, 2))
    if corruption == "bad magic":
        second[0] ^= 0xFF
    elif corruption == "flipped sequence":
        second[33] ^= 0x01  # the low byte of the sequence number: 2 becomes 3
    else:
        second[37] += 10  # the payload length now claims bytes that belong to no frame

    async def two_frames(channel: Channel) -> None:
        assert await channel.receive(timeout=5) == Hello(1, "h1", "vm", "precopy")
        await channel.receive(timeout=5)

    async def main() -> None:
        server = Recorder(two_frames)
        async with serving(cluster.h2, server) as port:
            reader, writer = await _raw_tls_client(cluster.h1, port)
            try:
                trailing = b"more" * 10 if corruption == "payload overrun" else b""
                writer.write(hello + bytes(second) + trailing)
                async with asyncio.timeout(5):
                    answer = await reader.read()  # the server's ERROR frame, then EOF
            finally:
                writer.close()
            await server.done.wait()
        assert len(server.errors) == 1
        assert str(server.errors[0]).startswith("bad frame from h1: ")
        assert FrameDecoder(session=session).feed(answer) == [
            Error("protocol", str(server.errors[0]).removeprefix("bad frame from h1: "))]

    run(main())


def test_a_frame_from_the_wrong_session_closes_the_channel_of_the_client(cluster):
    async def wrong_session_server(reader, writer) -> None:
        await reader.read(1)
        writer.write(encode(HelloAck(True), new_session(), 1))
        await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(wrong_session_server, "127.0.0.1", 0,
                                            ssl=server_context(cluster.h2))
        try:
            port = server.sockets[0].getsockname()[1]
            async with await connect("127.0.0.1", port, cluster.h1, "h2", 5) as channel:
                await channel.send(Hello(1, "h1", "vm", "precopy"))
                with pytest.raises(ChannelError, match="bad frame from h2: frame of session"):
                    await channel.receive(timeout=5)
                assert channel.closed
                with pytest.raises(ChannelError, match="frame of session"):  # stays closed
                    await channel.send(Commit())
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_an_oversized_frame_is_refused_before_its_payload_arrives(cluster):
    session = new_session()
    header = bytearray(encode(Commit(), session, 1))
    header[34:38] = (100 * 1024 * 1024).to_bytes(4, "big")  # announces 100 MiB, sends none

    async def main() -> None:
        server = Recorder(lambda channel: channel.receive(timeout=30))
        async with serving(cluster.h2, server, max_frame_bytes=1024 * 1024) as port:
            _, writer = await _raw_tls_client(cluster.h1, port)
            try:
                writer.write(bytes(header))
                async with asyncio.timeout(5):
                    await server.done.wait()
            finally:
                writer.close()
        assert "COMMIT frame of 104857638 bytes exceeds limits.sc_frame_bytes = 1048576" in str(
            server.errors[0])

    run(main())


def test_messages_over_the_frame_limit_are_refused_locally_and_the_channel_stays_usable(
        cluster):
    async def main() -> None:
        server = Recorder(lambda channel: channel.receive(timeout=5))
        async with (serving(cluster.h2, server) as port,
                    await connect("127.0.0.1", port, cluster.h1, "h2", 5,
                                  max_frame_bytes=64 * 1024) as channel):
            with pytest.raises(ChannelError,
                               match=r"ENTRIES frame of .* exceeds limits\.sc_frame_bytes = 65536"):
                await channel.send(Entries("firewall", 1, [b"x" * 70_000]))
            await channel.send(Commit())  # sequence 1: the refused frame used none
            await server.done.wait()
        assert server.errors == []

    run(main())


def test_receive_timeout_keeps_the_channel_open(cluster):
    async def late_answer(channel: Channel) -> None:
        await channel.receive(timeout=5)
        await asyncio.sleep(0.3)
        await channel.send(HelloAck(True))

    async def main() -> None:
        async with (serving(cluster.h2, Recorder(late_answer)) as port,
                    await connect("127.0.0.1", port, cluster.h1, "h2", 5) as channel):
            await channel.send(Hello(1, "h1", "vm", "precopy"))
            with pytest.raises(ChannelError, match=r"no message from h2 within 0\.05 s"):
                await channel.receive(timeout=0.05)
            assert await channel.receive(timeout=5) == HelloAck(True)

    run(main())


def test_a_trickling_peer_cannot_stretch_a_receive_timeout(cluster):
    session = new_session()
    frame = encode(Abort("slow"), session, 1)

    async def main() -> None:
        server = Recorder(lambda channel: channel.receive(timeout=0.5))
        async with serving(cluster.h2, server) as port:
            _, writer = await _raw_tls_client(cluster.h1, port)
            try:
                started = time.monotonic()
                for byte in frame[:-1]:  # one byte every 0.05 s: never a whole message
                    if server.done.is_set():
                        break
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)
                await server.done.wait()
                assert time.monotonic() - started < 1.5
            finally:
                writer.close()
        assert "no message from h1 within 0.5 s" in str(server.errors[0])

    run(main())


def test_a_peer_closing_the_channel_is_a_channel_error(cluster):
    async def main() -> None:
        async with (serving(cluster.h2, Recorder()) as port,  # returns at once: closes
                    await connect("127.0.0.1", port, cluster.h1, "h2", 5) as channel):
            await channel.send(Hello(1, "h1", "vm", "precopy"))
            with pytest.raises(ChannelError, match="h2 closed the channel"):
                await channel.receive(timeout=5)

    run(main())


def test_the_server_cannot_speak_before_the_source_opened_the_session(cluster):
    async def speak_first(channel: Channel) -> None:
        await channel.send(HelloAck(True))

    async def main() -> None:
        server = Recorder(speak_first)
        async with (serving(cluster.h2, server) as port,
                    await connect("127.0.0.1", port, cluster.h1, "h2", 5)):
            await server.done.wait()
        assert "cannot send to h1 before its first frame sets the session" in str(
            server.errors[0])

    run(main())


def test_connecting_to_nothing_or_too_slowly_is_a_channel_error(cluster):
    async def main() -> None:
        async with serving(cluster.h2, Recorder()) as port:
            pass  # the port is free again
        with pytest.raises(ChannelError, match=r"cannot open the SC channel to h2 at "
                                               r"127.0.0.1:\d+: Connect call failed"):
            await connect("127.0.0.1", port, cluster.h1, "h2", timeout=5)

        # A listener that never answers the handshake.
        accepted: list[asyncio.StreamWriter] = []
        silent = await asyncio.start_server(lambda _, writer: accepted.append(writer),
                                            "127.0.0.1", 0)
        try:
            silent_port = silent.sockets[0].getsockname()[1]
            with pytest.raises(ChannelError, match=r"no SC channel to h2 .* within 0\.2 s"):
                await connect("127.0.0.1", silent_port, cluster.h1, "h2", timeout=0.2)
        finally:
            for writer in accepted:
                writer.close()
            silent.close()
            await silent.wait_closed()

    run(main())


def test_100k_entries_cross_the_channel(cluster):
    entries = [os.urandom(200) for _ in range(100_000)]
    received: list[bytes] = []

    async def destination(channel: Channel) -> None:
        while True:
            message = await channel.receive(timeout=30)
            if isinstance(message, RoundEnd):
                break
            received.extend(message.entries)
        await channel.send(RoundAck(message.round, len(received), 0, 0))

    async def main() -> None:
        async with (serving(cluster.h2, Recorder(destination)) as port,
                    await connect("127.0.0.1", port, cluster.h1, "h2", 5) as channel):
            await channel.send_many([Entries("firewall", 1, batch)
                                     for batch in batch_entries(entries)])
            await channel.send(RoundEnd(1, len(entries), 0))
            ack = await channel.receive(timeout=30)
        assert ack == RoundAck(1, 100_000, 0, 0)

    run(main())  # how fast: the benchmark's question (`nseh bench`), not this test's
    assert received == entries
