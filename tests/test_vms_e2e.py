"""End to end on the lab: real VMs under QEMU behind the per-VM nftables firewall,
driven through the real `nseh` CLI and agents; traffic from real client namespaces."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import (
    EXAMPLE_VM,
    NSEH,
    client_connect,
    client_http_get,
    client_ping,
    management_link_down,
    nseh,
    nseh_json,
    start_client_echo_server,
)

from nseh import lab

pytestmark = pytest.mark.lab

VM4, VM6 = "10.0.0.10", "fd00::10"

# Only client c1 may reach the echo port; nothing may reach HTTP although the guest serves it.
STRICT_VM = """
name = "strict"
[network]
ipv4 = "10.0.0.20/24"
ipv6 = "fd00::20/64"
[[policy.inbound]]
proto = "tcp"
ports = [7]
peers = ["10.0.0.201/32", "fd00::201/128"]
[[policy.inbound]]
proto = "icmp"
peers = ["10.0.0.201/32"]
[[policy.outbound]]
proto = "tcp"
ports = [7]
"""


@pytest.fixture(scope="module")
def strict_vm(running_lab, tmp_path_factory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("vm") / "strict.toml"
    path.write_text(STRICT_VM)
    nseh("vm", "start", "strict", "--host", "h2", "--definition", str(path))
    yield "strict"
    nseh("vm", "stop", "strict", check=False)


def vm_host(name: str) -> list[str]:
    return [v["host"] for v in nseh_json("vm", "list")["vms"] if v["name"] == name]


def test_vm_serves_through_its_policy(web1):
    listed = {v["name"]: v for v in nseh_json("vm", "list")["vms"]}
    assert listed["web1"]["host"] == "h1" and listed["web1"]["state"] == "running"
    assert listed["web1"]["ipv4"] == f"{VM4}/24"
    assert client_connect(1, VM4, 7) == "echo"
    assert client_connect(1, VM6, 7) == "echo"
    assert client_connect(1, VM4, 7, "udp") == "echo"
    assert client_ping(1, VM4)
    assert client_http_get(1, f"http://{VM4}/big") == 1 << 20


def test_guest_commands_run_inside_the_vm(web1):
    result = nseh_json("vm", "exec", "web1", "--", "ip", "-o", "addr", "show", "eth0")
    assert result["exit_code"] == 0
    assert f"{VM4}/24" in result["output"] and f"{VM6}/64" in result["output"]
    assert nseh("vm", "exec", "web1", "--", "false", check=False).returncode == 1


def test_policy_drops_what_it_does_not_list(strict_vm):
    ip = "10.0.0.20"
    assert client_connect(1, ip, 7) == "echo"
    assert client_connect(1, "fd00::20", 7) == "echo"
    assert client_ping(1, ip)
    # The guest serves HTTP and UDP echo, but the policy lists neither: dropped, not refused.
    assert client_connect(1, ip, 80, timeout=1) == "timeout"
    assert client_connect(1, ip, 7, "udp", timeout=1) == "timeout"
    # Client c2 is not among the echo port's peers.
    assert client_connect(2, ip, 7, timeout=1) == "timeout"
    assert not client_ping(2, ip)
    assert nseh_json("host", "counters", "h2")["vm_strict_in_drops"] > 0


def test_outbound_policy_applies_to_connections_from_the_guest(strict_vm, running_lab):
    # A TCP echo server on client c1, port 7 (allowed outbound) and 8 (not allowed).
    with start_client_echo_server(1, [7, 8]):
        ok = nseh_json("vm", "exec", "strict", "--",
                       "echo hi | timeout 3 nc 10.0.0.201 7")
        assert ok["exit_code"] == 0 and "hi" in ok["output"]
        blocked = nseh_json("vm", "exec", "strict", "--",
                            "echo hi | timeout 3 nc 10.0.0.201 8")
        assert "hi" not in blocked["output"]


def test_plain_migration_moves_the_vm_there_and_back(web1):
    report = nseh_json("migrate", "web1", "--to", "h2", "--sc", "none")
    assert report["result"] == "migrated", report
    assert report["qemu"]["status"] == "completed"
    assert report["qemu"]["downtime_ms"] is not None and report["qemu"]["ram_transferred_bytes"]
    assert vm_host("web1") == ["h2"]
    assert client_connect(1, VM4, 7) == "echo"  # answers on the destination
    info = nseh_json("vm", "exec", "web1", "--", "cat /proc/uptime")
    assert info["exit_code"] == 0
    back = nseh_json("migrate", "web1", "--to", "h1", "--sc", "none")
    assert back["result"] == "migrated" and vm_host("web1") == ["h1"]
    assert client_connect(1, VM6, 7) == "echo"


@contextlib.contextmanager
def agent_down(host: str) -> Iterator[None]:
    lab.stop_agent(host)
    try:
        yield
    finally:
        lab.start_agent(host)


@pytest.mark.parametrize(("fault", "reason"), [
    (management_link_down, "10.99.0.2"),  # no route, or no answer in time
    (agent_down, "unreachable"),
])
def test_failed_migration_leaves_the_vm_on_the_source(web1, fault, reason):
    with fault("h2"):
        result = nseh("migrate", "web1", "--to", "h2", "--json", check=False)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "migration of web1 failed" in error and "still runs on h1" in error
    assert reason in error
    assert vm_host("web1") == ["h1"]
    assert "web1" not in nseh_json("host", "info", "h2")["vms"]
    assert not any("web1" in counter for counter in nseh_json("host", "counters", "h2"))
    assert client_connect(1, VM4, 7) == "echo"


@pytest.mark.parametrize(("args", "message"), [
    (["vm", "stop", "nosuchvm"], "no VM named 'nosuchvm'"),
    (["migrate", "nosuchvm", "--to", "h2"], "no VM named 'nosuchvm'"),
    (["migrate", "web1", "--to", "h9"], "unknown host 'h9'"),
    (["vm", "start", "web1", "--host", "h2", "--definition", str(EXAMPLE_VM)],
     "already runs on h1"),
    (["vm", "start", "other", "--host", "h1", "--definition", str(EXAMPLE_VM)],
     "address 10.0.0.10 is already used"),
    (["vm", "start", "x", "--host", "h1", "--definition", "/nonexistent.toml"],
     "cannot read"),
])
def test_bad_input_gives_a_one_line_error_and_changes_nothing(web1, args, message):
    before = nseh_json("vm", "list")
    result = nseh(*args, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert nseh_json("vm", "list") == before


def test_malformed_definition_is_refused(running_lab, tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[network]\nipv4 = "10.0.0.500/24"\n')
    result = nseh("vm", "start", "bad", "--host", "h1", "--definition", str(bad), check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "network.ipv4" in result.stderr


def test_a_restarted_agent_readopts_its_running_vm(web1):
    before = {v["name"]: v for v in nseh_json("vm", "list")["vms"]}["web1"]
    lab.stop_agent(before["host"])
    # The VM does not depend on its agent.
    assert client_connect(1, VM4, 7) == "echo"
    lab.start_agent(before["host"])
    after = {v["name"]: v for v in nseh_json("vm", "list")["vms"]}["web1"]
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert nseh_json("vm", "exec", "web1", "--", "echo", "still-here")["output"] == "still-here\n"


def test_cli_drives_agents_over_mutual_tls_as_on_real_hosts(web1, tmp_path):
    # An operator's certificate from the cluster CA, and an inventory of tls:// endpoints
    # (agents' management addresses), used from a host namespace as from a real machine.
    nseh("pki", "issue", "admin", "--ca", str(lab.LAB_DIR / "pki"), "--out",
         str(tmp_path / "admin"))
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        "".join(f'[hosts.h{i}]\nagent = "tls://h{i}@{lab.host_mgmt_ipv4(i)}:7471"\n'
                for i in (1, 2))
        + f'[tls]\ncert = "{tmp_path}/admin/admin.pem"\nkey = "{tmp_path}/admin/admin-key.pem"'
        f'\nca = "{tmp_path}/admin/ca.pem"\n')

    def remote(*args: str) -> subprocess.CompletedProcess[str]:
        argv = lab.netns_exec_argv("nseh-h2", ["env", f"NSEH_INVENTORY={inventory}", NSEH,
                                               *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    listed = remote("vm", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [v["host"] for v in json.loads(listed.stdout)["vms"] if v["name"] == "web1"] == ["h1"]
    for destination in ("h2", "h1"):
        moved = remote("migrate", "web1", "--to", destination, "--json")
        assert moved.returncode == 0, moved.stderr
        assert json.loads(moved.stdout)["result"] == "migrated"
    # Without a certificate the CLI has no way to call tls:// agents (the agents refusing
    # foreign or revoked certificates is tested in test_agent_api_tls.py).
    inventory.write_text(inventory.read_text().split("[tls]")[0])
    refused = remote("vm", "list", "--json")
    assert "needs TLS client credentials" in refused.stderr


# Last in this module: it removes the lab the others share.
def test_lab_down_leaves_nothing_behind(web1, strict_vm):
    lab.down()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert "nseh-" not in namespaces
    qemus = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True,
                           text=True).stdout
    assert str(lab.LAB_DIR) not in qemus
    agents = subprocess.run(["pgrep", "-af", "nseh.agent"], capture_output=True,
                            text=True).stdout
    assert str(lab.LAB_DIR) not in agents
    assert not lab.LAB_DIR.exists()
    assert "table inet nseh" not in subprocess.run(["nft", "list", "tables"],
                                                   capture_output=True, text=True).stdout
