"""Drives one live migration from the source host's agent.

The protocol's rules live in `phases.MigrationRun`; this module does the I/O of each phase:
calls to the destination agent, QMP commands to the source QEMU, and the SC transfer.

SC modes:
- `none`: QEMU alone (the VM's connections die behind a strict destination firewall);
- `stopcopy`: the whole SC is moved inside QEMU's stop window (the naive baseline);
- `precopy`: bulk copy and rounds of changes while QEMU pre-copies RAM; only the final
  delta is moved inside the stop window.
With an SC mode, QEMU pauses in `pre-switchover` (capability `pause-before-switchover`)
after stopping the VM; the final SC is applied on the destination, then `migrate-continue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from qemu.qmp import QMPClient

from nseh.agent.config import Limits
from nseh.agent.engines import SecurityEngine, VMScope
from nseh.agent.vms import VM, VMError
from nseh.api.client import AgentClient, AgentError
from nseh.api.server import Emit
from nseh.migration.phases import (
    MigrationRun,
    Phase,
    QemuOutcome,
    migration_report,
    qemu_outcome,
    qemu_progress,
)
from nseh.migration.sc_transfer import SC_MODES, ScError, ScSender
from nseh.sc import channel as sc_channel
from nseh.sc.pki import HostCredentials

log = logging.getLogger(__name__)

__all__ = ["ABORTABLE_PHASES", "SC_MODES", "SourceMigration"]

# Phases a rollback drill (`nseh migrate --abort-at`) can fail on purpose.
ABORTABLE_PHASES = (Phase.PREPARE.value, Phase.TRANSFER.value, Phase.SWITCHOVER.value)

TICK = 0.2  # between progress reports and pre-copy SC rounds
TRANSFER_TIMEOUT = 600.0
# QEMU has no connect timeout: a destination that never accepts leaves it in "setup" for
# minutes (TCP SYN retries). Give up much sooner.
SETUP_TIMEOUT = 10.0
SC_CONNECT_TIMEOUT = 10.0


class MigrationFailed(RuntimeError):
    pass


class SourceMigration:
    def __init__(self, *, vm: VM, source: str, destination: str, destination_agent: AgentClient,
                 sc_mode: str, engines: Sequence[SecurityEngine],
                 credentials: HostCredentials | None, limits: Limits, emit: Emit,
                 abort_at: Phase | None = None) -> None:
        self.vm = vm
        self.destination_agent = destination_agent
        self.engines = engines
        self.credentials = credentials
        self.limits = limits  # this host's: the SC frames it sends keep to them
        self.emit = emit
        self.run_state = MigrationRun(vm=vm.name, source=source, destination=destination,
                                      sc_mode=sc_mode)
        self.scope = VMScope(vm.definition, vm.mark)
        self.sc: ScSender | None = None
        self.final_info: dict[str, Any] = {}
        self.destination_sc_entries: int | None = None
        # A rollback drill: fail on purpose once this phase has done its work.
        self.abort_at = abort_at

    def _drill(self, phase: Phase) -> None:
        if self.abort_at == phase:
            raise MigrationFailed(f"aborted in phase {phase} on request (--abort-at)")

    def _phase(self, message: str) -> None:
        log.info("migrating %s: %s: %s", self.vm.name, self.run_state.phase, message)
        self.emit({"phase": str(self.run_state.phase), "message": message})

    async def run(self) -> dict[str, Any]:
        """Run the migration to its end; a failed migration is reported, not raised."""
        started = time.monotonic()
        try:
            reply = await self._prepare()
            if self.run_state.sc_mode != "none":
                await self._open_sc(reply["sc"])
            self._drill(Phase.PREPARE)
            self.run_state.advance()
            await self._transfer()  # includes an SC switchover, driven by QEMU's events
            if self.run_state.phase == Phase.TRANSFER:  # QEMU switched over by itself
                self.run_state.advance()
            self.run_state.advance()
            await self._commit()
            self.run_state.advance()
            self._phase("source releases the VM and purges its SC")
            self.run_state.advance()
        except (MigrationFailed, AgentError, VMError, ScError, sc_channel.ChannelError) as exc:
            if self.run_state.fail(str(exc)):
                await self._rollback()
                self.run_state.advance()
            log.error("migration of %s failed: %s", self.vm.name, self.run_state.failure)
        finally:
            if self.sc is not None:
                self.sc.close()
        report = migration_report(self.run_state, self.final_info)
        report["elapsed_ms"] = round((time.monotonic() - started) * 1000)
        if self.sc is not None:
            report["sc"] = self.sc.stats.to_json()
            report["sc"]["destination_entries"] = self.destination_sc_entries
        return report

    async def _prepare(self) -> dict[str, Any]:
        self._phase(f"destination {self.run_state.destination} installs the policy "
                    "and starts QEMU -incoming")
        policies = {e.name: e.export_policy(self.scope) for e in self.engines}
        reply: dict[str, Any] = await self.destination_agent.call(
            "migration.prepare",
            {"definition": self.vm.definition.to_json(), "source": self.run_state.source,
             "policies": policies},
            on_event=self.emit, timeout=300)
        self.uri = str(reply["uri"])
        return reply

    async def _open_sc(self, endpoint: dict[str, Any]) -> None:
        if self.credentials is None:
            raise MigrationFailed("this host has no TLS credentials for the SC channel "
                                  "(tls_cert, tls_key, tls_ca in its agent configuration)")
        self._phase(f"SC channel to {endpoint['host']} at "
                    f"{endpoint['address']}:{endpoint['port']} (mutual TLS)")
        channel = await sc_channel.connect(
            endpoint["address"], int(endpoint["port"]), self.credentials,
            expected_peer=endpoint["host"], timeout=SC_CONNECT_TIMEOUT,
            max_frame_bytes=self.limits.sc_frame_bytes,
            max_entries_per_frame=self.limits.sc_entries_per_frame)
        self.sc = ScSender(channel, self.engines, self.scope, self.run_state.sc_mode)
        await self.sc.hello(self.run_state.source)
        if self.run_state.sc_mode == "precopy":
            self.sc.start_tracking()  # before the bulk snapshot, so no change is missed
            # The bulk copy goes before QEMU's pre-copy, not beside it: QEMU cannot be kept
            # from converging (an idle guest has no dirty pages, and QEMU then switches over
            # whatever the downtime limit), so a bulk copy still running at that point
            # would land in the stop window. Change rounds do run beside RAM pre-copy.
            await self.sc.send_bulk()
            self._phase(f"SC bulk copy: {self.sc.stats.entries} entries, "
                        f"{self.sc.stats.bytes} bytes")

    async def _transfer(self) -> None:
        self._phase(f"QEMU pre-copy to {self.uri}")
        pause = self.sc is not None
        async with self.vm.qmp() as qmp:
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True},
                {"capability": "pause-before-switchover", "state": pause},
            ]})
            with qmp.listener(("MIGRATION",)) as events:
                await qmp.execute("migrate", {"uri": self.uri})
                setup_deadline = time.monotonic() + SETUP_TIMEOUT
                async with asyncio.timeout(TRANSFER_TIMEOUT):
                    while True:
                        try:
                            event = await asyncio.wait_for(events.get(), TICK)
                            status = {"status": event["data"]["status"]}
                        except TimeoutError:
                            status = await self._tick(qmp, setup_deadline)
                        outcome = qemu_outcome(status)
                        if outcome == QemuOutcome.PRE_SWITCHOVER:
                            await self._switchover(qmp)
                        elif outcome in (QemuOutcome.COMPLETED, QemuOutcome.FAILED):
                            info = await self._final_figures(qmp)
                            self.final_info = info
                            if outcome == QemuOutcome.FAILED:
                                raise MigrationFailed(
                                    f"QEMU migration {info.get('status')}: "
                                    f"{info.get('error-desc', 'no reason given')}")
                            return

    @staticmethod
    async def _final_figures(qmp: QMPClient) -> dict[str, Any]:
        """QEMU's final `query-migrate`. QEMU announces `completed` before it has computed
        the total time and downtime, so ask again until they are there (briefly)."""
        for _ in range(50):
            info = await qmp.execute("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") != "completed" or info.get("total-time"):
                break
            await asyncio.sleep(0.01)
        return info

    async def _tick(self, qmp: QMPClient, setup_deadline: float) -> dict[str, Any]:
        """Between QEMU events: progress, the setup deadline, a pre-copy SC round."""
        info = await qmp.execute("query-migrate")
        assert isinstance(info, dict)
        if info.get("status") == "setup" and time.monotonic() > setup_deadline:
            raise MigrationFailed(
                f"destination {self.uri} did not accept the migration stream within "
                f"{SETUP_TIMEOUT:.0f} s (management network unreachable?)")
        self.emit({"phase": "transfer", "progress": qemu_progress(info)})
        if info.get("status") == "active":
            if self.sc is not None and self.run_state.sc_mode == "precopy":
                await self.sc.send_changes()
            self._drill(Phase.TRANSFER)
        return info

    async def _switchover(self, qmp: QMPClient) -> None:
        assert self.sc is not None
        self.run_state.advance()  # TRANSFER -> SWITCHOVER
        await self.sc.send_final()
        self._drill(Phase.SWITCHOVER)
        await qmp.execute("migrate-continue", {"state": "pre-switchover"})
        self._phase(f"final SC ({self.sc.stats.final_delta} records) applied in "
                    f"{self.sc.stats.stop_window_ms:.1f} ms; QEMU switches over")

    async def _commit(self) -> None:
        self._phase(f"waiting for {self.vm.name} to run on {self.run_state.destination}")
        reply = await self.destination_agent.call("migration.commit", {"name": self.vm.name},
                                                  timeout=60)
        self.destination_sc_entries = reply.get("sc_entries")
        if self.sc is not None:
            with contextlib.suppress(sc_channel.ChannelError):
                await self.sc.commit()

    async def _rollback(self) -> None:
        """Purge the destination, keep (or resume) the VM on the source."""
        self._phase(f"rolling back: {self.run_state.failure}")
        if self.sc is not None:
            await self.sc.abort(self.run_state.failure or "migration failed")
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
        # QEMU leaves a migrated-away or cancelled VM paused; it must run here again.
        status = "unknown"
        for _ in range(100):
            status = await self.vm.run_status()
            if status == "running":
                return
            if status in ("postmigrate", "paused", "finish-migrate"):
                with contextlib.suppress(VMError):
                    await self.vm.execute("cont")
            await asyncio.sleep(0.05)
        log.error("%s does not resume on the source (QEMU status %s)", self.vm.name, status)
