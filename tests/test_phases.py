"""The migration protocol's state machine, without I/O."""

import pytest

from nseh.migration.phases import (
    Handover,
    MigrationRun,
    Phase,
    ProtocolViolation,
    QemuOutcome,
    handover_from_commit_error,
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


def test_pre_switchover_seen_by_event_and_by_poll_switches_over_once():
    run = new_run()
    run.advance()  # TRANSFER
    assert not run.switchover_due(QemuOutcome.IN_PROGRESS)
    assert run.switchover_due(QemuOutcome.PRE_SWITCHOVER)  # the poll saw it first
    run.advance()  # SWITCHOVER: the final SC moved, migrate-continue sent
    assert not run.switchover_due(QemuOutcome.PRE_SWITCHOVER)  # the queued event, later


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_failure_before_the_handover_rolls_back(steps):
    run = new_run()
    for _ in range(steps):
        run.advance()
    failed_in = run.phase
    assert run.fail("boom") is True
    assert run.phase == Phase.ROLLBACK
    assert run.failure == f"{failed_in}: boom"
    run.advance()
    assert run.phase == Phase.FAILED and run.finished


def at_commit() -> MigrationRun:
    run = new_run()
    for _ in range(3):
        run.advance()
    assert run.phase == Phase.COMMIT
    return run


def test_a_failed_commit_is_unsettled_until_the_destination_answers():
    run = at_commit()
    assert run.fail("destination agent unreachable") is False
    assert run.unsettled and run.phase == Phase.COMMIT
    run.settle(Handover.UNKNOWN)
    assert run.unsettled
    assert migration_report(run, {})["result"] == "unsettled"


def test_a_commit_settled_as_moved_finishes_the_migration():
    run = at_commit()
    run.fail("timeout")
    run.settle(Handover.MOVED)
    assert not run.unsettled and run.failure is None and run.phase == Phase.CLEANUP
    run.advance()
    assert migration_report(run, {})["result"] == "migrated"


def test_a_commit_settled_as_stayed_rolls_back_without_purging():
    run = at_commit()
    run.fail("destination QEMU is not running")
    run.settle(Handover.STAYED)
    assert run.phase == Phase.ROLLBACK and not run.unsettled
    run.advance()
    assert migration_report(run, {})["result"] == "failed"


def test_only_a_failed_commit_can_be_settled():
    run = at_commit()
    with pytest.raises(ProtocolViolation):
        run.settle(Handover.MOVED)
    run.advance()
    run.fail("cleanup failed")
    with pytest.raises(ProtocolViolation):
        run.settle(Handover.STAYED)


@pytest.mark.parametrize(("code", "outcome"), [
    ("not-found", Handover.STAYED), ("commit-failed", Handover.STAYED),
    ("unreachable", Handover.UNKNOWN), ("busy", Handover.UNKNOWN),
])
def test_what_a_refused_commit_says_about_the_handover(code, outcome):
    assert handover_from_commit_error(code) == outcome


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
