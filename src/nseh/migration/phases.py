"""The migration protocol as a plain state machine (no I/O).

The orchestrator (`nseh.migration.orchestrator`) performs the I/O of each phase and tells
this machine what happened; the machine says what is allowed next and, after a failure,
whether the destination must be purged and the source resumed (rollback) or the move is
already final.

    PREPARE -> TRANSFER -> SWITCHOVER -> COMMIT -> CLEANUP -> DONE
        \\__________\\____________\\__________\\-> ROLLBACK -> FAILED

Until QEMU has handed the VM over (its migration `completed`, which is when COMMIT starts)
the source is authoritative: any failure rolls back. From then on the destination may run
the VM, so the source must never resume it on its own: a failed COMMIT is *settled* by
asking the destination — it runs the VM (the move stands) or it has purged it (the source
resumes) — and stays unsettled, with the source's copy paused, until one of the two is
known. Failures of CLEANUP are reported but never roll back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    PREPARE = "prepare"  # destination installs the VM's policy, starts QEMU -incoming
    TRANSFER = "transfer"  # QEMU RAM pre-copy (and, later, SC pre-copy)
    SWITCHOVER = "switchover"  # VM stopped; final state moved; destination resumes
    COMMIT = "commit"  # destination confirms the VM runs there
    CLEANUP = "cleanup"  # source forgets the VM
    DONE = "done"
    ROLLBACK = "rollback"  # destination purged, source resumed
    FAILED = "failed"


_NEXT: dict[Phase, Phase] = {
    Phase.PREPARE: Phase.TRANSFER,
    Phase.TRANSFER: Phase.SWITCHOVER,
    Phase.SWITCHOVER: Phase.COMMIT,
    Phase.COMMIT: Phase.CLEANUP,
    Phase.CLEANUP: Phase.DONE,
    Phase.ROLLBACK: Phase.FAILED,
}

_BEFORE_HANDOVER = {Phase.PREPARE, Phase.TRANSFER, Phase.SWITCHOVER}


class ProtocolViolation(RuntimeError):
    """The orchestrator asked for a transition the protocol does not allow."""


@dataclass
class MigrationRun:
    vm: str
    source: str
    destination: str
    sc_mode: str
    phase: Phase = Phase.PREPARE
    failure: str | None = None
    history: list[Phase] = field(default_factory=lambda: [Phase.PREPARE])

    def advance(self) -> Phase:
        """The current phase succeeded; move to the next one."""
        try:
            self.phase = _NEXT[self.phase]
        except KeyError:
            raise ProtocolViolation(f"no phase follows {self.phase}") from None
        self.history.append(self.phase)
        return self.phase

    def fail(self, reason: str) -> bool:
        """The current phase failed. Returns True if the caller must roll back."""
        if self.phase in (Phase.DONE, Phase.FAILED, Phase.ROLLBACK):
            raise ProtocolViolation(f"cannot fail in phase {self.phase}")
        self.failure = f"{self.phase}: {reason}"
        if self.phase in _BEFORE_HANDOVER:
            self.phase = Phase.ROLLBACK
            self.history.append(self.phase)
            return True
        # COMMIT: the handover must be settled (`settle`); CLEANUP: the move stands.
        return False

    def settle(self, outcome: Handover) -> None:
        """The destination answered whether it runs the VM after a failed COMMIT."""
        if self.phase != Phase.COMMIT or self.failure is None:
            raise ProtocolViolation(f"nothing to settle in phase {self.phase}")
        if outcome == Handover.MOVED:
            self.failure = None
            self.advance()
        elif outcome == Handover.STAYED:
            self.phase = Phase.ROLLBACK  # nothing to purge: the destination has no VM
            self.history.append(self.phase)

    def switchover_due(self, outcome: QemuOutcome) -> bool:
        """QEMU waits in pre-switchover and the final SC has not been moved yet. QEMU's
        state is seen twice, by its event and by a poll, in either order: switch over once
        (a second `migrate-continue` would be refused)."""
        return outcome == QemuOutcome.PRE_SWITCHOVER and self.phase == Phase.TRANSFER

    @property
    def unsettled(self) -> bool:
        """A failed COMMIT not settled yet: the source must keep its copy paused."""
        return self.phase == Phase.COMMIT and self.failure is not None

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.FAILED)


class Handover(StrEnum):
    """Where a VM is after QEMU handed it over but COMMIT failed, as the destination says."""

    MOVED = "moved"  # it runs the VM: the source cleans up
    STAYED = "stayed"  # it has no VM (never ran it, or purged it): the source resumes
    UNKNOWN = "unknown"  # no answer yet: the source keeps its copy paused and asks again


def handover_from_commit_error(code: str) -> Handover:
    """What a COMMIT refused with `code` says about the handover. `not-found`: the
    destination has no such VM; `commit-failed`: its QEMU does not run the VM, and it has
    purged it (see the agent); anything else (unreachable, busy) settles nothing."""
    if code in ("not-found", "commit-failed"):
        return Handover.STAYED
    return Handover.UNKNOWN


class QemuOutcome(StrEnum):
    IN_PROGRESS = "in-progress"
    PRE_SWITCHOVER = "pre-switchover"
    COMPLETED = "completed"
    FAILED = "failed"


def qemu_outcome(info: dict[str, Any]) -> QemuOutcome:
    """Classify QEMU's `query-migrate` answer on the source."""
    status = info.get("status")
    if status == "completed":
        return QemuOutcome.COMPLETED
    if status == "pre-switchover":
        return QemuOutcome.PRE_SWITCHOVER
    if status in ("failed", "cancelled", "cancelling", None):
        return QemuOutcome.FAILED
    return QemuOutcome.IN_PROGRESS


def qemu_progress(info: dict[str, Any]) -> dict[str, Any]:
    """The figures of an in-progress `query-migrate` answer worth showing."""
    ram = info.get("ram", {})
    return {
        "status": info.get("status"),
        "ram_transferred": ram.get("transferred", 0),
        "ram_remaining": ram.get("remaining", 0),
        "ram_total": ram.get("total", 0),
        "dirty_sync_count": ram.get("dirty-sync-count", 0),
    }


def migration_report(run: MigrationRun, info: dict[str, Any]) -> dict[str, Any]:
    """The report of a finished migration, from QEMU's final `query-migrate` answer."""
    ram = info.get("ram", {})
    return {
        "vm": run.vm,
        "source": run.source,
        "destination": run.destination,
        "sc_mode": run.sc_mode,
        "result": "migrated" if run.phase == Phase.DONE
        else "unsettled" if run.unsettled else "failed",
        "failure": run.failure,
        "qemu": {
            "status": info.get("status"),
            "total_time_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_time_ms": info.get("setup-time"),
            "ram_transferred_bytes": ram.get("transferred"),
            "ram_total_bytes": ram.get("total"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
        },
    }
