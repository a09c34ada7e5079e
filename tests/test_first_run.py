"""The first run on a fresh machine: `make demo` with nothing built and nothing cached.

A copy of the repository (no .venv) runs `make demo` with NSEH_GUEST_CACHE on an empty
directory, so the guest image must be downloaded and built on the way, as on a machine that
never ran nseh; every machine with a cached image would hide a build that happens where the
Debian archive is out of reach (the agents' namespaces). Needs root and the Debian archive
(from the root namespace) and takes a few minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from labtools import EXAMPLE_VM, REPO, nseh, nseh_json

from nseh import lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

MAKE_DEMO_TIMEOUT = 1800  # Python packages, ~75 MB of Debian packages, the demo itself


def _copy_repository(target: Path) -> None:
    """The repository's files as a fresh clone plus the uncommitted work would have them."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout
    for name in os.fsdecode(listing).split("\0"):
        source = REPO / name
        if not name or not os.path.lexists(source):  # deleted in the work tree
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name, follow_symlinks=False)


def _run_make_demo(checkout: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NSEH_GUEST_CACHE": str(cache), "COLUMNS": "200"}
    env.pop("VIRTUAL_ENV", None)  # the copy makes and uses its own .venv
    # Its own session, so that a timeout stops the demo under make too (SIGTERM tidies up).
    with subprocess.Popen(["make", "demo"], cwd=checkout, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as make:
        try:
            output, _ = make.communicate(timeout=MAKE_DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGTERM)
            output, _ = make.communicate(timeout=120)
            pytest.fail(f"make demo did not finish in {MAKE_DEMO_TIMEOUT} s:\n{output}")
    return subprocess.CompletedProcess(make.args, make.returncode, output)


def test_make_demo_from_a_fresh_checkout_with_an_empty_guest_cache() -> None:
    with tempfile.TemporaryDirectory(prefix="nsehtest-first-run-") as scratch:
        checkout, cache = Path(scratch) / "nseh", Path(scratch) / "guest-cache"
        cache.mkdir()
        _copy_repository(checkout)
        assert not (checkout / ".venv").exists()
        try:
            result = _run_make_demo(checkout, cache)
        finally:
            lab.down()  # the demo removes its lab; this is for a demo killed on timeout
        words = " ".join(result.stdout.split())  # rich wraps long lines
        assert result.returncode == 0, result.stdout[-6000:]
        # The image was built in the empty cache, from packages downloaded there.
        (image_dir,) = (cache / "images").iterdir()
        assert os.readlink(cache / "current") == f"images/{image_dir.name}"
        assert {"kernel", "initrd.img", "inputs.json"} <= {p.name for p in image_dir.iterdir()}
        assert any((cache / "debs").glob("linux-image-*.deb"))
        # The VM booted from it and migrated there and back.
        assert re.search(r"\bweb1 runs on h1 at ", words), result.stdout[-6000:]
        assert "now on h2" in words and "now on h1" in words, result.stdout[-6000:]


def test_an_agent_without_a_guest_image_says_what_to_run(tmp_path: Path) -> None:
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    lab.down()  # leftovers of a killed run
    try:
        # Without agents, lab up builds no image; the agent then starts on the empty cache.
        lab.up(hosts=1, clients=0, start_agents=False, guest_cache=empty)
        lab.start_agent("h1")
        result = nseh("vm", "start", "web1", "--host", "h1", "--definition", str(EXAMPLE_VM),
                      check=False)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"nseh: error: no guest image in {empty}: run `nseh image build --cache {empty}` "
            "on this host (needs the Debian archive)"]
        assert nseh_json("vm", "list")["vms"] == []  # nothing half-made
        assert list(empty.iterdir()) == []  # and nothing downloaded or built
    finally:
        lab.down()
