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

from qemu.qmp import EventListener, QMPClient, QMPError

from nseh.agent.config import Limits
from nseh.agent.engines import SecurityEngine, VMScope
from nseh.agent.vms import VM, VMError
from nseh.api.client import AgentClient, AgentError
from nseh.api.server import Emit
from nseh.migration.phases import (
    Handover,
    MigrationRun,
    Phase,
    QemuOutcome,
    handover_from_commit_error,
    migration_report,
    qemu_outcome,
    qemu_progress,
)
from nseh.migration.sc_transfer import SC_MODES, ScError, ScSender
from nseh.sc import channel as sc_channel
from nseh.sc.pki import HostCredentials

log = logging.getLogger(__name__)

__all__ = ["ABORTABLE_PHASES", "HOLDABLE_PHASES", "SC_MODES", "SourceMigration",
           "settle_handover"]

# Phases a rollback drill (`nseh migrate --abort-at`) can fail on purpose.
ABORTABLE_PHASES = (Phase.PREPARE.value, Phase.TRANSFER.value, Phase.SWITCHOVER.value)
# Phases a fault drill (`--hold-at`) can pause in, once its work is done: after the SC bulk
# copy; during RAM pre-copy; in pre-switchover (VM stopped); after QEMU handed the VM over.
HOLDABLE_PHASES = (*ABORTABLE_PHASES, Phase.COMMIT.value)

# Between progress reports and pre-copy SC rounds: the final delta holds what changed since
# the last round, so a short tick keeps it small.
TICK = 0.05
TRANSFER_TIMEOUT = 600.0
# QEMU has no connect timeout: a destination that never accepts leaves it in "setup" for
# minutes (TCP SYN retries). Give up much sooner.
SETUP_TIMEOUT = 10.0
# An active migration that moves no RAM for this long is stalled (e.g. the management link is
# down; QEMU itself would wait for TCP to give up, many minutes).
STALL_TIMEOUT = 20.0
# QEMU answers QMP from its main loop, which its migration thread blocks (holding the big
# lock) while a write to a dead stream hangs, e.g. the device state after switchover.
QMP_TIMEOUT = 10.0
SC_CONNECT_TIMEOUT = 10.0
COMMIT_CALL_TIMEOUT = 60.0


class MigrationFailed(RuntimeError):
    pass


class QemuUnresponsive(RuntimeError):
    """QEMU did not answer a QMP command within QMP_TIMEOUT during the migration."""


class SourceMigration:
    def __init__(self, *, vm: VM, source: str, destination: str, destination_agent: AgentClient,
                 sc_mode: str, engines: Sequence[SecurityEngine],
                 credentials: HostCredentials | None, limits: Limits, emit: Emit,
                 abort_at: Phase | None = None, hold_at: Phase | None = None,
                 hold_seconds: float = 0.0) -> None:
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
        self._moved: tuple[int, float] = (-1, time.monotonic())  # RAM sent, when it changed
        self._qemu_states: list[tuple[str, float | None]] = []  # QEMU's events: state, stamp
        self.destination_sc_entries: int | None = None
        # Drills: fail on purpose (rollback drill), or pause (fault drill: time to inject a
        # fault), once this phase has done its work.
        self.abort_at = abort_at
        self.hold_at, self.hold_seconds = hold_at, hold_seconds

    async def _drill(self, phase: Phase) -> None:
        if self.hold_at == phase:
            self.hold_at = None  # once: transfer passes here on every tick
            self._phase(f"holding {self.hold_seconds:g} s in phase {phase} (--hold-at)")
            await asyncio.sleep(self.hold_seconds)
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
            await self._drill(Phase.PREPARE)
            self.run_state.advance()
            await self._transfer()  # includes an SC switchover, driven by QEMU's events
            if self.run_state.phase == Phase.TRANSFER:  # QEMU switched over by itself
                self.run_state.advance()
            self.run_state.advance()  # COMMIT: QEMU has handed the VM over
            await self._drill(Phase.COMMIT)
            await self._commit()
            self.run_state.advance()
        except Exception as exc:  # whatever failed, the VM must not be left half-migrated
            reason = str(exc)
            if not isinstance(exc, MigrationFailed | AgentError | VMError | ScError
                              | sc_channel.ChannelError):
                log.exception("migration of %s: unexpected error", self.vm.name)
                reason = f"internal error: {type(exc).__name__}: {exc}"
            if self.run_state.phase == Phase.SWITCHOVER and await self._handed_over():
                self.run_state.advance()  # failed after migrate-continue: settle, not roll back
            if self.run_state.fail(reason):
                await self._rollback()
                self.run_state.advance()
            elif self.run_state.unsettled:
                await self._settle()
            if self.run_state.failure:
                log.error("migration of %s failed: %s", self.vm.name, self.run_state.failure)
        finally:
            if self.sc is not None:
                self.sc.close()
        if self.run_state.phase == Phase.CLEANUP:
            self._phase("source releases the VM and purges its SC")
            self.run_state.advance()
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
            await self._ask(qmp, "migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True},
                {"capability": "pause-before-switchover", "state": pause},
            ]})
            with qmp.listener(("MIGRATION", "STOP")) as events:
                await self._ask(qmp, "migrate", {"uri": self.uri})
                try:
                    async with asyncio.timeout(TRANSFER_TIMEOUT):
                        await self._follow(qmp, events)
                except QemuUnresponsive as exc:
                    # Cutting QEMU's stream fails its migration and frees its main loop.
                    await self._cut_stream()
                    raise MigrationFailed(f"{exc}; cut its migration stream") from None

    async def _follow(self, qmp: QMPClient, events: EventListener) -> None:
        """Follow QEMU's migration to its end, doing the SC's part at each step."""
        setup_deadline = time.monotonic() + SETUP_TIMEOUT
        while True:
            emitted_at = None
            try:
                event = await asyncio.wait_for(events.get(), TICK)
                stamp = event.get("timestamp", {})
                emitted_at = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6 or None
                if event["event"] == "STOP":  # QEMU stopped the VM: its downtime starts
                    self._qemu_states.append(("VM stopped", emitted_at))
                    continue
                status = {"status": event["data"]["status"]}
                self._qemu_states.append((status["status"], emitted_at))
            except TimeoutError:
                status = await self._tick(qmp, setup_deadline)
            outcome = qemu_outcome(status)
            if self.run_state.switchover_due(outcome):
                await self._switchover(qmp, emitted_at)
            elif outcome in (QemuOutcome.COMPLETED, QemuOutcome.FAILED):
                info = await self._final_figures(qmp)
                self.final_info = info
                self._log_qemu_states()
                if outcome == QemuOutcome.FAILED:
                    raise MigrationFailed(f"QEMU migration {info.get('status')}: "
                                          f"{info.get('error-desc', 'no reason given')}")
                return

    def _log_qemu_states(self) -> None:
        """QEMU's migration states (and the VM's stop) as its events stamped them, each with
        the time since the one before: where the downtime went (VM stopped -> completed;
        pre-switchover -> device is the SC's pause)."""
        states = [(name, at) for name, at in self._qemu_states if at is not None]
        steps = [f"{name} +{(at - states[i - 1][1]) * 1000:.1f} ms" if i else name
                 for i, (name, at) in enumerate(states)]
        log.info("migrating %s: QEMU states: %s", self.vm.name, ", ".join(steps))
        stamps = dict(states)
        if self.sc is not None and {"pre-switchover", "device"} <= stamps.keys():
            # QEMU's own measure of its pause, from the stamps of the events at its two ends.
            self.sc.stats.pause_ms = (stamps["device"] - stamps["pre-switchover"]) * 1000

    async def _cut_stream(self) -> None:
        """Destroy QEMU's migration connection (sock_diag, via `ss -K`)."""
        _, _, rest = self.uri.partition(":")
        address, _, port = rest.rpartition(":")
        process = await asyncio.create_subprocess_exec(
            "ss", "-K", "dst", address.strip("[]"), "dport", "=", f":{port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await process.wait()
        log.warning("migrating %s: QEMU stopped answering; cut its stream to %s", self.vm.name,
                    self.uri)


    @staticmethod
    async def _ask(qmp: QMPClient, command: str, arguments: dict[str, Any] | None = None
                   ) -> Any:
        """A QMP command during the migration, which QEMU must answer within QMP_TIMEOUT."""
        try:
            return await asyncio.wait_for(qmp.execute(command, arguments), QMP_TIMEOUT)
        except TimeoutError:
            raise QemuUnresponsive(f"QEMU did not answer {command} within "
                                   f"{QMP_TIMEOUT:.0f} s") from None
        except QMPError as exc:
            raise MigrationFailed(f"QEMU refused {command}: {exc}") from None

    async def _final_figures(self, qmp: QMPClient) -> dict[str, Any]:
        """QEMU's final `query-migrate`. QEMU announces `completed` before it has computed
        the total time and downtime, so ask again until they are there (briefly)."""
        for _ in range(50):
            info = await self._ask(qmp, "query-migrate")
            assert isinstance(info, dict)
            if info.get("status") != "completed" or info.get("total-time"):
                break
            await asyncio.sleep(0.01)
        return info

    async def _tick(self, qmp: QMPClient, setup_deadline: float) -> dict[str, Any]:
        """Between QEMU events: progress, the setup deadline, a pre-copy SC round."""
        info = await self._ask(qmp, "query-migrate")
        assert isinstance(info, dict)
        if info.get("status") == "setup" and time.monotonic() > setup_deadline:
            raise MigrationFailed(
                f"destination {self.uri} did not accept the migration stream within "
                f"{SETUP_TIMEOUT:.0f} s (management network unreachable?)")
        progress = qemu_progress(info)
        self.emit({"phase": "transfer", "progress": progress})
        if info.get("status") in ("active", "device"):
            now = time.monotonic()
            if progress["ram_transferred"] != self._moved[0]:
                self._moved = (progress["ram_transferred"], now)
            elif now - self._moved[1] > STALL_TIMEOUT:
                raise MigrationFailed(f"QEMU sent no RAM for {STALL_TIMEOUT:.0f} s "
                                      "(management network down?)")
        if info.get("status") == "active":
            if self.sc is not None and self.run_state.sc_mode == "precopy":
                await self.sc.send_changes()
            await self._drill(Phase.TRANSFER)
        return info

    async def _switchover(self, qmp: QMPClient, paused_at: float | None) -> None:
        """`paused_at`: QEMU's (wall-clock) time stamp of its pre-switchover event, if the
        pause was seen through the event rather than a poll."""
        assert self.sc is not None
        seen = time.time()
        self.run_state.advance()  # TRANSFER -> SWITCHOVER
        await self.sc.send_final()
        await self._drill(Phase.SWITCHOVER)
        applied = time.time()
        await self._ask(qmp, "migrate-continue", {"state": "pre-switchover"})
        self._moved = (-1, time.monotonic())  # the pause is not a stall
        # Where QEMU's pause went: noticing it, the final SC, QEMU taking the continue.
        timing = f"continue answered in {(time.time() - applied) * 1000:.1f} ms"
        if paused_at is not None:
            timing = f"pause seen after {(seen - paused_at) * 1000:.1f} ms, {timing}"
        self._phase(f"final SC ({self.sc.stats.final_delta} records) applied in "
                    f"{self.sc.stats.stop_window_ms:.1f} ms ({timing}); QEMU switches over")

    async def _commit(self) -> None:
        self._phase(f"waiting for {self.vm.name} to run on {self.run_state.destination}")
        reply = await self.destination_agent.call(
            "migration.commit", {"name": self.vm.name, "source": self.run_state.source},
            timeout=COMMIT_CALL_TIMEOUT)
        self.destination_sc_entries = reply.get("sc_entries")
        if self.sc is not None:
            with contextlib.suppress(sc_channel.ChannelError):
                await self.sc.commit()

    async def _handed_over(self) -> bool:
        with contextlib.suppress(VMError, TimeoutError):
            info = await asyncio.wait_for(self.vm.execute("query-migrate"), QMP_TIMEOUT)
            return bool(info.get("status") == "completed")
        return False

    async def _settle(self) -> None:
        """COMMIT failed after QEMU handed the VM over: ask the destination once more."""
        self._phase(f"commit failed ({self.run_state.failure}); asking "
                    f"{self.run_state.destination} whether it runs {self.vm.name}")
        outcome = await settle_handover(self.vm.name, self.run_state.source,
                                        self.destination_agent)
        self.run_state.settle(outcome)
        if outcome == Handover.STAYED:
            if self.sc is not None:
                await self.sc.abort(self.run_state.failure or "commit failed")
            await self.vm.resume()
            self.run_state.advance()
        elif outcome == Handover.UNKNOWN:
            self._phase(f"{self.vm.name} stays paused here until "
                        f"{self.run_state.destination} answers")

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
        await self.vm.resume()


async def settle_handover(vm_name: str, source: str, destination_agent: AgentClient
                          ) -> Handover:
    """Whether the destination runs `vm_name` after QEMU handed it over from `source`: a
    COMMIT that it accepts (it is idempotent) says moved; its refusal may say stayed."""
    try:
        await destination_agent.call("migration.commit", {"name": vm_name, "source": source},
                                     timeout=COMMIT_CALL_TIMEOUT)
    except AgentError as exc:
        outcome = handover_from_commit_error(exc.code)
        log.warning("settling the handover of %s: %s -> %s", vm_name, exc, outcome)
        return outcome
    return Handover.MOVED
