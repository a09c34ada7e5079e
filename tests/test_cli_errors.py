"""Every command's error paths, through the real `nseh` command line: one line on stderr
(`nseh: error: ...`, never a traceback), exit status 1, and nothing left behind.

"Nothing left behind" compares the machine before and after: nseh-* namespaces, QEMU
processes, lab agents, the lab's state file, the root namespace's nftables tables. Like every
test that looks at the lab, it assumes no other lab command runs meanwhile (the shared lock).
Errors on a running lab that test_vms_e2e.py already checks (unknown VM for vm stop and
migrate, a VM name or address in use, a missing definition) are not repeated here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from labtools import EXAMPLE_VM, NSEH, nseh, nseh_json

from nseh import lab
from nseh.api.protocol import Result, decode, encode
from nseh.inventory import LAB_INVENTORY, SYSTEM_INVENTORY
from nseh.lab import processes, topology
from nseh.prerequisites import BENCH_PROGRAMS

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs commands as root or nobody")
# Found before a test narrows PATH (it finds programs on the narrowed one).
UNSHARE = shutil.which("unshare") or "unshare"
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def run(*argv: str, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The real `nseh` (after `prefix`, e.g. to run it as another user), environment added."""
    return subprocess.run([*prefix, NSEH, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str,
                          after_progress: bool = False) -> str:
    """The command failed with exit status 1 and one error line, the last on stderr; with
    `after_progress`, other lines before it (progress of a long operation) are fine."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert lines and (after_progress or len(lines) == 1), result.stderr
    assert [line for line in lines if "error:" in line] == lines[-1:], result.stderr
    assert lines[-1].startswith("nseh: error: ") and expected in lines[-1], lines[-1]
    return lines[-1]


def machine_state() -> dict[str, Any]:
    qemus = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True)
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True)
    return {"namespaces": topology.lab_namespaces(),
            "qemu": sorted(qemus.stdout.split()),
            "agents": sorted(processes.lab_agent_pids()),
            "lab": lab.LAB_STATE_FILE.read_text() if lab.LAB_STATE_FILE.exists() else None,
            "nft tables": tables.stdout}


@contextlib.contextmanager
def leaves_nothing_behind() -> Iterator[None]:
    before = machine_state()
    yield
    assert machine_state() == before


# -- without a lab: files, options, inventories -----------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "bad.toml").write_text("garbage [\n")
    (tmp_path / "unreachable.toml").write_text(
        f'[hosts.h1]\nagent = "unix://{tmp_path}/nothing.sock"\n')
    # Valid but for api_port, which needs TLS credentials.
    (tmp_path / "agent-api-port.toml").write_text(
        f'host = "h1"\nstate_dir = "{tmp_path}/state"\napi_socket = "{tmp_path}/a.sock"\n'
        'management_address = "10.99.0.1"\napi_port = 7471\n')
    (tmp_path / "agent.toml").write_text(
        f'host = "h1"\nstate_dir = "{tmp_path}/state"\napi_socket = "{tmp_path}/a.sock"\n'
        'management_address = "10.99.0.1"\n')
    nseh("pki", "init", str(tmp_path / "ca"))
    return tmp_path


@pytest.mark.parametrize(("argv", "expected"), [
    (["vm", "list", "--inventory", "{d}/missing.toml"], "missing.toml: cannot read"),
    (["vm", "list", "--inventory", "{d}/bad.toml"], "not a valid inventory"),
    (["vm", "list", "--inventory", "{d}/unreachable.toml"],
     "no host's agent answered: h1: agent at unix://"),
    (["host", "info", "h9", "--inventory", "{d}/unreachable.toml"], "unknown host 'h9'"),
    (["host", "counters", "h1", "--inventory", "{d}/unreachable.toml"], "unreachable"),
    (["ips", "list", "web1", "--inventory", "{d}/unreachable.toml"],
     "no VM named 'web1' on any host (unreachable hosts: h1)"),
    (["migrate", "web1", "--to", "h1", "--inventory", "{d}/unreachable.toml"],
     "no VM named 'web1'"),
    (["vm", "start", "x", "--host", "h1", "--definition", "{d}/bad.toml",
      "--inventory", "{d}/unreachable.toml"], "bad.toml: not valid TOML"),
    (["pki", "init", "{d}/ca"], "already holds a CA"),
    (["pki", "init", "/proc/nseh-ca"], "/proc/nseh-ca: No such file or directory"),
    (["pki", "issue", "h1", "--ca", "{d}/missing", "--out", "{d}/h1"], "cannot read the CA"),
    (["pki", "issue", "h1", "--ca", "{d}/ca", "--out", "/proc/nseh-h1"],
     "/proc/nseh-h1: No such file or directory"),
    (["pki", "issue", "h1", "--ca", "{d}/ca", "--out", "{d}/h1", "--address", "10.0.0.300"],
     "10.0.0.300"),
    (["pki", "revoke", "{d}/missing.pem", "--ca", "{d}/ca"], "cannot read certificate"),
    (["agent", "--config", "{d}/missing.toml"], "missing.toml: cannot read"),
    (["agent", "--config", "{d}/bad.toml"], "bad.toml: not valid TOML"),
    (["agent", "--config", "{d}/agent-api-port.toml"], "api_port needs tls_cert"),
    (["agent", "--config", "{d}/agent.toml", "--log-level", "chatty"], "unknown log level"),
    (["bench", "--sizes", "many"], "--sizes: 'many' is not a number of entries"),
    (["soak", "--migrations", "3"], "--migrations must be an even number"),
])
def test_bad_input_without_a_lab_is_one_line(files: Path, argv: list[str], expected: str):
    result = run(*(arg.format(d=files) for arg in argv))
    assert_one_line_error(result, expected)


@pytest.mark.parametrize("argv", [["vm", "list"], ["vm", "stop", "web1"],
                                  ["host", "info", "h1"], ["migrate", "web1", "--to", "h2"],
                                  ["ips", "list", "web1"]])
def test_without_a_lab_or_an_inventory_the_commands_say_how_to_get_one(argv: list[str]):
    if LAB_INVENTORY.exists() or SYSTEM_INVENTORY.exists():
        pytest.skip("there is an inventory (a lab is up, or this machine has one)")
    environment = {k: v for k, v in os.environ.items() if k != "NSEH_INVENTORY"}
    result = subprocess.run([NSEH, *argv], capture_output=True, text=True, timeout=60,
                            env=environment)
    assert_one_line_error(result, "no inventory: start the lab (`nseh lab up`)")


class FakeAgent(socketserver.ThreadingUnixStreamServer):
    """Speaks the agent API on a unix socket, answering each request with `answer`."""

    daemon_threads = True

    def __init__(self, path: Path, answer: Callable[[socket.socket, int], None]) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = decode(self.rfile.readline())
                outer.requests.append(request.method)
                answer(self.connection, request.id)

        super().__init__(str(path), Handler)


@contextlib.contextmanager
def fake_agent(tmp_path: Path, answer: Callable[[socket.socket, int], None]
               ) -> Iterator[tuple[Path, FakeAgent]]:
    """An inventory of one host whose 'agent' is a FakeAgent."""
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(f'[hosts.h1]\nagent = "unix://{tmp_path}/agent.sock"\n')
    with FakeAgent(tmp_path / "agent.sock", answer) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield inventory, server
        finally:
            server.shutdown()


def test_an_unexpected_failure_is_one_line_with_the_traceback_in_the_log(tmp_path: Path):
    # A reply the CLI cannot read (VMs without names): a bug somewhere, not the user's error.
    def odd_vm_list(connection: socket.socket, request_id: int) -> None:
        connection.sendall(encode(Result(request_id, [{"nameless": True}])))

    with fake_agent(tmp_path, odd_vm_list) as (inventory, _):
        result = run("vm", "list", "--inventory", str(inventory),
                     env={"XDG_STATE_HOME": str(tmp_path / "state")})
    log = tmp_path / "state" / "nseh" / "errors.log"
    line = assert_one_line_error(result, "internal error: KeyError: 'name'")
    assert line.endswith(f"(traceback in {log})")
    saved = log.read_text()
    assert "vm list --inventory" in saved.splitlines()[0]
    assert "Traceback (most recent call last)" in saved and "KeyError: 'name'" in saved


def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path: Path):
    answered = threading.Event()

    def never_answer(connection: socket.socket, request_id: int) -> None:
        answered.set()
        connection.recv(1)  # until the CLI goes away

    with fake_agent(tmp_path, never_answer) as (inventory, _):
        cli = subprocess.Popen([NSEH, "host", "info", "h1", "--inventory", str(inventory)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert answered.wait(30), "the CLI never called the agent"
        cli.send_signal(signal.SIGINT)
        _, stderr = cli.communicate(timeout=30)
    assert cli.returncode == 130, stderr
    assert stderr.splitlines() == ["nseh: error: interrupted"]


# A process forked from the CLI, as pyroute2 forks one to open a socket in a namespace and
# stops it with SIGTERM: it must exit at once, not unwind into the CLI's clean-up (which tore
# down the lab its parent was building: "No such file or directory: /var/run/netns/nseh-h1").
FORKED_CHILD = """
import os, signal, sys, time
from nseh.cli import interrupt_on_signals
interrupt_on_signals()
read, write = os.pipe()
child = os.fork()
if child == 0:
    try:
        os.write(write, b"ready")
        time.sleep(30)
    finally:
        print("the child ran the parent's clean-up", flush=True)
os.read(read, 5)
os.kill(child, signal.SIGTERM)
print("child exit status", os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
except KeyboardInterrupt:
    print("parent interrupted", flush=True)
"""


def test_a_forked_child_exits_on_sigterm_while_the_cli_is_interrupted():
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.splitlines() == [f"child exit status {128 + signal.SIGTERM}",
                                          "parent interrupted"], result


# -- without a lab, as root: what is checked before anything starts ---------------------


@needs_root
@pytest.mark.parametrize("argv", [["lab", "up"], ["lab", "down"], ["demo"], ["soak"],
                                  ["bench", "--quick"]])
def test_lab_commands_refuse_non_root_before_doing_anything(argv: list[str]):
    with leaves_nothing_behind():
        result = run(*argv, prefix=AS_NOBODY)
    assert_one_line_error(result, f"nseh {' '.join(argv[:2] if argv[0] == 'lab' else argv[:1])}"
                                  " needs root")


@needs_root
def test_the_agent_refuses_non_root(files: Path):
    readable = Path(tempfile.mkdtemp(prefix="nseh-test-"))  # pytest's tmp_path is root's only
    try:
        readable.chmod(0o755)
        config = readable / "agent.toml"
        shutil.copy(files / "agent.toml", config)
        config.chmod(0o644)
        result = run("agent", "--config", str(config), prefix=AS_NOBODY)
    finally:
        shutil.rmtree(readable)
    assert_one_line_error(result, "the agent needs root")


@pytest.fixture
def path_without_qemu(tmp_path: Path) -> str:
    """A PATH with every program nseh needs but QEMU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in BENCH_PROGRAMS.keys() - {"qemu-system-x86_64"}:
        found = shutil.which(program)
        assert found, f"{program} is not installed here"
        (bin_dir / program).symlink_to(found)
    return str(bin_dir)


@needs_root
@pytest.mark.parametrize("argv", [["lab", "up"], ["demo"], ["soak"], ["bench", "--quick"]])
def test_a_missing_program_is_named_with_its_package_before_anything_starts(
        path_without_qemu: str, argv: list[str]):
    with leaves_nothing_behind():
        result = run(*argv, env={"PATH": path_without_qemu})
    assert_one_line_error(result, "not found: qemu-system-x86_64; install with "
                                  "`apt-get install qemu-system-x86`")


@needs_root
def test_the_agent_names_a_missing_program_before_it_starts(files: Path,
                                                            path_without_qemu: str):
    # In a network namespace of its own: an agent that did start would touch nothing here.
    with leaves_nothing_behind():
        result = run("agent", "--config", str(files / "agent.toml"),
                     env={"PATH": path_without_qemu}, prefix=(UNSHARE, "--net"))
    assert_one_line_error(result, "not found: qemu-system-x86_64")


# -- on a running lab --------------------------------------------------------------------


def second_vm(directory: Path, memory_mib: int = 128) -> Path:
    """The example VM with other addresses (it may run beside web1), as a definition file."""
    definition = directory / "web2.toml"
    definition.write_text(EXAMPLE_VM.read_text()
                          .replace("memory_mib = 128", f"memory_mib = {memory_mib}")
                          .replace("10.0.0.10/", "10.0.0.30/").replace("fd00::10/", "fd00::30/")
                          .replace("203.0.113.10", "203.0.113.30"))
    return definition


@contextlib.contextmanager
def lab_unchanged() -> Iterator[None]:
    """Nothing left behind on the lab either: the same VMs on the same hosts."""
    vms = nseh_json("vm", "list")
    with leaves_nothing_behind():
        yield
    assert nseh_json("vm", "list") == vms


@pytest.mark.lab
@pytest.mark.parametrize(("argv", "expected"), [
    (["lab", "up"], "a lab is already up or left over"),
    (["vm", "exec", "nosuch", "--", "true"], "no VM named 'nosuch' on any host"),
    (["ips", "list", "nosuch"], "no VM named 'nosuch' on any host"),
    (["ips", "block", "nosuch", "10.0.0.202"], "no VM named 'nosuch' on any host"),
    (["host", "info", "h9"], "unknown host 'h9' (known hosts: h1, h2)"),
    (["vm", "start", "web2", "--host", "h9", "--definition", "{d}/web2.toml"],
     "unknown host 'h9'"),
    (["migrate", "web1", "--to", "h1"], "web1 already runs on h1"),
])
def test_bad_requests_on_a_running_lab_are_one_line_and_change_nothing(
        web1: str, tmp_path: Path, argv: list[str], expected: str):
    second_vm(tmp_path)
    with lab_unchanged():
        result = run(*(arg.format(d=tmp_path) for arg in argv))
    assert_one_line_error(result, expected)


@pytest.mark.lab
def test_a_vm_qemu_cannot_start_is_one_line_and_leaves_nothing(web1: str, tmp_path: Path):
    # More guest RAM than this machine has: QEMU itself refuses (heuristic overcommit).
    memory_mib = 65536
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    if available >= memory_mib // 2 or Path("/proc/sys/vm/overcommit_memory").read_text() != "0\n":
        pytest.skip("this machine would let QEMU have the memory")
    definition = second_vm(tmp_path, memory_mib)
    with lab_unchanged():
        result = run("vm", "start", "huge", "--host", "h2", "--definition", str(definition))
    assert_one_line_error(result, "QEMU for huge failed to start: qemu-system-x86_64: cannot "
                                  "set up guest memory", after_progress=True)
    assert not any("huge" in counter for counter in nseh_json("host", "counters", "h2"))


@pytest.mark.lab
def test_qemu_that_does_not_answer_qmp_fails_a_migration_in_one_line(web1: str):
    pid = next(vm["pid"] for vm in nseh_json("vm", "list")["vms"] if vm["name"] == web1)
    with lab_unchanged():
        os.kill(pid, signal.SIGSTOP)  # QEMU stops answering QMP; the VM itself is kept
        try:
            result = run("migrate", web1, "--to", "h2")
        finally:
            os.kill(pid, signal.SIGCONT)
    line = assert_one_line_error(result, f"migration of {web1} failed: ", after_progress=True)
    assert "cannot reach QEMU of web1 over QMP: no answer" in line
    assert line.endswith("it still runs on h1")
