"""Processes of the lab: host agents, QEMU, anything left inside lab namespaces."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import netns

from nseh.agent.config import AgentConfig
from nseh.lab import layout
from nseh.lab.state import LabError, load_state, save_state

AGENT_MODULE = "nseh.agent"
AGENT_START_TIMEOUT = 30.0
# How long a process gets between SIGTERM and SIGKILL.
TERM_GRACE = 3.0
KILL_GRACE = 2.0
_POLL = 0.05


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie does not count; ours are reaped here)."""
    try:
        # Reap it if it is our child (e.g. an agent started by this process that died).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may itself contain ") ".
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _references_lab(argv: list[str]) -> bool:
    return any(str(layout.LAB_DIR) in arg for arg in argv)


def lab_agent_pids() -> list[int]:
    """Agent processes of the lab, found by their command line (pidfiles may be gone)."""
    return [pid for pid in _all_pids()
            if AGENT_MODULE in (argv := _cmdline(pid)) and _references_lab(argv)]


def recorded_agent_pids() -> list[int]:
    """Agents named by the hosts' pidfiles (checked: a stale pid may be someone else's)."""
    pids = []
    for pidfile in layout.LAB_DIR.glob(f"*/{layout.AGENT_PID_FILE}"):
        host = pidfile.parent.name
        pid = read_pidfile(pidfile)
        if pid is not None and is_agent_of(pid, host):
            pids.append(pid)
    return pids


def lab_qemu_pids() -> list[int]:
    """QEMU processes of the lab: their run directories live under the lab's directory."""
    return [pid for pid in _all_pids()
            if (argv := _cmdline(pid)) and os.path.basename(argv[0]).startswith("qemu-system")
            and _references_lab(argv)]


def namespace_pids(namespaces: Iterable[str]) -> list[int]:
    """Processes whose network namespace is one of `namespaces`."""
    by_namespace = netns.ns_pids()
    return [pid for name in namespaces for pid in by_namespace.get(name, [])]


def lab_referencing_pids() -> list[int]:
    """Any process whose command line mentions the lab's directory."""
    return [pid for pid in _all_pids() if _references_lab(_cmdline(pid))]


def terminate(pids: Iterable[int]) -> None:
    """SIGTERM, then SIGKILL what is left after TERM_GRACE; returns when all are gone."""
    targets = {pid for pid in pids if pid != os.getpid()}
    for sig, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, KILL_GRACE)):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while (targets := {pid for pid in targets if pid_alive(pid)}) and (
                time.monotonic() < deadline):
            time.sleep(_POLL)
        if not targets:
            return
    raise LabError(f"processes {sorted(targets)} survived SIGKILL")


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _record_agent_pid(host: str, pid: int | None) -> None:
    pidfile = layout.agent_pid_path(host)
    if pid is None:
        pidfile.unlink(missing_ok=True)
    else:
        pidfile.write_text(f"{pid}\n")
    if layout.LAB_STATE_FILE.exists():
        state = load_state()
        for entry in state.hosts:
            if entry.name == host:
                entry.agent_pid = pid
        save_state(state)


def is_agent_of(pid: int, host: str) -> bool:
    """True if `pid` is an agent of lab host `host` (checked by its command line)."""
    return str(layout.agent_config_path(host)) in _cmdline(pid)


def _accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _last_line(path: Path, limit: int = 200) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "(empty log)")
    return last if len(last) <= limit else last[:limit] + "..."


def start_agent(host: str, timeout: float = AGENT_START_TIMEOUT,
                python: str = sys.executable) -> int:
    """Start `host`'s agent inside its namespace, detached; return its pid once it serves.

    `python` is the interpreter that runs `-m nseh.agent` (one with nseh installed).
    """
    config_path = layout.agent_config_path(host)
    if not config_path.exists():
        raise LabError(f"no lab host {host} ({config_path} missing); is the lab up?")
    config = AgentConfig.load(config_path)
    running = read_pidfile(layout.agent_pid_path(host))
    if running is not None and is_agent_of(running, host) and pid_alive(running):
        raise LabError(f"the agent of {host} already runs (pid {running})")
    # A stale socket would make the readiness check succeed before the agent listens.
    config.api_socket.unlink(missing_ok=True)
    log_path = layout.agent_log_path(host)
    argv = layout.netns_exec_argv(
        layout.namespace_of(host),
        [python, "-m", AGENT_MODULE, "--config", str(config_path)])
    with log_path.open("ab") as log:
        # New session: the agent outlives the lab command and its terminal.
        # `ip netns exec` execs the command, so this pid is the agent's.
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
    _record_agent_pid(host, process.pid)
    deadline = time.monotonic() + timeout
    while not _accepts_connections(config.api_socket):
        if process.poll() is not None:
            _record_agent_pid(host, None)
            raise LabError(f"the agent of {host} exited with status {process.returncode} "
                           f"while starting: {_last_line(log_path)} (see {log_path})")
        if time.monotonic() > deadline:
            stop_agent(host)
            raise LabError(f"the agent of {host} did not accept connections on "
                           f"{config.api_socket} within {timeout:g} s; see {log_path}")
        time.sleep(_POLL)
    return process.pid


def stop_agent(host: str) -> None:
    """Stop `host`'s agent (SIGTERM, then SIGKILL); fine if it does not run."""
    pids = {pid for pid in lab_agent_pids() if is_agent_of(pid, host)}
    recorded = read_pidfile(layout.agent_pid_path(host))
    # Checked against the command line: a stale pidfile's pid may now be someone else's.
    if recorded is not None and is_agent_of(recorded, host):
        pids.add(recorded)
    terminate(pids)
    if layout.host_dir(host).exists():
        _record_agent_pid(host, None)
