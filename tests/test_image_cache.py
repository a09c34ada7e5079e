"""The guest image cache: which image is current, what the agent is told when there is none,
what prune removes and keeps. The unit tests use small stand-in images; the lab test prunes
around a real VM. The build itself is tested in test_guest.py and test_first_run.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import EXAMPLE_VM, nseh, nseh_json

from nseh import lab
from nseh.guest.image import (
    CacheContents,
    CachedImage,
    GuestImage,
    GuestImageError,
    build_image,
    cache_contents,
    current_image,
    guest_cache_dir,
    plan_prune,
    prune_cache,
)


def _add_image(cache: Path, name: str, debs: list[str], *, current: bool = False) -> Path:
    """A stand-in for a built image: its files as build_image leaves them."""
    image_dir = cache / "images" / name
    image_dir.mkdir(parents=True)
    (image_dir / "kernel").write_bytes(b"k" * 1000)
    (image_dir / "initrd.img").write_bytes(b"i" * 500)
    (image_dir / "inputs.json").write_text(json.dumps(
        {"key": name * 2, "packages": {deb.split("_")[0]: deb for deb in debs}}))
    (cache / "debs").mkdir(exist_ok=True)
    for deb in debs:
        (cache / "debs" / deb).write_bytes(b"d" * 100)
    if current:
        (cache / "current").unlink(missing_ok=True)
        (cache / "current").symlink_to(f"images/{name}")
    return image_dir


@pytest.fixture
def process_using() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test that name an image's file on their command line, as QEMU
    does with -kernel; killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def _start_user(started: list[subprocess.Popen[bytes]], kernel: Path) -> int:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "-kernel", str(kernel)])
    started.append(process)
    # Popen returns as the exec begins, before the kernel has set the new command line.
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    deadline = time.monotonic() + 10
    while os.fsencode(kernel) not in cmdline.read_bytes():
        assert time.monotonic() < deadline, "the process never showed its command line"
        time.sleep(0.01)
    return process.pid


def test_without_a_built_image_the_agent_is_told_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(GuestImageError) as missing:
        current_image(tmp_path)
    assert str(missing.value) == (f"no guest image in {tmp_path}: run `nseh image build --cache "
                                  f"{tmp_path}` on this host (needs the Debian archive)")
    # A link to an image whose files are gone is no image either.
    _add_image(tmp_path, "aaaa", [], current=True)
    (tmp_path / "images/aaaa/initrd.img").unlink()
    with pytest.raises(GuestImageError, match="no guest image"):
        current_image(tmp_path)


def test_current_image_follows_the_link(tmp_path: Path) -> None:
    _add_image(tmp_path, "aaaa", ["a_1_amd64.deb"], current=True)
    newer = _add_image(tmp_path, "bbbb", ["b_1_amd64.deb"])
    assert current_image(tmp_path).kernel == tmp_path / "images/aaaa/kernel"
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to("images/bbbb")
    assert current_image(tmp_path) == GuestImage(kernel=newer / "kernel",
                                                 initrd=newer / "initrd.img")


def _image(name: str, *, current: bool = False, used_by: tuple[int, ...] = (),
           debs: tuple[str, ...] = ()) -> CachedImage:
    return CachedImage(name=name, path=Path("/c/images") / name, key=name, size_bytes=1,
                       packages={deb.split("_")[0]: deb for deb in debs}, built_at=0.0,
                       current=current, used_by=used_by)


def test_prune_plan_keeps_the_current_image_its_packages_and_images_in_use() -> None:
    current = _image("cur", current=True, debs=("a_2_amd64.deb", "b_1_amd64.deb"))
    old, running = _image("old", debs=("a_1_amd64.deb",)), _image("run", used_by=(42,))
    debs = [Path("/c/debs") / name for name in ("a_1_amd64.deb", "a_2_amd64.deb",
                                                 "b_1_amd64.deb", "c_1_amd64.deb")]
    plan = plan_prune(CacheContents(cache_dir=Path("/c"), images=[old, current, running],
                                    debs=debs))
    assert plan.images == [old]
    assert plan.kept_in_use == [running]
    assert [deb.name for deb in plan.debs] == ["a_1_amd64.deb", "c_1_amd64.deb"]


def test_prune_plan_without_a_current_image_keeps_no_package() -> None:
    plan = plan_prune(CacheContents(cache_dir=Path("/c"), images=[_image("old")],
                                    debs=[Path("/c/debs/a_1_amd64.deb")]))
    assert [image.name for image in plan.images] == ["old"]
    assert [deb.name for deb in plan.debs] == ["a_1_amd64.deb"]


def test_prune_removes_what_no_one_uses_and_reports_it(
        tmp_path: Path, process_using: list[subprocess.Popen[bytes]]) -> None:
    current = _add_image(tmp_path, "cur", ["a_2_amd64.deb"], current=True)
    old = _add_image(tmp_path, "old", ["a_1_amd64.deb"])
    old_bytes = sum(file.stat().st_size for file in old.iterdir())
    running = _add_image(tmp_path, "run", ["a_0_amd64.deb"])
    (tmp_path / "build-x1").mkdir()  # left by a killed build
    (tmp_path / "build-x1/kernel").write_bytes(b"x" * 10)
    # Through a symlink to the cache (an agent's guest_cache may be one): real paths count.
    (tmp_path / "alias").symlink_to(tmp_path)
    pid = _start_user(process_using, tmp_path / "alias/images/run/kernel")
    contents = cache_contents(tmp_path)
    assert {image.name: image.used_by for image in contents.images} == {
        "cur": (), "old": (), "run": (pid,)}

    result = prune_cache(tmp_path)

    assert result.removed_images == ["old"]
    assert sorted(result.removed_debs) == ["a_0_amd64.deb", "a_1_amd64.deb"]
    assert [image.name for image in result.kept_in_use] == ["run"]
    assert result.freed_bytes == old_bytes + 2 * 100 + 10  # image, 2 .debs, build leftover
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["cur", "run"]
    assert [p.name for p in (tmp_path / "debs").iterdir()] == ["a_2_amd64.deb"]
    assert not (tmp_path / "build-x1").exists()
    assert current_image(tmp_path).kernel == current / "kernel"
    assert running.is_dir()


def test_prune_without_a_current_image_removes_nothing(tmp_path: Path) -> None:
    _add_image(tmp_path, "old", ["a_1_amd64.deb"])
    with pytest.raises(GuestImageError, match=r"no current guest image .* nothing to keep"):
        prune_cache(tmp_path)
    assert (tmp_path / "images/old/kernel").is_file()
    assert (tmp_path / "debs/a_1_amd64.deb").is_file()
    with pytest.raises(GuestImageError, match="no current guest image"):
        prune_cache(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_cache_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                        ) -> None:
    from nseh.guest.image import DEFAULT_CACHE_DIR

    monkeypatch.delenv("NSEH_GUEST_CACHE", raising=False)
    assert guest_cache_dir() == DEFAULT_CACHE_DIR
    monkeypatch.setenv("NSEH_GUEST_CACHE", os.fspath(tmp_path))
    assert guest_cache_dir() == tmp_path


@pytest.mark.lab
def test_prune_keeps_the_image_a_running_vm_boots_from() -> None:
    # A cache of its own, seeded with the downloaded packages so nothing is downloaded again.
    cache = guest_cache_dir().parent / "nsehtest-prune-cache"
    shutil.rmtree(cache, ignore_errors=True)
    lab.down()  # leftovers of a killed run
    try:
        build_image(guest_cache_dir())  # the packages, downloaded at most once
        shutil.copytree(guest_cache_dir() / "debs", cache / "debs", copy_function=os.link,
                        ignore=shutil.ignore_patterns("download-*"))
        lab.up(hosts=1, clients=0, guest_cache=cache)
        booted = current_image(cache).kernel.parent
        nseh("vm", "start", "web1", "--host", "h1", "--definition", str(EXAMPLE_VM))
        # As if a rebuild for newer packages had made another image current.
        (cache / "current").unlink()
        _add_image(cache, "newer", ["x_1_amd64.deb"], current=True)
        shown = nseh_json("image", "show", "--cache", str(cache))
        (qemu_pid,) = next(i["used_by"] for i in shown["others"] if i["name"] == booted.name)
        assert "qemu" in Path(f"/proc/{qemu_pid}/cmdline").read_bytes().decode()

        pruned = nseh_json("image", "prune", "--cache", str(cache))

        assert pruned["kept_in_use"] == [{"name": booted.name, "used_by": [qemu_pid]}]
        assert pruned["removed_images"] == []
        assert booted.is_dir()
        nseh("vm", "stop", "web1")
        pruned = nseh_json("image", "prune", "--cache", str(cache))
        assert pruned["removed_images"] == [booted.name] and not booted.exists()
        assert pruned["kept_in_use"] == []
    finally:
        lab.down()
        shutil.rmtree(cache, ignore_errors=True)
