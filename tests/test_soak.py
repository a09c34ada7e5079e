"""The soak, short: `nseh soak --migrations 10` as CI runs it (the full one is 100)."""

from __future__ import annotations

import json
import subprocess

import pytest
from labtools import NSEH

pytestmark = pytest.mark.lab


def test_a_short_soak_loses_no_connection_and_leaks_nothing():
    result = subprocess.run([NSEH, "soak", "--migrations", "10", "--json"],
                            capture_output=True, text=True, timeout=900)
    soak = json.loads(result.stdout)
    assert result.returncode == 0, (soak["broken"], soak["grown"], soak["failures"])
    assert soak["passed"] and soak["migrations"] == 10 and soak["failed"] == 0
    assert soak["guest_flow_alive"] and len(soak["flows"]) == 6
    assert all(flow["alive"] for flow in soak["flows"])
    provenance = soak["provenance"]
    assert provenance["command"][-3:] == ["--migrations", "10", "--json"]
    assert provenance["machine"]["accel"] and provenance["ended_utc"]
    for host in ("h1", "h2"):
        start, end = soak["resources"]["after_warm_up"][host], soak["resources"]["end"][host]
        assert set(start) == set(soak["tolerance"]) and end["nft_objects"] > 0
        assert end["processes"] == start["processes"]


def test_an_odd_number_of_migrations_is_refused():
    result = subprocess.run([NSEH, "soak", "--migrations", "3"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "--migrations must be an even number" in result.stderr
