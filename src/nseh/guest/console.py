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
import contextlib
import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

_READ_CHUNK = 65536
_PROBE_INTERVAL = 1.0  # seconds between readiness probes


class GuestConsoleError(RuntimeError):
    """The guest console did not answer (unavailable or timed out); the message is one line."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    output: str  # stdout and stderr, interleaved


class GuestConsole:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._lock = asyncio.Lock()
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _turn(self) -> asyncio.Lock:
        """The lock callers queue on: the guest runs one request at a time."""
        # An asyncio.Lock binds to the loop it first waits in; a console may be used from
        # several loops one after the other (asyncio.run per call), so one lock per loop.
        loop = asyncio.get_running_loop()
        if self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the guest's command loop answers (QEMU may not have started yet)."""
        async with self._turn():
            try:
                await asyncio.wait_for(self._probe_until_ready(), timeout)
            except TimeoutError:
                raise GuestConsoleError(
                    f"guest console {self.socket_path} not ready after {timeout:g} s") from None

    async def _probe_until_ready(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:  # QEMU not listening yet
                await asyncio.sleep(_PROBE_INTERVAL / 5)
                continue
            try:
                # One connection, a probe per interval: the guest reads the line as soon as
                # its command loop starts. Probes sent earlier are still queued then; they are
                # empty commands, which the guest answers without running anything.
                probes: list[bytes] = []
                received = bytearray()
                while True:
                    nonce = secrets.token_hex(8)
                    probes.append(b"NSEH-END %s " % nonce.encode())
                    writer.write(_request(nonce, "", _PROBE_INTERVAL))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        chunk = await asyncio.wait_for(reader.read(_READ_CHUNK), _PROBE_INTERVAL)
                        if not chunk:
                            break
                        received += chunk
                        if any(probe in received for probe in probes):
                            return
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(_PROBE_INTERVAL / 5)

    async def exec(self, command: str, timeout: float = 30) -> ExecResult:
        """Run `command` with the guest's sh; `timeout` counts once it is this caller's turn.

        The guest kills the command when its time is up. Background processes it starts
        (`... &`) keep running; give them their own stdout/stderr, since the command's output
        is collected when the command itself exits.
        """
        async with self._turn():
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
            writer.write(_request(nonce, command, timeout))
            await writer.drain()
            answer = await _read_answer(reader, nonce)
            if answer is None:
                raise GuestConsoleError(f"guest console {self.socket_path} closed the connection")
            return answer
        except OSError as exc:
            raise GuestConsoleError(
                f"guest console {self.socket_path} connection lost: {exc.strerror or exc}"
            ) from None
        finally:
            writer.close()


def _request(nonce: str, command: str, timeout: float) -> bytes:
    script = base64.b64encode(command.encode()).decode() or "-"
    # The leading newline ends any partial line left by an earlier writer.
    return f"\nNSEH {nonce} {math.ceil(timeout)} {script} END\n".encode()


async def _read_answer(reader: asyncio.StreamReader, nonce: str) -> ExecResult | None:
    """The answer to request `nonce`, skipping everything else; None if the line closes."""
    answer = re.compile(
        rb"NSEH-BEGIN %s\r?\n(?P<output>[A-Za-z0-9+/=\r\n]*?)NSEH-END %s (?P<status>\d+)\r?\n"
        % (nonce.encode(), nonce.encode()))
    received = bytearray()
    while True:
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            return None
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
