"""The probe's report is checked: a probe that reports nothing, or not every flow it was
started with, is an error, never an empty list of flows. Real probe processes in a scratch
namespace (nsehtest-probe, not a lab namespace) against a real TCP echo server."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nseh.lab.echo import EchoServer
from nseh.lab.layout import netns_exec_argv
from nseh.lab.probe import Probe, ProbeError, check_report, started_flows

NAMESPACE = "nsehtest-probe"
ECHO, CLOSED = "127.0.0.1:7", "127.0.0.1:9"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def echo_server() -> Iterator[None]:
    """A namespace with only loopback, an echo server on port 7, nothing on port 9."""
    subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)  # a killed run's
    _ip("netns", "add", NAMESPACE)
    try:
        _ip("-n", NAMESPACE, "link", "set", "lo", "up")
        with EchoServer(NAMESPACE, [7]):
            yield
    finally:
        _ip("netns", "del", NAMESPACE)


def test_a_probe_reports_each_flow_it_started_alive_or_not(echo_server):
    with Probe(NAMESPACE, ["--tcp", ECHO, "--tcp", CLOSED]) as probe:
        assert probe.started == [("tcp", ECHO), ("tcp", CLOSED)]
        assert not probe.wait_ready()  # the flow to the closed port never echoes
        flows = {flow["target"]: flow for flow in probe.finish()}
    assert flows[ECHO]["alive"] and flows[ECHO]["echoed"] > 0
    assert not flows[CLOSED]["alive"] and "ConnectionRefusedError" in flows[CLOSED]["error"]


def test_a_probe_started_with_bad_arguments_is_an_error(echo_server):
    with Probe(NAMESPACE, ["--tcp", ECHO, "--bogus"]) as probe:
        assert not probe.wait_ready()
        with pytest.raises(ProbeError, match=r"reported no flows \(exit status 2, stderr: "
                                             r".*unrecognized arguments: --bogus"):
            probe.finish()


def test_a_probe_killed_before_its_report_is_an_error(echo_server):
    with Probe(NAMESPACE, ["--tcp", ECHO]) as probe:
        assert probe.wait_ready()
        probe.proc.send_signal(signal.SIGKILL)
        with pytest.raises(ProbeError, match=r"reported no flows \(exit status -9, "
                                             r"stderr: nothing\)"):
            probe.finish()


def test_a_report_of_fewer_or_other_flows_than_started_is_an_error(echo_server):
    # The probe's real report of its one flow, held against what two other probes started.
    run = subprocess.run(netns_exec_argv(NAMESPACE, [sys.executable, "-m", "nseh.lab.probe",
                                                     "--tcp", ECHO]),
                         input="", capture_output=True, text=True, timeout=30)
    [flow] = check_report(started_flows(["--tcp", ECHO]), run.stdout, run.returncode,
                          run.stderr)
    assert flow["target"] == ECHO
    with pytest.raises(ProbeError, match=r"reported 1 flows .* not the 2 it started"):
        check_report(started_flows(["--tcp", ECHO, "--udp", ECHO]), run.stdout,
                     run.returncode, run.stderr)
    with pytest.raises(ProbeError, match=r"reported 1 flows .* not the 1 it started"):
        check_report(started_flows(["--tcp", CLOSED]), run.stdout, run.returncode,
                     run.stderr)
