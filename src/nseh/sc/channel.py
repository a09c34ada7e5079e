"""The SC channel: framed SC messages (`wire`) over mutually authenticated TLS 1.3 over TCP.

The source agent `connect`s to the destination agent's management address and checks that
the server's certificate names the expected destination host; the destination `serve`s,
names each client by its certificate's common name and drops clients that are not allowed
or revoked before reading a single frame. The source opens the session (its first frame
fixes the session id for both directions); the destination only answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import NoReturn

from nseh.sc.pki import (
    HostCredentials,
    PkiError,
    check_not_revoked,
    client_context,
    peer_identity,
    server_context,
)
from nseh.sc.wire import (
    DEFAULT_MAX_ENTRIES_PER_FRAME,
    DEFAULT_MAX_FRAME_BYTES,
    Error,
    FrameDecoder,
    FrameEncoder,
    Message,
    WireError,
    new_session,
)

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_SEND_TIMEOUT = 60.0
# How long aclose() waits for the TLS close_notify exchange before dropping the connection.
_CLOSE_TIMEOUT = 5.0
_READ_CHUNK = 256 * 1024
_STREAM_LIMIT = 1024 * 1024


class ChannelError(Exception):
    """The SC channel failed or was refused; the message is one line."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Channel:
    """One SC session with one peer host. Not for concurrent receivers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                 *, session: bytes | None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_entries_per_frame: int = DEFAULT_MAX_ENTRIES_PER_FRAME) -> None:
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self.max_frame_bytes = max_frame_bytes
        self.max_entries_per_frame = max_entries_per_frame
        self._decoder = FrameDecoder(max_frame_bytes, max_entries_per_frame, session)
        self._encoder = None if session is None else FrameEncoder(
            session, max_frame_bytes, max_entries_per_frame)
        self._received: deque[Message] = deque()
        self._frames_received = 0
        self._failure: str | None = None

    @property
    def session(self) -> bytes | None:
        return self._decoder.session

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def send(self, message: Message, timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
        await self.send_many([message], timeout)

    async def send_many(self, messages: Iterable[Message],
                        timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
        """Send messages in order with one write and one drain."""
        self._check_open()
        encoder = self._session_encoder()
        if encoder is None:
            raise ChannelError(f"cannot send to {self.peer} before its first frame "
                               "sets the session")
        try:
            frames = encoder.encode_many(messages)
        except WireError as exc:  # nothing was sent; the channel stays usable
            raise ChannelError(f"cannot send to {self.peer}: {exc}") from None
        try:
            self._writer.writelines(frames)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            self._fail(f"{self.peer} did not take our frames within {timeout} s")
        except OSError as exc:
            self._fail(f"sending to {self.peer} failed: {_reason(exc)}")

    async def receive(self, timeout: float | None) -> Message:
        """The next message within `timeout` seconds (however slowly its bytes trickle in).
        A timeout leaves the channel open; any other error closes it."""
        try:
            async with asyncio.timeout(timeout):
                while not self._received:
                    await self._read_more()
        except TimeoutError:  # only the deadline: socket errors became ChannelError below
            raise ChannelError(f"no message from {self.peer} within {timeout} s") from None
        return self._received.popleft()

    async def _read_more(self) -> None:
        self._check_open()
        try:
            data = await self._reader.read(_READ_CHUNK)
        except OSError as exc:
            self._fail(f"receiving from {self.peer} failed: {_reason(exc)}")
        if not data:
            if self._decoder.buffered_bytes:
                self._fail(f"{self.peer} closed the channel in the middle of a frame")
            # Before any frame, this is how a TLS 1.3 client learns its certificate was
            # refused: its handshake ends before the server has checked it.
            when = "" if self._frames_received else " before sending any frame"
            self._fail(f"{self.peer} closed the channel{when}")
        try:
            messages = self._decoder.feed(data)
        except WireError as exc:
            self._tell_peer(Error("protocol", str(exc)))
            self._fail(f"bad frame from {self.peer}: {exc}")
        self._frames_received += len(messages)
        self._received.extend(messages)

    def close(self) -> None:
        if self._failure is None:
            self._failure = f"channel to {self.peer} is closed"
        self._writer.close()

    async def aclose(self) -> None:
        """Close and wait (bounded) until the connection is gone."""
        self.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._writer.wait_closed()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise ChannelError(self._failure)

    def _fail(self, reason: str) -> NoReturn:
        self._failure = reason
        self._writer.close()
        raise ChannelError(reason) from None

    def _session_encoder(self) -> FrameEncoder | None:
        """The encoder of our direction, once the session id is known."""
        if self._encoder is None and self._decoder.session is not None:
            self._encoder = FrameEncoder(self._decoder.session, self.max_frame_bytes,
                                         self.max_entries_per_frame)
        return self._encoder

    def _tell_peer(self, message: Message) -> None:
        """Best effort before closing: the peer learns why, if the session is known."""
        encoder = self._session_encoder()
        if encoder is not None and not self._writer.is_closing():
            with contextlib.suppress(WireError, OSError):
                self._writer.write(encoder.encode(message))


async def connect(host: str, port: int, creds: HostCredentials, expected_peer: str,
                  timeout: float, *, session: bytes | None = None,
                  max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                  max_entries_per_frame: int = DEFAULT_MAX_ENTRIES_PER_FRAME) -> Channel:
    """Open a channel to `expected_peer`'s agent at host:port (an address; no DNS names are
    trusted: the server's certificate must name `expected_peer`)."""
    where = f"{expected_peer} at {_endpoint(host, port)}"
    try:
        context = client_context(creds)
    except PkiError as exc:
        raise ChannelError(str(exc)) from None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=expected_peer, limit=_STREAM_LIMIT,
                ssl_handshake_timeout=timeout)
    except TimeoutError:
        raise ChannelError(f"no SC channel to {where} within {timeout} s") from None
    except OSError as exc:
        raise ChannelError(f"cannot open the SC channel to {where}: {_reason(exc)}") from None
    try:
        name, serial = peer_identity(writer.get_extra_info("ssl_object"))
        if name != expected_peer:
            raise PkiError(f"its certificate names {name!r}")
        check_not_revoked(creds, serial)
    except PkiError as exc:
        writer.close()
        raise ChannelError(f"SC channel to {where} refused: {exc}") from None
    return Channel(reader, writer, expected_peer, session=session or new_session(),
                   max_frame_bytes=max_frame_bytes, max_entries_per_frame=max_entries_per_frame)


class ChannelServer:
    """A listening SC server. Unlike a bare asyncio.Server (Python 3.11), closing it also ends
    the connections it is handshaking or serving, and wait_closed() waits for them."""

    def __init__(self, listener: asyncio.Server, connections: set[asyncio.Task[None]]) -> None:
        self._listener = listener
        self._connections = connections

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._listener.sockets)

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1]

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.cancel()

    async def wait_closed(self) -> None:
        await self._listener.wait_closed()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def __aenter__(self) -> ChannelServer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()
        await self.wait_closed()


async def serve(address: str, port: int, creds: HostCredentials,
                on_channel: Callable[[Channel], Awaitable[None]],
                allowed_peers: Callable[[str], bool] | None = None, *,
                handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                max_entries_per_frame: int = DEFAULT_MAX_ENTRIES_PER_FRAME) -> ChannelServer:
    """Accept SC channels on address:port (port 0: any free port); `on_channel` runs once per
    accepted peer and the channel is closed when it returns."""
    try:
        context = server_context(creds)
    except PkiError as exc:
        raise ChannelError(str(exc)) from None

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _endpoint(*writer.get_extra_info("peername")[:2])
        try:
            try:
                # The handshake happens here rather than in the server's own TLS layer, so
                # that a refused client (unknown CA, expired, garbage, silence) is logged.
                async with asyncio.timeout(handshake_timeout):
                    await writer.start_tls(context, ssl_handshake_timeout=handshake_timeout)
                peer, serial = peer_identity(writer.get_extra_info("ssl_object"))
                if allowed_peers is not None and not allowed_peers(peer):
                    raise PkiError(f"host {peer!r} is not allowed")
                check_not_revoked(creds, serial)
            except (OSError, TimeoutError, PkiError) as exc:
                reason = ("TLS handshake timed out" if isinstance(exc, TimeoutError)
                          else _reason(exc))
                log.warning("SC channel from %s refused: %s", client, reason)
                return
            channel = Channel(reader, writer, peer, session=None,
                              max_frame_bytes=max_frame_bytes,
                              max_entries_per_frame=max_entries_per_frame)
            log.info("SC channel from %s (%s) accepted", peer, client)
            try:
                await on_channel(channel)
            except ChannelError as exc:
                log.warning("SC channel from %s failed: %s", peer, exc)
            except Exception:
                log.exception("SC channel handler for %s failed", peer)
            await channel.aclose()
        finally:
            writer.close()  # also when cancelled by ChannelServer.close()

    connections: set[asyncio.Task[None]] = set()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine), so that connection tasks are ours to cancel.
        task = asyncio.create_task(accept(reader, writer))
        connections.add(task)
        task.add_done_callback(connections.discard)

    try:
        listener = await asyncio.start_server(connected, address, port, limit=_STREAM_LIMIT)
    except OSError as exc:
        raise ChannelError(f"cannot listen on {_endpoint(address, port)}: "
                           f"{_reason(exc)}") from None
    return ChannelServer(listener, connections)
