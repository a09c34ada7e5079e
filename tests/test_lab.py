"""The one-machine lab: real namespaces, veths, bridges and packets."""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from nseh import lab
from nseh.inventory import LAB_INVENTORY, Inventory
from nseh.lab import layout, processes, topology

# Stands in for `python -m nseh.agent --config X` (the real agent is tested elsewhere):
# it serves the config's api_socket, like an agent that came up.
SERVING_AGENT = """\
import socket, sys, tomllib
config = tomllib.load(open(sys.argv[sys.argv.index("--config") + 1], "rb"))
server = socket.socket(socket.AF_UNIX)
server.bind(config["api_socket"])
server.listen()
while True:
    server.accept()[0].close()
"""
FAILING_AGENT = "import sys; print('agent: cannot start'); sys.exit(3)\n"
SILENT_AGENT = "import time; time.sleep(600)\n"


def fake_python(tmp_path: Path, name: str, body: str) -> str:
    """An executable that runs `body` with this interpreter, whatever arguments it gets."""
    script = tmp_path / name
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)
    return str(script)


def run_in(namespace: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.netns_exec_argv(namespace, list(argv)), capture_output=True,
                          text=True, timeout=20, check=False)


def pings(namespace: str, address: object, *extra: str) -> bool:
    return run_in(namespace, "ping", "-c", "1", "-W", "2", *extra, str(address)).returncode == 0


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def net_namespace_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def assert_lab_gone() -> None:
    assert topology.lab_namespaces() == []
    assert not layout.LAB_DIR.exists()
    assert processes.lab_referencing_pids() == []


@pytest.fixture
def clean() -> Iterator[None]:
    """No lab before (also after a killed run) and none after, also on failure."""
    lab.down()
    yield
    lab.down()


@pytest.fixture(scope="module")
def lab_2x2() -> Iterator[lab.LabStatus]:
    lab.down()
    try:
        yield lab.up(2, 2, start_agents=False)
    finally:
        lab.down()


def test_netns_exec_argv() -> None:
    assert lab.netns_exec_argv("nseh-c1", ["ping", "x"]) == [
        "ip", "netns", "exec", "nseh-c1", "ping", "x"]


def test_set_up_failures_become_one_lab_error_line(tmp_path: Path) -> None:
    with pytest.raises(lab.LabError) as err, topology.failing_as("create bridge x in ns"):
        raise NetlinkError(17, "File exists")
    assert str(err.value) == "cannot create bridge x in ns: File exists"
    missing = tmp_path / "no-such-namespace"
    with pytest.raises(lab.LabError) as err, topology.failing_as("set up ns"):
        missing.open()
    assert str(err.value) == f"cannot set up ns: [Errno 2] No such file or directory: '{missing}'"
    with pytest.raises(lab.LabError) as err, topology.failing_as("set up ns"):
        raise TimeoutError("no response from the child pid 1\nkilled")
    assert str(err.value) == "cannot set up ns: no response from the child pid 1\\nkilled"


def test_addresses_follow_the_contract() -> None:
    assert str(lab.client_ipv4(1)) == "10.0.0.201"
    assert str(lab.client_ipv6(2)) == "fd00::202"
    assert str(lab.host_mgmt_ipv4(3)) == "10.99.0.3"
    assert str(lab.host_mgmt_ipv6(3)) == "fd99::3"
    assert lab.client_ipv4(9) in lab.VM_SUBNET4
    assert lab.client_ipv6(9) in lab.VM_SUBNET6
    assert lab.host_namespace(2) == "nseh-h2"
    assert lab.client_namespace(1) == "nseh-c1"


@pytest.mark.parametrize(("hosts", "clients"), [(0, 1), (10, 1), (1, -1), (1, 10)])
def test_up_refuses_bad_counts(hosts: int, clients: int) -> None:
    lab_dir_existed = layout.LAB_DIR.exists()
    with pytest.raises(lab.LabError) as err:
        lab.up(hosts, clients, start_agents=False)
    assert "\n" not in str(err.value)
    assert layout.LAB_DIR.exists() == lab_dir_existed


@pytest.mark.lab
class TestRunningLab:
    def test_clients_reach_each_other_and_the_router(self, lab_2x2: lab.LabStatus) -> None:
        for target in (lab.client_ipv4(2), lab.client_ipv6(2), lab.ROUTER4, lab.ROUTER6):
            assert pings("nseh-c1", target), target

    def test_hosts_reach_each_other_on_management(self, lab_2x2: lab.LabStatus) -> None:
        for target in (lab.host_mgmt_ipv4(2), lab.host_mgmt_ipv6(2)):
            assert pings("nseh-h1", target, "-I", lab.HOST_MGMT_LINK), target

    def test_host_sysctls(self, lab_2x2: lab.LabStatus) -> None:
        for namespace in ("nseh-h1", "nseh-h2"):
            assert topology.read_sysctl(namespace, "net.netfilter.nf_conntrack_tcp_loose") == "0"
            assert topology.read_sysctl(namespace, "net.bridge.bridge-nf-call-iptables") == "1"
            assert topology.read_sysctl(namespace, "net.bridge.bridge-nf-call-ip6tables") == "1"
            assert topology.read_sysctl(namespace, "net.ipv6.conf.mgmt0.accept_dad") == "0"

    def test_vm_on_a_host_bridge_reaches_clients(self, lab_2x2: lab.LabStatus) -> None:
        # A veth in h1's br-vm stands in for a VM tap; its other end is a scratch namespace.
        vm_ns = "nseh-vmprobe"
        subprocess.run(["ip", "netns", "add", vm_ns], check=True)
        try:
            for argv in (
                ["ip", "link", "add", "vmprobe", "type", "veth", "peer", "name", "eth0",
                 "netns", vm_ns],
                ["ip", "link", "set", "vmprobe", "master", lab.HOST_VM_BRIDGE, "up"],
            ):
                assert run_in("nseh-h1", *argv).returncode == 0
            for argv in (
                ["sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                 "net.ipv6.conf.eth0.accept_dad=0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "addr", "add", "10.0.0.50/24", "dev", "eth0"],
                ["ip", "addr", "add", "fd00::50/64", "dev", "eth0"],
            ):
                assert run_in(vm_ns, *argv).returncode == 0
            for target in (lab.client_ipv4(1), lab.client_ipv6(1), lab.ROUTER4, lab.ROUTER6):
                assert pings(vm_ns, target), target
        finally:
            topology.remove_namespace(vm_ns)

    def test_status_reports_what_was_made(self, lab_2x2: lab.LabStatus) -> None:
        status = lab.status()
        assert status == lab_2x2
        assert status.state == "up"
        assert status.fabric_namespace == lab.FABRIC_NAMESPACE
        assert [(h.name, h.namespace, str(h.management_ipv4), str(h.management_ipv6))
                for h in status.hosts] == [("h1", "nseh-h1", "10.99.0.1", "fd99::1"),
                                           ("h2", "nseh-h2", "10.99.0.2", "fd99::2")]
        assert [h.agent_endpoint for h in status.hosts] == [
            "unix:///run/nseh/lab/h1/agent.sock", "unix:///run/nseh/lab/h2/agent.sock"]
        assert not any(h.agent_alive for h in status.hosts)
        assert [(c.namespace, str(c.ipv4), str(c.ipv6)) for c in status.clients] == [
            ("nseh-c1", "10.0.0.201", "fd00::201"), ("nseh-c2", "10.0.0.202", "fd00::202")]
        assert status.model_dump(mode="json")["clients"][0]["ipv4"] == "10.0.0.201"
        assert Inventory.load(LAB_INVENTORY).hosts == {
            "h1": "unix:///run/nseh/lab/h1/agent.sock",
            "h2": "unix:///run/nseh/lab/h2/agent.sock"}
        assert set(topology.lab_namespaces()) == {
            "nseh-fabric", "nseh-h1", "nseh-h2", "nseh-c1", "nseh-c2"}

    def test_up_again_is_refused_and_harmless(self, lab_2x2: lab.LabStatus) -> None:
        with pytest.raises(lab.LabError, match="nseh lab down") as err:
            lab.up(1, 1, start_agents=False)
        assert "\n" not in str(err.value)
        assert lab.status() == lab_2x2
        assert pings("nseh-c1", lab.client_ipv4(2))

    def test_agent_start_and_stop(self, lab_2x2: lab.LabStatus, tmp_path: Path) -> None:
        python = fake_python(tmp_path, "serving", SERVING_AGENT)
        pid = lab.start_agent("h1", timeout=20, python=python)
        try:
            assert processes.read_pidfile(layout.agent_pid_path("h1")) == pid
            assert net_namespace_inode(pid) == os.stat("/run/netns/nseh-h1").st_ino
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(layout.agent_socket_path("h1")))
            assert [h.agent_alive for h in lab.status().hosts] == [True, False]
            assert lab.status().hosts[0].agent_pid == pid
            with pytest.raises(lab.LabError, match="already runs"):
                lab.start_agent("h1", python=python)
        finally:
            lab.stop_agent("h1")
        assert not processes.pid_alive(pid)
        assert lab.status().hosts[0].agent_alive is False
        assert not layout.agent_pid_path("h1").exists()

    def test_agent_that_exits_points_at_its_log(
            self, lab_2x2: lab.LabStatus, tmp_path: Path) -> None:
        python = fake_python(tmp_path, "failing", FAILING_AGENT)
        with pytest.raises(lab.LabError, match=r"status 3.*/run/nseh/lab/h2/agent\.log") as err:
            lab.start_agent("h2", timeout=20, python=python)
        assert "\n" not in str(err.value)
        assert "agent: cannot start" in layout.agent_log_path("h2").read_text()

    def test_agent_that_never_serves_times_out(
            self, lab_2x2: lab.LabStatus, tmp_path: Path) -> None:
        python = fake_python(tmp_path, "silent", SILENT_AGENT)
        with pytest.raises(lab.LabError, match=r"within 1 s; see /run/nseh/lab/h2/agent\.log"):
            lab.start_agent("h2", timeout=1, python=python)
        assert processes.lab_agent_pids() == []


@pytest.mark.lab
def test_down_removes_everything_and_kills_what_runs(clean: None, tmp_path: Path) -> None:
    lab.up(1, 1, start_agents=False)
    agent = lab.start_agent("h1", timeout=20, python=fake_python(tmp_path, "a", SERVING_AGENT))
    # Without its pidfile, down() must still find the agent by its command line.
    layout.agent_pid_path("h1").unlink()
    in_client = spawn(lab.netns_exec_argv("nseh-c1", ["sleep", "600"]))
    # A QEMU outside the lab namespaces, found by its run directory under the lab's.
    qemu_pidfile = layout.agent_state_dir("h1") / "probe.pid"
    qemu = spawn(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-nic", "none",
                  "-display", "none", "-S", "-pidfile", str(qemu_pidfile)])
    try:
        wait_for(qemu_pidfile.exists)
        assert processes.lab_qemu_pids() == [qemu.pid]
        assert processes.lab_agent_pids() == [agent]
        assert processes.namespace_pids(["nseh-c1"]) == [in_client.pid]
        lab.down()
        assert_lab_gone()
        assert lab.status().state == "down"
        for pid in (agent, in_client.pid, qemu.pid):
            assert not processes.pid_alive(pid), pid
        lab.down()
        assert_lab_gone()
    finally:
        for process in (in_client, qemu):
            process.kill()
            process.wait()


@pytest.mark.lab
def test_a_killed_soak_removes_its_lab(clean: None) -> None:
    """`kill` (SIGTERM) of a command that builds its own lab leaves nothing behind."""
    nseh = str(Path(sys.executable).parent / "nseh")
    soak = subprocess.Popen([nseh, "soak", "--migrations", "50"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: processes.lab_qemu_pids() != [], timeout=180)  # mid-run
        soak.terminate()
        assert soak.wait(timeout=120) != 0
        assert_lab_gone()
    finally:
        soak.kill()
        soak.wait()


@pytest.mark.lab
def test_down_cleans_a_half_made_lab(clean: None) -> None:
    # As a killed `up` leaves it: some namespaces, a process in one, no lab.json.
    for namespace in ("nseh-fabric", "nseh-h1"):
        subprocess.run(["ip", "netns", "add", namespace], check=True)
    sleeper = spawn(lab.netns_exec_argv("nseh-h1", ["sleep", "600"]))
    try:
        status = lab.status()
        assert status.state == "damaged"
        assert "nseh-h1" in status.problems[0]
        with pytest.raises(lab.LabError, match="nseh lab down"):
            lab.up(1, 0, start_agents=False)
        lab.down()
        assert_lab_gone()
        assert sleeper.wait(timeout=5) is not None
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.lab
def test_a_set_up_failure_midway_is_one_line_and_undone(
        clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Midway (namespaces made, fabric and h1 built), a link takes the name of h2's VM bridge
    # in nseh-h2 just before the lab creates it there: the kernel refuses the bridge.
    build_host = topology.build_host

    def occupied_first(index: int) -> None:
        if index == 2:
            subprocess.run(["ip", "-n", "nseh-h2", "link", "add", lab.HOST_VM_BRIDGE, "type",
                            "bridge"], check=True)
        build_host(index)

    monkeypatch.setattr(topology, "build_host", occupied_first)
    with pytest.raises(lab.LabError) as err:
        lab.up(2, 2)
    assert str(err.value) == (f"cannot create bridge {lab.HOST_VM_BRIDGE} in nseh-h2: File "
                              "exists; the lab was removed")
    assert_lab_gone()


@pytest.mark.lab
def test_up_with_an_agent_that_fails_is_undone_and_keeps_the_log(
        clean: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = fake_python(tmp_path, "failing", FAILING_AGENT)
    monkeypatch.setattr(lab, "start_agent", functools.partial(lab.start_agent, python=failing))
    try:
        with pytest.raises(lab.LabError) as err:
            lab.up(2, 1)
        message = str(err.value)
        assert "\n" not in message
        assert "agent: cannot start" in message
        kept_log = layout.FAILED_UP_DIR / "h1" / "agent.log"
        assert str(kept_log) in message
        assert "agent: cannot start" in kept_log.read_text()
        assert_lab_gone()
    finally:
        shutil.rmtree(layout.FAILED_UP_DIR, ignore_errors=True)


@pytest.mark.lab
def test_down_waits_for_a_running_up_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "LOCK_TIMEOUT", 0.3)
    layout.LAB_LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with layout.LAB_LOCK_FILE.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running `nseh lab up` holds it
        with pytest.raises(lab.LabError, match="still running"):
            lab.down()
