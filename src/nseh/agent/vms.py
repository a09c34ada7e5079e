"""VMs on one host: their QEMU processes, QMP, the guest console, and their on-disk records.

QEMU daemonizes, so a VM outlives the agent that started it; the record on disk
(`<state_dir>/vms/<name>/vm.json`) is what lets a restarted agent re-adopt it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from nseh.agent.qemu import VMRunFiles, qemu_command
from nseh.definition import VMDefinition
from nseh.guest.console import GuestConsole
from nseh.guest.image import GuestImage

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT = 5.0  # for QEMU's QMP greeting


class VMError(RuntimeError):
    """A VM operation failed; one-line message."""


class VMState(StrEnum):
    RUNNING = "running"  # the VM runs here and this host owns it
    INCOMING = "incoming"  # QEMU waits for a migration stream from another host
    MIGRATING = "migrating"  # this host owns the VM and is sending it away
    CRASHED = "crashed"  # the record exists but its QEMU is gone


@dataclass
class VM:
    definition: VMDefinition
    mark: int
    state: VMState
    record_dir: Path
    accel: str
    # The host the VM came from by migration (kept after it arrived: a repeated COMMIT from
    # that host is answered again).
    incoming_from: str | None = None
    # While MIGRATING: where to, and that host's agent endpoint, so that a restarted agent
    # can finish or roll back the migration.
    migrating_to: str | None = None
    migration_endpoint: str | None = None
    # False until QEMU has been started: a VM being created has no QEMU yet, and that is
    # not a crash.
    launched: bool = True
    console: GuestConsole = field(init=False)

    def __post_init__(self) -> None:
        self.console = GuestConsole(self.files.guest_socket)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def files(self) -> VMRunFiles:
        return VMRunFiles(self.record_dir / "run")

    # -- persistence -------------------------------------------------------------------

    def save(self) -> None:
        record = {"definition": self.definition.to_json(), "mark": self.mark,
                  "state": self.state.value, "accel": self.accel,
                  "incoming_from": self.incoming_from, "migrating_to": self.migrating_to,
                  "migration_endpoint": self.migration_endpoint}
        tmp = self.record_dir / "vm.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.record_dir / "vm.json")

    @classmethod
    def load(cls, record_dir: Path) -> VM:
        record = json.loads((record_dir / "vm.json").read_text())
        return cls(definition=VMDefinition.from_json(record["definition"]), mark=record["mark"],
                   state=VMState(record["state"]), record_dir=record_dir,
                   accel=record["accel"], incoming_from=record.get("incoming_from"),
                   migrating_to=record.get("migrating_to"),
                   migration_endpoint=record.get("migration_endpoint"))

    def forget(self) -> None:
        shutil.rmtree(self.record_dir, ignore_errors=True)

    # -- the QEMU process ----------------------------------------------------------------

    def pid(self) -> int | None:
        """The QEMU process's pid if it is alive and really is this VM's QEMU."""
        try:
            pid = int(self.files.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.files.run_dir).encode() in cmdline else None

    async def launch(self, image: GuestImage, tap: str, incoming: str | None = None) -> None:
        """Start QEMU (daemonized); returns once QEMU is up (and listening, with `incoming`)."""
        run_dir = self.files.run_dir
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        argv = qemu_command(image=image, definition=self.definition, tap=tap, run_dir=run_dir,
                            accel=self.accel, incoming=incoming)
        log.info("starting QEMU for %s: %s", self.name, " ".join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            lines = output.decode(errors="replace").strip().splitlines()
            # A daemonized QEMU reports what failed after its fork in its log (-D).
            said = lines[-1] if lines else self.qemu_said(lines=1)
            raise VMError(f"QEMU for {self.name} failed to start: "
                          f"{said or f'exit status {proc.returncode}'}")
        self.launched = True

    @contextlib.asynccontextmanager
    async def qmp(self) -> AsyncIterator[QMPClient]:
        client = QMPClient(f"nseh-{self.name}")
        try:
            await asyncio.wait_for(client.connect(str(self.files.qmp)), QMP_CONNECT_TIMEOUT)
        except TimeoutError:
            raise VMError(f"cannot reach QEMU of {self.name} over QMP: no answer in "
                          f"{QMP_CONNECT_TIMEOUT:g} s") from None
        except (OSError, QMPError) as exc:
            raise VMError(f"cannot reach QEMU of {self.name} over QMP: {exc}") from None
        try:
            yield client
        finally:
            # After `quit` QEMU closes the socket first; that is not an error.
            with contextlib.suppress(QMPError, EOFError, OSError):
                await client.disconnect()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        async with self.qmp() as client:
            try:
                return await client.execute(command, arguments)
            except QMPError as exc:
                raise VMError(f"QMP {command} on {self.name} failed: {exc}") from None

    def qemu_said(self, lines: int = 3) -> str:
        """The last lines QEMU logged (its errors), joined in one line; empty if none."""
        try:
            text = self.files.log.read_text(errors="replace")
        except OSError:
            return ""
        return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    async def run_status(self) -> str:
        """QEMU's run state (running, paused, inmigrate, postmigrate, ...)."""
        status = await self.execute("query-status")
        return str(status["status"])

    async def wait_running(self, timeout: float) -> str | None:
        """Wait until QEMU runs the VM: None once it does, else why not (one line). One QMP
        session is polled; a session that fails while QEMU lives is opened again (QEMU
        takes one client at a time, and a connection refused in its hand-over between
        two clients is no sign that the VM does not run)."""
        problem = "no answer"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        async with self.qmp() as client:
                            while (status := (await client.execute("query-status"))["status"]
                                   ) != "running":
                                problem = f"QEMU's run state is {status}"
                                await asyncio.sleep(0.02)
                            return None
                    except (VMError, QMPError, EOFError, OSError) as exc:
                        problem = str(exc) or type(exc).__name__
                        if self.pid() is None:
                            return f"QEMU exited ({problem})"
                    await asyncio.sleep(0.1)
        except TimeoutError:
            return f"{problem}, after {timeout:.0f} s"

    async def resume(self) -> bool:
        """Make the VM run again here after a migration that did not happen (QEMU leaves a
        cancelled or migrated-away VM paused). False if it does not run within 5 s."""
        status = "unknown"
        for _ in range(100):
            with contextlib.suppress(VMError):
                status = await self.run_status()
                if status == "running":
                    return True
                if status in ("postmigrate", "paused", "finish-migrate"):
                    await self.execute("cont")
            await asyncio.sleep(0.05)
        log.error("%s does not resume (QEMU status %s)", self.name, status)
        return False

    async def kill(self) -> None:
        """Stop QEMU: politely over QMP, then by signal."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(VMError):
            await self.execute("quit")
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            for _ in range(50):
                if self.pid() is None:
                    return
                await asyncio.sleep(0.05)
        raise VMError(f"QEMU of {self.name} (pid {pid}) does not exit")

    def describe(self, host: str) -> dict[str, Any]:
        net = self.definition.network
        return {
            "name": self.name, "host": host, "state": self.state.value,
            "ipv4": str(net.ipv4) if net.ipv4 else None,
            "ipv6": str(net.ipv6) if net.ipv6 else None,
            "floating_ipv4": str(net.floating_ipv4) if net.floating_ipv4 else None,
            "floating_ipv6": str(net.floating_ipv6) if net.floating_ipv6 else None,
            "mac": self.definition.mac, "memory_mib": self.definition.memory_mib,
            "mark": self.mark, "pid": self.pid(), "accel": self.accel,
        }


def load_all(vms_dir: Path) -> dict[str, VM]:
    """Every VM record under `vms_dir`; unreadable records are logged and skipped."""
    vms: dict[str, VM] = {}
    for record in sorted(vms_dir.glob("*/vm.json")):
        try:
            vm = VM.load(record.parent)
        except (OSError, ValueError, KeyError) as exc:
            log.error("ignoring unreadable VM record %s: %s", record, exc)
            continue
        vms[vm.name] = vm
    return vms
