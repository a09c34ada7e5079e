from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from labtools import EXAMPLE_VM, nseh

from nseh import lab

# CI machines are noisy: no per-example deadline, and a fixed seed so a failure reproduces.
settings.register_profile("nseh", deadline=None, derandomize=True)
settings.load_profile("nseh")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="lab tests need root (namespaces, QEMU, nftables)")
        for item in items:
            if "lab" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def running_lab() -> Iterator[lab.LabStatus]:
    """One lab (2 hosts, 2 clients, agents running) shared by one test module."""
    lab.down()  # leftovers of a killed run
    try:
        yield lab.up(hosts=2, clients=2)
    finally:
        lab.down()


@pytest.fixture(scope="module")
def web1(running_lab) -> Iterator[str]:
    """The example VM (examples/web1.toml) running on h1 of the module's lab."""
    nseh("vm", "start", "web1", "--host", "h1", "--definition", str(EXAMPLE_VM))
    yield "web1"
    nseh("vm", "stop", "web1", check=False)
