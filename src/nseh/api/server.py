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
    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers

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
                                          limit=MAX_MESSAGE_BYTES, ssl_handshake_timeout=10)

    async def serve_unix(self, path: Path) -> asyncio.Server:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._connection, path, limit=MAX_MESSAGE_BYTES)
        os.chmod(path, 0o600)
        return server

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                await self._one_request(line, writer)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.info("API connection dropped: %s", exc)
        finally:
            writer.close()

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
        writer.write(encode(reply))
        await writer.drain()
