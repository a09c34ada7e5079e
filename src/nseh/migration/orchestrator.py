"""Drives one live migration from the source host's agent.

The protocol's rules live in `phases.MigrationRun`; this module does the I/O of each phase:
calls to the destination agent and QMP commands to the source QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nseh.agent.vms import VM, VMError
from nseh.api.client import AgentClient, AgentError
from nseh.api.server import Emit
from nseh.migration.phases import (
    MigrationRun,
    QemuOutcome,
    migration_report,
    qemu_outcome,
    qemu_progress,
)

log = logging.getLogger(__name__)

SC_MODES = ("none",)
POLL_INTERVAL = 0.05
PROGRESS_INTERVAL = 0.5
TRANSFER_TIMEOUT = 600.0
# QEMU has no connect timeout: a destination that never accepts leaves it in "setup" for
# minutes (TCP SYN retries). Give up much sooner.
SETUP_TIMEOUT = 10.0


class MigrationFailed(RuntimeError):
    pass


class SourceMigration:
    def __init__(self, *, vm: VM, source: str, destination: str, destination_agent: AgentClient,
                 sc_mode: str, emit: Emit) -> None:
        self.vm = vm
        self.destination_agent = destination_agent
        self.emit = emit
        self.run_state = MigrationRun(vm=vm.name, source=source, destination=destination,
                                      sc_mode=sc_mode)
        self.final_info: dict[str, Any] = {}

    def _phase(self, message: str) -> None:
        log.info("migrating %s: %s: %s", self.vm.name, self.run_state.phase, message)
        self.emit({"phase": str(self.run_state.phase), "message": message})

    async def run(self) -> dict[str, Any]:
        """Run the migration to its end; never raises for a failed migration (see report)."""
        started = time.monotonic()
        try:
            await self._prepare()
            self.run_state.advance()
            await self._transfer()
            self.run_state.advance()
            # SWITCHOVER: with sc none, QEMU switches over by itself inside `migrate`.
            self.run_state.advance()
            await self._commit()
            self.run_state.advance()
            self._phase("source releases the VM")
            self.run_state.advance()
        except (MigrationFailed, AgentError, VMError) as exc:
            if self.run_state.fail(str(exc)):
                await self._rollback()
                self.run_state.advance()
            log.error("migration of %s failed: %s", self.vm.name, self.run_state.failure)
        report = migration_report(self.run_state, self.final_info)
        report["elapsed_ms"] = round((time.monotonic() - started) * 1000)
        return report

    async def _prepare(self) -> None:
        self._phase(f"destination {self.run_state.destination} installs the policy "
                    "and starts QEMU -incoming")
        reply = await self.destination_agent.call(
            "migration.prepare",
            {"definition": self.vm.definition.to_json(), "source": self.run_state.source},
            on_event=self.emit, timeout=300)
        self.uri = str(reply["uri"])

    async def _transfer(self) -> None:
        self._phase(f"QEMU pre-copy to {self.uri}")
        async with self.vm.qmp() as qmp:
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True},
                {"capability": "pause-before-switchover", "state": False},
            ]})
            await qmp.execute("migrate", {"uri": self.uri})
            last_progress = 0.0
            setup_deadline = time.monotonic() + SETUP_TIMEOUT
            async with asyncio.timeout(TRANSFER_TIMEOUT):
                while True:
                    info = await qmp.execute("query-migrate")
                    assert isinstance(info, dict)
                    outcome = qemu_outcome(info)
                    if outcome == QemuOutcome.COMPLETED:
                        self.final_info = info
                        return
                    if outcome == QemuOutcome.FAILED:
                        self.final_info = info
                        raise MigrationFailed(
                            f"QEMU migration {info.get('status')}: "
                            f"{info.get('error-desc', 'no reason given')}")
                    now = time.monotonic()
                    if info.get("status") == "setup" and now > setup_deadline:
                        raise MigrationFailed(
                            f"destination {self.uri} did not accept the migration stream "
                            f"within {SETUP_TIMEOUT:.0f} s (management network unreachable?)")
                    if now - last_progress >= PROGRESS_INTERVAL:
                        self.emit({"phase": "transfer", "progress": qemu_progress(info)})
                        last_progress = now
                    await asyncio.sleep(POLL_INTERVAL)

    async def _commit(self) -> None:
        self._phase(f"waiting for {self.vm.name} to run on {self.run_state.destination}")
        await self.destination_agent.call("migration.commit", {"name": self.vm.name}, timeout=60)

    async def _rollback(self) -> None:
        """Purge the destination, keep (or resume) the VM on the source."""
        self._phase(f"rolling back: {self.run_state.failure}")
        with contextlib.suppress(VMError):
            info = await self.vm.execute("query-migrate")
            if info.get("status") not in ("completed", "failed", "cancelled", None):
                await self.vm.execute("migrate_cancel")
        try:
            await self.destination_agent.call("migration.abort", {"name": self.vm.name},
                                              timeout=60)
        except AgentError as exc:
            log.error("could not purge %s from %s: %s", self.vm.name,
                      self.run_state.destination, exc)
        # QEMU leaves a migrated-away VM paused (postmigrate); it must run here again.
        for _ in range(100):
            status = await self.vm.run_status()
            if status == "running":
                return
            if status in ("postmigrate", "paused", "finish-migrate"):
                with contextlib.suppress(VMError):
                    await self.vm.execute("cont")
            await asyncio.sleep(0.05)
        raise VMError(f"{self.vm.name} does not resume on the source (status {status})")

