"""Waiting for a VM to run, against a real QEMU (no guest: `-machine none`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from nseh.agent.vms import VM, VMState
from nseh.definition import VMDefinition

DEFINITION = VMDefinition.from_json({"name": "qtest", "network": {"ipv4": "10.9.0.2/24"}})


def start_qemu(vm: VM, *extra: str) -> int:
    files = vm.files
    files.run_dir.mkdir(parents=True)
    subprocess.run(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                    "-daemonize", "-pidfile", str(files.pidfile), "-D", str(files.log),
                    "-chardev", f"socket,id=qmp,path={files.qmp},server=on,wait=off",
                    "-mon", "chardev=qmp,mode=control", *extra], check=True)
    return int(files.pidfile.read_text())


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VM]:
    record = VM(definition=DEFINITION, mark=1, state=VMState.INCOMING, record_dir=tmp_path,
                accel="tcg")
    yield record
    if (pid := record.pid()) is not None:
        os.kill(pid, signal.SIGKILL)


def test_a_running_qemu_is_running(vm: VM) -> None:
    start_qemu(vm)
    assert asyncio.run(vm.wait_running(10)) is None


def test_a_busy_monitor_is_waited_for_not_taken_for_a_dead_vm(vm: VM) -> None:
    start_qemu(vm)

    async def scenario() -> str | None:
        holder = QMPClient("holder")
        await holder.connect(str(vm.files.qmp))  # QEMU's one QMP client for now
        waiting = asyncio.create_task(vm.wait_running(20))
        await asyncio.sleep(1.5)
        assert not waiting.done()
        await holder.disconnect()
        return await waiting

    assert asyncio.run(scenario()) is None


def test_a_paused_vm_is_reported_with_its_state_after_the_timeout(vm: VM) -> None:
    start_qemu(vm, "-S")
    assert asyncio.run(vm.wait_running(1)) == "QEMU's run state is prelaunch, after 1 s"


def test_an_exited_qemu_is_reported_at_once(vm: VM) -> None:
    pid = start_qemu(vm)
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.01)
    started = time.monotonic()
    problem = asyncio.run(vm.wait_running(30))
    assert problem is not None and problem.startswith("QEMU exited (")
    assert time.monotonic() - started < 5
