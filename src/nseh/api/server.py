"""Asyncio server side of the agent API: reads requests, dispatches them, writes replies."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nseh.api.protocol import (
    MAX_MESSAGE_BYTES,
    Error,
    Event,
    ProtocolError,
    Request,
    Result,
    decode,
    encode,
)
from nseh.sc.pki import (
    HostCredentials,
    PkiError,
    check_not_revoked,
    peer_identity,
    server_context,
)

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]


class ApiError(Exception):
    """Raised by a handler to answer with an error code and a one-line message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ApiServer:
    def __init__(self, handlers: dict[str, Handler],
                 max_request_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.handlers = handlers
        # A longer request line is answered with an error and ends the connection.
        self.max_request_bytes = max_request_bytes

    async def serve_tls(self, address: str, port: int,
                        credentials: HostCredentials) -> asyncio.Server:
        """Serve on TCP with mutual TLS: only holders of a certificate from the cluster CA
        (hosts, operators) that is not revoked may call."""
        context = server_context(credentials)

        async def connection(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
            try:
                peer, serial = peer_identity(writer.get_extra_info("ssl_object"))
                check_not_revoked(credentials, serial)
            except PkiError as exc:
                log.warning("API connection from %s refused: %s",
                            writer.get_extra_info("peername"), exc)
                writer.close()
                return
            log.debug("API connection from %s", peer)
            await self._connection(reader, writer)

        return await asyncio.start_server(connection, address, port, ssl=context,
                                          limit=self.max_request_bytes,
                                          ssl_handshake_timeout=10)

    async def serve_unix(self, path: Path) -> asyncio.Server:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._connection, path,
                                                 limit=self.max_request_bytes)
        os.chmod(path, 0o600)
        return server

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            while line := await self._request_line(reader, writer):
                await self._one_request(line, writer)
        except ConnectionError as exc:
            log.info("API connection dropped: %s", exc)
        finally:
            writer.close()

    async def _request_line(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> bytes:
        """The next request line; empty at the end of the connection, and after a line over
        the limit, which is answered with an error (the rest of it cannot be told apart from
        the next request)."""
        try:
            return await reader.readline()
        except ValueError:  # how StreamReader says the line is longer than its limit
            message = (f"request line exceeds limits.api_request_bytes = "
                       f"{self.max_request_bytes} bytes")
            log.info("API connection dropped: %s", message)
            writer.write(encode(Error(0, "too-large", message)))
            await writer.drain()
            return b""

    async def _one_request(self, line: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            request = decode(line)
        except ProtocolError as exc:
            writer.write(encode(Error(0, "protocol", str(exc))))
            return
        if not isinstance(request, Request):
            writer.write(encode(Error(request.id, "protocol", "expected a request")))
            return
        handler = self.handlers.get(request.method)
        if handler is None:
            writer.write(encode(Error(request.id, "unknown-method",
                                      f"unknown method {request.method!r}")))
            return

        def emit(event: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(encode(Event(request.id, event)))

        try:
            result = await handler(request.params, emit)
            reply: Result | Error = Result(request.id, result)
        except ApiError as exc:
            log.info("%s refused: %s", request.method, exc)
            reply = Error(request.id, exc.code, str(exc))
        except Exception as exc:
            log.exception("%s failed", request.method)
            reply = Error(request.id, "internal", f"{request.method} failed: {exc!r}")
        try:
            line = encode(reply)
        except ProtocolError as exc:  # a result too large for the protocol
            log.error("%s: %s", request.method, exc)
            line = encode(Error(request.id, "too-large",
                                f"the result of {request.method} is too large: {exc}"))
        writer.write(line)
        await writer.drain()
