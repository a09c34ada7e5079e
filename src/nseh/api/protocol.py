"""The agent API's wire format, without I/O.

Newline-delimited JSON over a byte stream (a unix socket locally, TCP between hosts).
A client sends one request per line::

    {"id": 1, "method": "vm.start", "params": {...}}

and the agent answers with zero or more progress events, then exactly one final message::

    {"id": 1, "event": {...}}
    {"id": 1, "result": {...}}                          # or
    {"id": 1, "error": {"code": "not-found", "message": "no VM named 'x' on h1"}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The largest message either side sends; an agent may accept smaller requests
# (`[limits] api_request_bytes`).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ProtocolError(ValueError):
    """The peer sent something that is not a valid API message."""


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    id: int
    event: dict[str, Any]


@dataclass(frozen=True)
class Result:
    id: int
    result: Any


@dataclass(frozen=True)
class Error:
    id: int
    code: str
    message: str


Message = Request | Event | Result | Error


def encode(message: Message) -> bytes:
    match message:
        case Request(id=mid, method=method, params=params):
            body: dict[str, Any] = {"id": mid, "method": method, "params": params}
        case Event(id=mid, event=event):
            body = {"id": mid, "event": event}
        case Result(id=mid, result=result):
            body = {"id": mid, "result": result}
        case Error(id=mid, code=code, message=text):
            body = {"id": mid, "error": {"code": code, "message": text}}
    line = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(line)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return line


def decode(line: bytes) -> Message:
    """Parse one line (without or with its trailing newline) into a message."""
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(line)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(line)
    except ValueError as exc:  # also bad UTF-8 and numbers too long to convert
        raise ProtocolError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("not JSON: nested too deeply") from None
    # bool is an int subclass in Python, but `true` is no request id.
    if not isinstance(body, dict) or type(body.get("id")) is not int:
        raise ProtocolError("message must be an object with an integer id")
    mid = body["id"]
    if "method" in body:
        method, params = body["method"], body.get("params", {})
        if not isinstance(method, str) or not isinstance(params, dict):
            raise ProtocolError("request needs a string method and object params")
        return Request(mid, method, params)
    if "event" in body:
        if not isinstance(body["event"], dict):
            raise ProtocolError("event must be an object")
        return Event(mid, body["event"])
    if "result" in body:
        return Result(mid, body["result"])
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return Error(mid, error["code"], str(error.get("message", "")))
    raise ProtocolError("message is neither request, event, result nor error")
