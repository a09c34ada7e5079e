"""Asyncio client for a host agent's API (see `protocol` for the format)."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

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

EventHandler = Callable[[dict[str, Any]], None]

_request_ids = itertools.count(1)


class AgentError(Exception):
    """The agent refused or failed a request, or could not be reached; one-line message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def open_endpoint(endpoint: str, tls: ssl.SSLContext | None = None
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to `unix:///path/to.sock`, or `tls://HOST@ADDRESS:PORT` (mutual TLS; the
    agent's certificate must name HOST; `tls` holds the caller's certificate)."""
    url = urlsplit(endpoint)
    try:
        if url.scheme == "unix":
            return await asyncio.open_unix_connection(url.path, limit=MAX_MESSAGE_BYTES)
        if url.scheme == "tls" and url.username and url.hostname and url.port:
            if tls is None:
                raise AgentError("no-credentials", f"{endpoint} needs TLS client credentials "
                                                   "(the inventory's [tls] section)")
            return await asyncio.open_connection(
                url.hostname, url.port, ssl=tls, server_hostname=url.username,
                limit=MAX_MESSAGE_BYTES, ssl_handshake_timeout=10)
    except OSError as exc:  # ssl.SSLError included
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise AgentError("unreachable", f"agent at {endpoint} unreachable: {reason}") from None
    raise AgentError("bad-endpoint", f"unsupported agent endpoint {endpoint!r} (use "
                                     "unix:///path or tls://HOST@ADDRESS:PORT)")


class AgentClient:
    """Talks to one agent. Each call uses its own connection, so calls may run concurrently."""

    def __init__(self, endpoint: str, *, tls: ssl.SSLContext | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.tls = tls
        self.connect_timeout = connect_timeout

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   on_event: EventHandler | None = None, timeout: float | None = 120.0) -> Any:
        try:
            reader, writer = await asyncio.wait_for(open_endpoint(self.endpoint, self.tls),
                                                    self.connect_timeout)
        except TimeoutError:
            raise AgentError("unreachable", f"agent at {self.endpoint} did not answer") from None
        try:
            request = Request(next(_request_ids), method, params or {})
            writer.write(encode(request))
            await writer.drain()
            return await asyncio.wait_for(self._final_reply(reader, request, on_event), timeout)
        except TimeoutError:
            raise AgentError("timeout",
                             f"{method} on {self.endpoint}: no answer in {timeout} s") from None
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise AgentError("disconnected",
                             f"{method} on {self.endpoint}: connection lost ({exc})") from None
        finally:
            writer.close()

    async def _final_reply(self, reader: asyncio.StreamReader, request: Request,
                           on_event: EventHandler | None) -> Any:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # how StreamReader says the line is longer than its limit
                raise AgentError("protocol", f"reply from {self.endpoint} exceeds "
                                             f"{MAX_MESSAGE_BYTES} bytes") from None
            if not line:
                raise ConnectionError("agent closed the connection")
            try:
                message = decode(line)
            except ProtocolError as exc:
                raise AgentError("protocol", f"bad reply from {self.endpoint}: {exc}") from None
            if message.id != request.id:
                raise AgentError("protocol", f"reply for request {message.id}, "
                                             f"expected {request.id}")
            match message:
                case Event(event=event):
                    if on_event is not None:
                        on_event(event)
                case Result(result=result):
                    return result
                case Error(code=code, message=text):
                    raise AgentError(code, text)
                case _:
                    raise AgentError("protocol", f"unexpected message from {self.endpoint}")
