"""End to end: a VM's intrusion prevention (IPS) state moves with it. An attacker blocked on
the source is still blocked on the destination, with what was left of its block; a scan
begun before the migration is finished on the destination; with `--skip-engine ips` both
are lost. Client c2 attacks (port scans), client c1 is legitimate; real VMs, real traffic
from the clients' namespaces, the real CLI."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from labtools import (
    EXAMPLE_IPS_VM,
    client_connect,
    client_scan,
    migrate,
    nseh,
    nseh_json,
    vm_host,
)

from nseh import lab
from nseh.lab.probe import Probe

pytestmark = pytest.mark.lab

VM4, VM6, FLOATING4 = "10.0.0.10", "fd00::10", "203.0.113.10"
LEGIT, ATTACKER = 1, 2
LEGIT4, ATTACKER4 = str(lab.client_ipv4(LEGIT)), str(lab.client_ipv4(ATTACKER))
OPEN = 7  # the echo service, open to both clients
# examples/web1-ips.toml: a port scan is more than 5 distinct closed ports within 60 s; a
# detected source is blocked for 300 s.
THRESHOLD, BLOCK_SECONDS = 5, 300
CLOSED = list(range(1001, 1001 + THRESHOLD + 1))
# c1's live flows through the migrations.
FLOWS = ["--tcp", f"{VM4}:7", "--tcp", f"[{VM6}]:7", "--tcp", f"{FLOATING4}:7",
         "--udp", f"{VM4}:7"]


@pytest.fixture(scope="module")
def web1(running_lab) -> Iterator[str]:
    nseh("vm", "start", "web1", "--host", "h1", "--definition", str(EXAMPLE_IPS_VM))
    yield "web1"
    nseh("vm", "stop", "web1", check=False)


def reset() -> None:
    """web1 back on h1, neither client blocked nor in a detection in progress."""
    if vm_host("web1") != "h1":
        migrate("h1", "precopy")
    for client in (LEGIT4, ATTACKER4):
        nseh("ips", "unblock", "web1", client)


@pytest.fixture
def vm(web1) -> Iterator[str]:
    reset()
    yield web1
    reset()


def ips_list() -> dict[str, Any]:
    listing: dict[str, Any] = nseh_json("ips", "list", "web1")
    return listing


def blocks() -> dict[str, dict[str, Any]]:
    return {block["source"]: block for block in ips_list()["blocks"]}


def wait_blocked(source: str, timeout: float = 5.0) -> dict[str, Any]:
    """`source`'s block, once the VM's agent has seen the attack and blocked it."""
    deadline = time.monotonic() + timeout
    while (block := blocks().get(source)) is None:
        assert time.monotonic() < deadline, f"{source} is not blocked after {timeout} s"
        time.sleep(0.1)
    return block


def timed(call: Callable[[], dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    """The call's answer and when it was made: the middle of the time it took."""
    started = time.monotonic()
    answer = call()
    return (started + time.monotonic()) / 2, answer


class Knocker:
    """Client c2 connects to the open port again and again while the VM migrates."""

    def __init__(self) -> None:
        self.results: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append(client_connect(ATTACKER, VM4, OPEN, timeout=0.5))

    def __enter__(self) -> Knocker:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def assert_flows_survived(flows: list[dict[str, Any]]) -> None:
    assert sorted(f["target"] for f in flows) == sorted(FLOWS[1::2])
    for flow in flows:
        assert flow["alive"] and flow["error"] is None, flow


def test_a_blocked_attacker_stays_blocked_on_the_destination_with_its_remaining_time(vm):
    assert client_connect(ATTACKER, VM4, OPEN) == "echo"
    client_scan(ATTACKER, VM4, CLOSED)
    assert wait_blocked(ATTACKER4)["timeout_s"] == BLOCK_SECONDS
    assert client_connect(ATTACKER, VM4, OPEN) == "timeout"  # even the open port
    assert client_connect(LEGIT, VM4, OPEN) == "echo"
    with Probe(lab.client_namespace(LEGIT), FLOWS) as probe:
        assert probe.wait_ready()
        on_source_at, on_source = timed(ips_list)
        with Knocker() as knocker:
            report = migrate("h2", "precopy")
            assert client_connect(ATTACKER, VM4, OPEN) == "timeout"
        on_destination_at, on_destination = timed(ips_list)
        time.sleep(2)
        flows = probe.finish()
    assert on_source["host"] == "h1" and on_destination["host"] == "h2"
    [before] = [b for b in on_source["blocks"] if b["source"] == ATTACKER4]
    [after] = [b for b in on_destination["blocks"] if b["source"] == ATTACKER4]
    # The block goes on where it was, neither restarted nor cut short.
    assert after["timeout_s"] == BLOCK_SECONDS
    expected = before["expires_s"] - (on_destination_at - on_source_at)
    assert abs(after["expires_s"] - expected) < 1.0, (before, after, expected)
    # Not one of the attacker's connections got through, during the migration or after it.
    assert knocker.results and set(knocker.results) == {"timeout"}, set(knocker.results)
    assert_flows_survived(flows)
    sc = report["sc"]
    assert sc["engines"]["ips"] >= 1 and sc["engines"]["firewall"] >= 4, sc
    assert sc["rejected"] == 0 and report["skipped_engines"] == [], report
    migrate("h1", "precopy")
    assert ATTACKER4 in blocks()
    assert client_connect(ATTACKER, VM4, OPEN) == "timeout"
    assert client_connect(LEGIT, VM4, OPEN) == "echo"


def test_a_scan_begun_before_the_migration_and_finished_after_it_is_detected(vm):
    client_scan(ATTACKER, VM4, CLOSED[:3])  # not more than the threshold: no block yet
    time.sleep(1)  # h1's agent has seen the probes
    assert ATTACKER4 not in blocks()
    assert client_connect(ATTACKER, VM4, OPEN) == "echo"
    report = migrate("h2", "precopy")
    assert report["sc"]["engines"]["ips"] == 1, report["sc"]  # the detection in progress
    # Three more closed ports on h2: a scan only together with the three seen on h1.
    client_scan(ATTACKER, VM4, CLOSED[3:])
    block = wait_blocked(ATTACKER4)
    assert ips_list()["host"] == "h2" and block["timeout_s"] == BLOCK_SECONDS
    assert client_connect(ATTACKER, VM4, OPEN) == "timeout"
    assert client_connect(LEGIT, VM4, OPEN) == "echo"


def test_without_ips_state_migration_the_block_and_a_scan_in_progress_are_lost(vm):
    client_scan(ATTACKER, VM4, CLOSED)
    wait_blocked(ATTACKER4)
    assert client_connect(ATTACKER, VM4, OPEN) == "timeout"
    client_scan(LEGIT, VM4, CLOSED[:3])  # c1 half-scans: a detection in progress
    with Probe(lab.client_namespace(LEGIT), FLOWS) as probe:
        assert probe.wait_ready()
        report = migrate("h2", "precopy", "--skip-engine", "ips")
        time.sleep(2)
        flows = probe.finish()
    # The firewall's SC moved (c1's flows survived strict conntrack), the IPS state did not.
    assert_flows_survived(flows)
    assert report["skipped_engines"] == ["ips"]
    assert list(report["sc"]["engines"]) == ["firewall"], report["sc"]
    assert ips_list() == {"name": "web1", "host": "h2", "blocks": []}
    assert client_connect(ATTACKER, VM4, OPEN) == "echo"
    client_scan(LEGIT, VM4, CLOSED[3:])  # with the three left on h1 this would be a scan
    time.sleep(1)
    assert LEGIT4 not in blocks()
    # h2 has the VM's IPS policy all the same: a whole scan there is detected.
    client_scan(ATTACKER, VM4, CLOSED)
    assert wait_blocked(ATTACKER4)["timeout_s"] == BLOCK_SECONDS
    assert client_connect(ATTACKER, VM4, OPEN) == "timeout"
    assert client_connect(LEGIT, VM4, OPEN) == "echo"


def test_an_unknown_engine_to_skip_is_refused(vm):
    result = nseh("migrate", "web1", "--to", "h2", "--skip-engine", "nope", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == ("nseh: error: unknown security engine 'nope' "
                                     "(choose from firewall, ips)")
    assert vm_host("web1") == "h1"


def test_operators_block_and_unblock_and_a_block_survives_a_migration(vm):
    blocked = nseh("ips", "block", "web1", ATTACKER4, "--seconds", "120")
    assert blocked.stdout.strip() == f"web1: {ATTACKER4} blocked for 120 s"
    assert client_connect(ATTACKER, VM4, OPEN) == "timeout"
    assert client_connect(LEGIT, VM4, OPEN) == "echo"
    block = blocks()[ATTACKER4]
    assert block["timeout_s"] == 120 and 110 < block["expires_s"] <= 120
    assert "unblocked" in nseh("ips", "unblock", "web1", ATTACKER4).stdout
    assert client_connect(ATTACKER, VM4, OPEN) == "echo"
    assert "was not blocked" in nseh("ips", "unblock", "web1", ATTACKER4).stdout
    own = nseh("ips", "block", "web1", VM4, check=False)
    assert own.returncode == 1 and "own address" in own.stderr
    assert len(own.stderr.strip().splitlines()) == 1
    nseh("ips", "block", "web1", ATTACKER4, "--seconds", "600")
    migrate("h2", "precopy")
    listing = ips_list()
    [moved] = listing["blocks"]
    assert listing["host"] == "h2" and moved["source"] == ATTACKER4
    assert moved["timeout_s"] == 600 and 580 < moved["expires_s"] < 600
    assert client_connect(ATTACKER, VM4, OPEN) == "timeout"
    # On the destination the operator's unblock works as anywhere.
    assert "unblocked" in nseh("ips", "unblock", "web1", ATTACKER4).stdout
    assert client_connect(ATTACKER, VM4, OPEN) == "echo"
