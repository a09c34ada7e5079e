"""The guest command channel: run shell commands in the guest over its second serial port.

QEMU exposes the guest's ttyS1 as a unix socket; the guest's init (init.sh) serves requests
on it. Each request line carries a random nonce and the answer is framed by markers with
that nonce, so anything else on the line (boot noise, answers to earlier requests that timed
out) is skipped. Every `exec` opens its own connection and the guest keeps no state between
requests, so the channel keeps working across reconnects and after a live migration (with a
new `GuestConsole` for the destination's socket).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

_READ_CHUNK = 65536


class GuestConsoleError(RuntimeError):
    """The guest console did not answer (unavailable or timed out); the message is one line."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    output: str  # stdout and stderr, interleaved


class GuestConsole:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        # The guest runs one request at a time; callers queue here, not on the wire.
        self._lock = asyncio.Lock()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the guest's command loop answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GuestConsoleError(
                    f"guest console {self.socket_path} not ready after {timeout:g} s")
            try:
                await self.exec("true", timeout=min(3.0, remaining))
                return
            except GuestConsoleError:
                await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))

    async def exec(self, command: str, timeout: float = 30) -> ExecResult:
        """Run `command` with the guest's sh; `timeout` counts from when it is sent.

        The guest kills the command when its time is up. Background processes it starts
        (`... &`) keep running; give them their own stdout/stderr, since the command's output
        is collected when the command itself exits.
        """
        async with self._lock:
            try:
                return await asyncio.wait_for(self._exec(command, timeout), timeout)
            except TimeoutError:
                raise GuestConsoleError(
                    f"guest command timed out after {timeout:g} s: {_short(command)}") from None

    async def _exec(self, command: str, timeout: float) -> ExecResult:
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError as exc:
            raise GuestConsoleError(
                f"guest console {self.socket_path} unavailable: {exc.strerror or exc}") from None
        try:
            nonce = secrets.token_hex(8)
            script = base64.b64encode(command.encode()).decode()
            # The leading newline ends any partial line left by an earlier writer.
            writer.write(f"\nNSEH {nonce} {math.ceil(timeout)} {script} END\n".encode())
            await writer.drain()
            return await _read_answer(reader, nonce)
        except OSError as exc:
            raise GuestConsoleError(
                f"guest console {self.socket_path} connection lost: {exc.strerror or exc}"
            ) from None
        finally:
            writer.close()


async def _read_answer(reader: asyncio.StreamReader, nonce: str) -> ExecResult:
    answer = re.compile(
        rb"NSEH-BEGIN %s\r?\n(?P<output>[A-Za-z0-9+/=\r\n]*?)NSEH-END %s (?P<status>\d+)\r?\n"
        % (nonce.encode(), nonce.encode()))
    received = bytearray()
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            raise GuestConsoleError("guest console closed the connection")
        received += chunk
        # The end marker comes last: only then is a full match worth looking for.
        if b"NSEH-END " + nonce.encode() not in received[-len(chunk) - 64:]:
            continue
        match = answer.search(received)
        if match is None:
            continue
        try:
            output = base64.b64decode(re.sub(rb"\s", b"", match["output"]), validate=True)
        except binascii.Error:
            raise GuestConsoleError("garbled answer from the guest console") from None
        return ExecResult(exit_code=int(match["status"]), output=output.decode(errors="replace"))


def _short(command: str) -> str:
    first_line = command.strip().splitlines()[0] if command.strip() else ""
    return first_line if len(first_line) <= 60 else first_line[:57] + "..."
