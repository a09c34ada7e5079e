"""The migration protocol's state machine, without I/O."""

import pytest

from nseh.migration.phases import (
    MigrationRun,
    Phase,
    ProtocolViolation,
    QemuOutcome,
    migration_report,
    qemu_outcome,
)


def new_run() -> MigrationRun:
    return MigrationRun(vm="web1", source="h1", destination="h2", sc_mode="none")


def test_a_successful_run_passes_every_phase_in_order():
    run = new_run()
    while not run.finished:
        run.advance()
    assert run.history == [Phase.PREPARE, Phase.TRANSFER, Phase.SWITCHOVER, Phase.COMMIT,
                           Phase.CLEANUP, Phase.DONE]
    with pytest.raises(ProtocolViolation):
        run.advance()


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_failure_before_commit_rolls_back(steps):
    run = new_run()
    for _ in range(steps):
        run.advance()
    failed_in = run.phase
    assert run.fail("boom") is True
    assert run.phase == Phase.ROLLBACK
    assert run.failure == f"{failed_in}: boom"
    run.advance()
    assert run.phase == Phase.FAILED and run.finished


def test_failure_after_commit_keeps_the_move():
    run = new_run()
    for _ in range(4):
        run.advance()
    assert run.phase == Phase.CLEANUP
    assert run.fail("source cleanup failed") is False
    assert run.phase == Phase.CLEANUP


def test_a_finished_run_cannot_fail():
    run = new_run()
    run.fail("x")
    with pytest.raises(ProtocolViolation):
        run.fail("again")


@pytest.mark.parametrize(("status", "outcome"), [
    ("setup", QemuOutcome.IN_PROGRESS), ("active", QemuOutcome.IN_PROGRESS),
    ("device", QemuOutcome.IN_PROGRESS), ("pre-switchover", QemuOutcome.PRE_SWITCHOVER),
    ("completed", QemuOutcome.COMPLETED), ("failed", QemuOutcome.FAILED),
    ("cancelled", QemuOutcome.FAILED), (None, QemuOutcome.FAILED),
])
def test_qemu_status_classification(status, outcome):
    assert qemu_outcome({"status": status} if status else {}) == outcome


def test_report_carries_qemu_figures():
    run = new_run()
    while not run.finished:
        run.advance()
    report = migration_report(run, {"status": "completed", "total-time": 900, "downtime": 4,
                                    "setup-time": 2, "ram": {"transferred": 10,
                                                             "total": 20,
                                                             "dirty-sync-count": 3}})
    assert report["result"] == "migrated"
    assert report["qemu"] == {"status": "completed", "total_time_ms": 900, "downtime_ms": 4,
                              "setup_time_ms": 2, "ram_transferred_bytes": 10,
                              "ram_total_bytes": 20, "dirty_sync_count": 3}
