"""`nseh demo`: its verdicts follow the run's figures, and its exit status follows the verdicts.

The verdict function is tested on crafted figures (pure logic); the real demo runs on the lab
three times: as shipped (every check passes), and with the precopy migration leaving the
firewall's or the IPS's state behind (the matching check fails, exit status 1)."""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from labtools import NSEH

from nseh.demo import CHECKS, DEMO_FLOWS, Verdict, verdicts
from nseh.lab.topology import lab_namespaces

ALL_CHECKS = [check for checks in CHECKS.values() for check, _ in checks]
TARGETS = [("tcp", "10.0.0.10:7"), ("tcp", "10.0.0.10:7"), ("tcp", "[fd00::10]:7"),
           ("tcp", "203.0.113.10:7"), ("udp", "10.0.0.10:7"), ("ping", "10.0.0.10")]


def flows(alive: list[bool]) -> list[dict[str, Any]]:
    return [{"kind": kind, "target": target, "echoed": 80, "longest_gap_ms": 280.0 if up
             else 4200.0, "error": None, "alive": up}
            for (kind, target), up in zip(TARGETS, alive, strict=True)]


def block(expires_s: float) -> dict[str, Any]:
    return {"source": "10.0.0.202", "timeout_s": 300.0, "expires_s": expires_s}


def migration(sc_mode: str, source: str, destination: str, **figures: Any) -> dict[str, Any]:
    """A run's results as the demo records them; by default, what a good run measures."""
    stock = sc_mode == "none"
    run = {"sc_mode": sc_mode, "source": source, "destination": destination,
           "report": {"result": "migrated", "failure": None, "qemu": {"downtime_ms": 22}},
           "flows_started": DEMO_FLOWS,
           "flows": flows([False] * 4 + [True] * 2 if stock else [True] * 6),
           "flows_error": None, "vm_hosts": [destination], "hosts_unreachable": {},
           "attacker": {"connect": "echo" if stock else "timeout",
                        "block": None if stock else block(297.5), "before": block(299.7),
                        "seconds_between": 2.2},
           "destination_invalid_drops": 19 if stock else 3}
    run.update(figures)
    return run


def good_runs() -> list[dict[str, Any]]:
    return [migration("none", "h1", "h2"), migration("precopy", "h2", "h1")]


def judged(runs: list[dict[str, Any]]) -> dict[str, Verdict]:
    return {v.check: v for v in verdicts(runs)}


def failed(runs: list[dict[str, Any]]) -> list[str]:
    return [v.check for v in verdicts(runs) if not v.passed]


def with_precopy(**figures: Any) -> list[dict[str, Any]]:
    none, precopy = good_runs()
    return [none, {**precopy, **figures}]


def with_none(**figures: Any) -> list[dict[str, Any]]:
    none, precopy = good_runs()
    return [{**none, **figures}, precopy]


# -- the verdicts, on crafted figures ------------------------------------------------------


def test_a_good_run_passes_every_check_with_its_figures_in_words():
    verdict = judged(good_runs())
    assert list(verdict) == ALL_CHECKS and len(ALL_CHECKS) == 8
    assert all(v.passed for v in verdict.values())
    assert verdict["precopy-keeps-flows"].detail == (
        "--sc precopy: all 6 flows survived (longest gap between two echoes 280 ms)")
    assert verdict["none-breaks-tcp"].detail == (
        "--sc none broke all 4 TCP flows and h2's firewall dropped 19 packets as "
        "`ct state invalid`: strict conntrack is in force (2 of 2 UDP and ping flows alive)")
    assert verdict["precopy-keeps-block"].detail == (
        "after --sc precopy, h1 still blocks the attacker 10.0.0.202: 297.5 s of 300 s left "
        "(299.7 s on h2 2.2 s before); its connection to port 7 was dropped")
    assert "h2 does not block the attacker" in verdict["none-carries-no-block"].detail
    assert verdict["precopy-vm-placement"].detail == (
        "after --sc precopy, web1 runs on h1 and on no other host")
    assert verdict["none-migrated"].detail == (
        "migrated web1 h1 → h2 with --sc none (QEMU downtime 22 ms)")


def test_precopy_losing_a_flow_fails_and_names_it():
    runs = with_precopy(flows=flows([True, False, True, True, True, True]))
    assert failed(runs) == ["precopy-keeps-flows"]
    assert judged(runs)["precopy-keeps-flows"].detail == (
        "--sc precopy: 5 of 6 flows survived; broken: tcp 10.0.0.10:7")


@given(st.lists(st.booleans(), min_size=6, max_size=6))
def test_precopy_passes_exactly_when_every_flow_survived(alive):
    verdict = judged(with_precopy(flows=flows(alive)))["precopy-keeps-flows"]
    assert verdict.passed == all(alive)
    assert f"{sum(alive)} of 6" in verdict.detail or all(alive)


@pytest.mark.parametrize("reported", [0, 5])
def test_flows_the_probe_did_not_report_fail_both_flow_checks(reported):
    """A probe that reports nothing (or too little) must not let a check pass vacuously."""
    none, precopy = good_runs()
    error = None if reported else "ProbeError: the probe reported nothing"
    runs = [{**none, "flows": none["flows"][:reported], "flows_error": error},
            {**precopy, "flows": precopy["flows"][:reported], "flows_error": error}]
    assert failed(runs) == ["none-breaks-tcp", "precopy-keeps-flows"]
    detail = judged(runs)["precopy-keeps-flows"].detail
    assert detail.startswith(f"--sc precopy: flows not measured: the probe reported {reported} "
                             "of the 6 flows started")
    assert (error in detail) if error else "(" not in detail


def test_tcp_surviving_stock_migration_fails_the_premise():
    runs = with_none(flows=flows([False, True, False, False, True, True]))
    assert failed(runs) == ["none-breaks-tcp"]
    assert judged(runs)["none-breaks-tcp"].detail.startswith(
        "--sc none: 1 of 4 TCP flows survived stock migration (tcp 10.0.0.10:7): conntrack is "
        "not strict")


def test_tcp_broken_without_invalid_drops_is_not_taken_for_strict_conntrack():
    runs = with_none(destination_invalid_drops=0)
    assert failed(runs) == ["none-breaks-tcp"]
    assert "dropped 0 packets" in judged(runs)["none-breaks-tcp"].detail


def test_udp_and_ping_are_reported_as_measured_after_stock_migration():
    runs = with_none(flows=flows([False] * 4 + [True, False]))
    assert judged(runs)["none-breaks-tcp"].detail.endswith("(1 of 2 UDP and ping flows alive)")


def test_a_lost_block_fails():
    runs = with_precopy(attacker={"connect": "echo", "block": None, "before": block(299.7),
                                  "seconds_between": 2.2})
    assert failed(runs) == ["precopy-keeps-block"]
    assert judged(runs)["precopy-keeps-block"].detail == (
        "after --sc precopy, h1 does not block the attacker 10.0.0.202 that h2 had blocked; "
        "its connection to port 7 was answered")


def test_a_block_that_started_over_fails():
    runs = with_precopy(attacker={"connect": "timeout", "block": block(300.0),
                                  "before": block(299.7), "seconds_between": 2.2})
    assert failed(runs) == ["precopy-keeps-block"]
    assert "started over" in judged(runs)["precopy-keeps-block"].detail


def test_a_listed_block_that_lets_the_attacker_through_fails():
    runs = with_precopy(attacker={"connect": "echo", "block": block(297.5),
                                  "before": block(299.7), "seconds_between": 2.2})
    assert failed(runs) == ["precopy-keeps-block"]
    assert "but answered its connection" in judged(runs)["precopy-keeps-block"].detail


def test_stock_migration_carrying_a_block_fails_the_control():
    runs = with_none(attacker={"connect": "timeout", "block": block(296.0),
                               "before": block(299.7), "seconds_between": 4.9})
    assert failed(runs) == ["none-carries-no-block"]
    assert "blocks the attacker 10.0.0.202 (296.0 s left)" in (
        judged(runs)["none-carries-no-block"].detail)


def test_a_failed_migration_and_a_vm_in_the_wrong_place_fail():
    none, precopy = good_runs()
    runs = [none, {**precopy, "vm_hosts": ["h2"],
                   "report": {"result": "failed", "failure": "QEMU migration failed",
                              "qemu": {"downtime_ms": None}}}]
    assert failed(runs) == ["precopy-migrated", "precopy-vm-placement"]
    verdict = judged(runs)
    assert verdict["precopy-migrated"].detail == (
        "migrating web1 h2 → h1 with --sc precopy ended failed: QEMU migration failed")
    assert verdict["precopy-vm-placement"].detail == (
        "after --sc precopy, web1 runs on h2, not on h1 alone")


@pytest.mark.parametrize(("hosts", "unreachable", "words"), [
    (["h1", "h2"], {}, "runs on h1, h2, not on h1 alone"),
    ([], {}, "runs on no host, not on h1 alone"),
    (["h1"], {"h2": "connection refused"}, "is unknown: h2 not asked (connection refused)"),
])
def test_the_vm_must_run_on_exactly_the_destination(hosts, unreachable, words):
    runs = with_precopy(vm_hosts=hosts, hosts_unreachable=unreachable)
    assert failed(runs) == ["precopy-vm-placement"]
    assert words in judged(runs)["precopy-vm-placement"].detail


def test_a_migration_the_demo_did_not_reach_fails_all_its_checks():
    runs = good_runs()[:1]
    assert failed(runs) == [check for check, _ in CHECKS["precopy"]]
    assert judged(runs)["precopy-keeps-flows"].detail == (
        "--sc precopy: not run (the demo stopped before h2 → h1)")


def test_the_verdicts_do_not_change_the_runs():
    runs = good_runs()
    before = copy.deepcopy(runs)
    verdicts(runs)
    assert runs == before


# -- the real demo on the lab ------------------------------------------------------------


def run_demo(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = subprocess.run([NSEH, "demo", "--json", *args], capture_output=True, text=True,
                            timeout=600)
    assert not lab_namespaces(), "the demo left lab namespaces behind"
    assert result.stdout, f"no JSON ({result.returncode}): {result.stderr[-3000:]}"
    return result, json.loads(result.stdout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("nseh: error:")]


@pytest.mark.lab
def test_the_demo_passes_every_check_on_what_it_measured():
    result, demo = run_demo()
    assert result.returncode == 0, (demo["verdicts"], result.stderr[-2000:])
    assert demo["passed"] and not error_lines(result.stderr)
    assert [v["check"] for v in demo["verdicts"]] == ALL_CHECKS
    assert all(v["passed"] for v in demo["verdicts"])
    # The figures the verdicts stand on, read directly.
    none, precopy = demo["runs"]
    assert len(precopy["flows"]) == 6 and all(f["alive"] for f in precopy["flows"])
    tcp = [f for f in none["flows"] if f["kind"] == "tcp"]
    assert len(tcp) == 4 and not any(f["alive"] for f in tcp)
    assert none["attacker"]["block"] is None and precopy["attacker"]["block"] is not None
    assert precopy["attacker"]["connect"] == "timeout"
    assert none["vm_hosts"] == ["h2"] and precopy["vm_hosts"] == ["h1"]


@pytest.mark.lab
@pytest.mark.parametrize(("engine", "check"), [("firewall", "precopy-keeps-flows"),
                                               ("ips", "precopy-keeps-block")])
def test_the_demo_fails_when_precopy_leaves_an_engines_state_behind(engine, check):
    result, demo = run_demo("--skip-engine", engine)
    assert result.returncode == 1
    assert not demo["passed"] and demo["skipped_engines"] == [engine]
    assert [v["check"] for v in demo["verdicts"] if not v["passed"]] == [check]
    assert error_lines(result.stderr) == [f"nseh: error: demo: 1 of 8 checks failed: {check}"]
    precopy = demo["runs"][1]
    assert precopy["report"]["skipped_engines"] == [engine]
    if engine == "firewall":
        assert not all(f["alive"] for f in precopy["flows"]) and len(precopy["flows"]) == 6
    else:
        assert precopy["attacker"]["block"] is None


def test_an_unknown_engine_is_refused_before_anything_is_built():
    result = subprocess.run([NSEH, "demo", "--skip-engine", "antivirus"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.splitlines() == [
        "nseh: error: unknown security engine 'antivirus' for --skip-engine (choose from "
        "firewall, ips)"]
