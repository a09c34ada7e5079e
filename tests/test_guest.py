"""The guest image, the guest command channel and the QEMU command line.

The lab tests boot one real VM (TCG here) on a bridge in namespace nsehtest-g1 and talk to
it from a client in namespace nsehtest-g2 over a veth pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from nseh.agent.qemu import (
    MACHINE_TYPE,
    QemuConfigError,
    VMRunFiles,
    detect_accel,
    qemu_command,
)
from nseh.agent.vms import VM, VMState
from nseh.definition import VMDefinition
from nseh.guest.console import GuestConsole, GuestConsoleError
from nseh.guest.image import (
    GuestImage,
    build_image,
    current_image,
    guest_cache_dir,
    kernel_cmdline,
)

HOST_NS = "nsehtest-g1"  # the hypervisor side: bridge + tap
CLIENT_NS = "nsehtest-g2"  # a client in the VM's subnet
BRIDGE, TAP = "nsehtest-gbr", "nsehtest-gtap"
VETH_HOST, VETH_CLIENT = "nsehtest-gv1", "nsehtest-gv2"
CLIENT4, CLIENT6 = "10.77.0.20", "fd77::20"
BIG_FILE_SIZE = 1 << 20

DEFINITION = VMDefinition.from_json({
    "name": "gtest1",
    "network": {"ipv4": "10.77.0.10/24", "gateway4": "10.77.0.1",
                "ipv6": "fd77::10/64", "gateway6": "fd77::1"},
})
VM4, VM6 = (str(address) for address in DEFINITION.addresses)
FAKE_IMAGE = GuestImage(kernel=Path("/cache/k"), initrd=Path("/cache/i"))


# ---------------------------------------------------------------- pure unit tests


def test_kernel_cmdline_carries_the_network_config() -> None:
    words = kernel_cmdline(DEFINITION).split()
    assert words[0] == "console=ttyS0"
    assert {"nseh.name=gtest1", "nseh.ip4=10.77.0.10/24", "nseh.gw4=10.77.0.1",
            "nseh.ip6=fd77::10/64", "nseh.gw6=fd77::1"} <= set(words)


def test_kernel_cmdline_leaves_out_what_is_not_configured() -> None:
    v6_only = VMDefinition.from_json({"name": "v6", "network": {"ipv6": "fd00::5/64"}})
    params = [word for word in kernel_cmdline(v6_only).split() if word.startswith("nseh.")]
    assert params == ["nseh.name=v6", "nseh.ip6=fd00::5/64"]


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_qemu_command_contents() -> None:
    run_dir = Path("/run/nseh/vms/gtest1")
    argv = qemu_command(image=FAKE_IMAGE, definition=DEFINITION, tap="vm-gtest1",
                        run_dir=run_dir, accel="tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert "-daemonize" in argv
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert _values(argv, "-pidfile") == [str(run_dir / "qemu.pid")]
    assert _values(argv, "-D") == [str(run_dir / "qemu.log")]
    assert _values(argv, "-display") == ["none"]
    assert _values(argv, "-machine") == [MACHINE_TYPE]
    assert _values(argv, "-accel") == ["tcg"]
    assert _values(argv, "-m") == ["128"] and _values(argv, "-smp") == ["1"]
    assert _values(argv, "-kernel") == ["/cache/k"] and _values(argv, "-initrd") == ["/cache/i"]
    assert _values(argv, "-append") == [kernel_cmdline(DEFINITION)]
    assert "gtest1" in _values(argv, "-name")[0]
    chardevs = _values(argv, "-chardev")
    assert f"socket,id=qmp,path={run_dir}/qmp.sock,server=on,wait=off" in chardevs
    assert f"file,id=console,path={run_dir}/console.log" in chardevs
    assert f"socket,id=guest,path={run_dir}/guest.sock,server=on,wait=off" in chardevs
    assert _values(argv, "-mon") == ["chardev=qmp,mode=control"]
    # ttyS0 is the console, ttyS1 the command channel: order matters.
    assert _values(argv, "-serial") == ["chardev:console", "chardev:guest"]
    assert _values(argv, "-netdev") == ["tap,id=net0,ifname=vm-gtest1,script=no,downscript=no"]
    (device,) = _values(argv, "-device")
    assert device.startswith("virtio-net-pci,netdev=net0,") and f"mac={DEFINITION.mac}" in device
    assert "-incoming" not in argv


def test_qemu_command_for_a_migration_destination() -> None:
    source = qemu_command(image=FAKE_IMAGE, definition=DEFINITION, tap="vm-a",
                          run_dir=Path("/run/a"), accel="tcg")
    destination = qemu_command(image=FAKE_IMAGE, definition=DEFINITION, tap="vm-b",
                               run_dir=Path("/run/b"), accel="tcg",
                               incoming="tcp:10.99.0.2:49152")
    assert _values(destination, "-incoming") == ["tcp:10.99.0.2:49152"]
    # Same machine and devices on both ends; only paths, tap and -incoming differ.
    for flag in ("-machine", "-cpu", "-m", "-smp", "-append", "-serial", "-mon"):
        assert _values(source, flag) == _values(destination, flag), flag
    assert _values(source, "-device") == _values(destination, "-device")


def test_qemu_command_escapes_commas_and_rejects_long_socket_paths() -> None:
    argv = qemu_command(image=FAKE_IMAGE, definition=DEFINITION, tap="t",
                        run_dir=Path("/run/a,b"), accel="kvm")
    assert "file,id=console,path=/run/a,,b/console.log" in _values(argv, "-chardev")
    with pytest.raises(QemuConfigError, match="too long"):
        qemu_command(image=FAKE_IMAGE, definition=DEFINITION, tap="t",
                     run_dir=Path("/run/" + "x" * 100), accel="tcg")
    with pytest.raises(QemuConfigError, match="kvm or tcg"):
        qemu_command(image=FAKE_IMAGE, definition=DEFINITION, tap="t",
                     run_dir=Path("/run/a"), accel="auto")


def test_run_files() -> None:
    files = VMRunFiles(Path("/run/x"))
    assert (files.qmp, files.console, files.guest_socket, files.pidfile, files.log) == (
        Path("/run/x/qmp.sock"), Path("/run/x/console.log"), Path("/run/x/guest.sock"),
        Path("/run/x/qemu.pid"), Path("/run/x/qemu.log"))


def test_detect_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nseh.agent.qemu.kvm_usable", lambda: False)
    assert detect_accel() == "tcg"
    with pytest.raises(QemuConfigError, match="KVM is not usable"):
        detect_accel("kvm")
    monkeypatch.setattr("nseh.agent.qemu.kvm_usable", lambda: True)
    assert detect_accel("auto") == "kvm"
    assert detect_accel("tcg") == "tcg"
    with pytest.raises(QemuConfigError, match="unknown accelerator"):
        detect_accel("xen")


def test_console_without_a_vm_fails_fast(tmp_path: Path) -> None:
    console = GuestConsole(tmp_path / "missing.sock")
    started = time.monotonic()
    with pytest.raises(GuestConsoleError, match="unavailable"):
        asyncio.run(console.exec("true"))
    with pytest.raises(GuestConsoleError, match=r"not ready after 0\.5 s"):
        asyncio.run(console.wait_ready(0.5))
    assert time.monotonic() - started < 3


# ---------------------------------------------------------------- image build (lab)


@pytest.fixture(scope="module")
def image() -> GuestImage:
    cache = guest_cache_dir()
    first = build_image(cache)
    again = build_image(cache)
    assert again.image == first.image and not again.built
    assert current_image(cache) == first.image  # what agents boot
    print(f"\nguest image: first call {first.seconds:.1f} s (built: {first.built}), "
          f"second call {again.seconds:.1f} s")
    return first.image


@pytest.mark.lab
def test_image_files(image: GuestImage) -> None:
    assert image.kernel.read_bytes()[:4] == b"\x7fELF"  # unpacked for a direct PVH boot
    assert image.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    listing = subprocess.run(f"gzip -dc {image.initrd} | cpio -t --quiet", shell=True,
                             capture_output=True, text=True, check=True).stdout.split()
    assert {"init", "bin/busybox", "usr/bin/socat", "lib64/ld-linux-x86-64.so.2",
            "lib/x86_64-linux-gnu/libc.so.6", "lib/nseh-modules/virtio_net.ko"} <= set(listing)


@pytest.mark.lab
def test_concurrent_builds_build_once(image: GuestImage, caplog: pytest.LogCaptureFixture
                                      ) -> None:
    # A fresh cache, seeded with the downloaded packages so no download is repeated.
    cache = guest_cache_dir().parent / "nsehtest-g-cache"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        shutil.copytree(guest_cache_dir() / "debs", cache / "debs", copy_function=os.link,
                        ignore=shutil.ignore_patterns("download-*"))
        results: list[GuestImage] = []
        caplog.set_level(logging.INFO, logger="nseh.guest.image")
        threads = [threading.Thread(target=lambda: results.append(build_image(cache).image))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert len(results) == 2 and results[0] == results[1]
        assert results[0].initrd.read_bytes() == image.initrd.read_bytes()  # reproducible
        builds = [r for r in caplog.records if r.getMessage().startswith("building")]
        assert len(builds) == 1
        assert not list(cache.glob("build-*"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------- one booted VM (lab)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _remove_namespaces() -> None:
    """Kill whatever runs in our namespaces (QEMU of a killed run too), then delete them."""
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              check=True).stdout.split()
    for namespace in (HOST_NS, CLIENT_NS):
        if namespace not in existing:
            continue
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                              text=True, check=False).stdout.split()
        for pid in map(int, pids):
            _kill(pid)
        subprocess.run(["ip", "netns", "delete", namespace], check=False)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _setup_network() -> None:
    _ip("netns", "add", HOST_NS)
    _ip("netns", "add", CLIENT_NS)
    _ip("-n", HOST_NS, "link", "add", BRIDGE, "type", "bridge")
    _ip("-n", HOST_NS, "tuntap", "add", TAP, "mode", "tap")
    _ip("-n", HOST_NS, "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_CLIENT,
        "netns", CLIENT_NS)
    for link in (TAP, VETH_HOST):
        _ip("-n", HOST_NS, "link", "set", link, "master", BRIDGE)
    for link in (BRIDGE, TAP, VETH_HOST, "lo"):
        _ip("-n", HOST_NS, "link", "set", link, "up")
    _ip("-n", CLIENT_NS, "addr", "add", f"{CLIENT4}/24", "dev", VETH_CLIENT)
    _ip("-n", CLIENT_NS, "addr", "add", f"{CLIENT6}/64", "dev", VETH_CLIENT, "nodad")
    for link in (VETH_CLIENT, "lo"):
        _ip("-n", CLIENT_NS, "link", "set", link, "up")


@dataclass(frozen=True)
class BootedVM:
    files: VMRunFiles
    pid: int


@pytest.fixture(scope="module")
def vm(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedVM]:
    _remove_namespaces()  # leftovers of a killed run
    files = VMRunFiles(tmp_path_factory.mktemp("nsehtest-g-vm"))
    try:
        _setup_network()
        started = time.monotonic()
        _start_qemu(image, DEFINITION, TAP, files)
        asyncio.run(GuestConsole(files.guest_socket).wait_ready(120))
        print(f"\nboot to a ready guest console: {time.monotonic() - started:.1f} s "
              f"({detect_accel()})")
        yield BootedVM(files=files, pid=int(files.pidfile.read_text()))
    finally:
        _stop_qemu(files)
        _remove_namespaces()


def _start_qemu(image: GuestImage, definition: VMDefinition, tap: str, files: VMRunFiles,
                incoming: str | None = None) -> None:
    argv = qemu_command(image=image, definition=definition, tap=tap, run_dir=files.run_dir,
                        accel=detect_accel(), incoming=incoming)
    result = subprocess.run(["ip", "netns", "exec", HOST_NS, *argv], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, f"QEMU did not start: {result.stderr.strip()}"


def _stop_qemu(files: VMRunFiles) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        _kill(int(files.pidfile.read_text()))


def guest(vm: BootedVM, command: str, timeout: float = 30) -> tuple[int, str]:
    result = asyncio.run(GuestConsole(vm.files.guest_socket).exec(command, timeout))
    return result.exit_code, result.output


_CLIENT = """
import socket, sys, urllib.request
kind, host = sys.argv[1], sys.argv[2]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
if kind == "tcp":
    with socket.create_connection((host, 7), timeout=5) as s:
        s.sendall(b"hello tcp\\n")
        data = b""
        while len(data) < 10:
            data += s.recv(100)
    print(data.decode().strip())
elif kind == "udp":
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(3):  # UDP may drop a datagram; a few tries
            s.sendto(b"hello udp", (host, 7))
            try:
                print(s.recv(100).decode())
                break
            except TimeoutError:
                pass
elif kind == "http":
    url = f"http://[{host}]/" if ":" in host else f"http://{host}/"
    index = urllib.request.urlopen(url, timeout=10).read()
    big = urllib.request.urlopen(url + "big", timeout=60).read()
    print(index.decode().strip(), len(big))
"""


def client(kind: str, host: str) -> str:
    result = subprocess.run(["ip", "netns", "exec", CLIENT_NS, sys.executable, "-c", _CLIENT,
                             kind, host], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]
    return result.stdout.strip()


@pytest.mark.lab
def test_guest_has_its_addresses(vm: BootedVM) -> None:
    status, output = guest(vm, "hostname; ip addr show eth0")
    assert status == 0
    assert output.startswith("gtest1\n")
    assert "inet 10.77.0.10/24" in output and "inet6 fd77::10/64" in output
    assert DEFINITION.mac in output


@pytest.mark.lab
@pytest.mark.parametrize("address", [VM4, VM6])
def test_client_reaches_the_guest_services(vm: BootedVM, address: str) -> None:
    ping = subprocess.run(["ip", "netns", "exec", CLIENT_NS, "ping", "-c", "1", "-W", "3",
                           address], capture_output=True, text=True, check=False)
    assert ping.returncode == 0, ping.stdout
    assert client("tcp", address) == "hello tcp"
    assert client("udp", address) == "hello udp"
    assert client("http", address) == f"nseh guest gtest1 {BIG_FILE_SIZE}"


@pytest.mark.lab
def test_exec_reports_exit_status_and_output(vm: BootedVM) -> None:
    assert guest(vm, "echo out; echo err >&2; exit 3") == (3, "out\nerr\n")
    assert guest(vm, "false")[0] == 1
    assert guest(vm, "") == (0, "")
    # Quotes, newlines and non-ASCII survive the trip.
    assert guest(vm, "printf '%s\\n' \"it's\" 'a \"b\"'\necho ü") == (0, "it's\na \"b\"\nü\n")


_TICK_LISTENER = """
import socket, sys, time
server = socket.create_server(("::", 7007), family=socket.AF_INET6, dualstack_ipv6=True)
server.settimeout(20)
print("listening", flush=True)
connection, _ = server.accept()
connection.settimeout(0.2)
data, end = b"", time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        data += connection.recv(4096)
    except TimeoutError:
        pass
print(data.count(b"tick"), flush=True)
"""


@pytest.mark.lab
def test_exec_leaves_background_processes_running(vm: BootedVM) -> None:
    listener = subprocess.Popen(["ip", "netns", "exec", CLIENT_NS, sys.executable, "-c",
                                 _TICK_LISTENER, "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "listening\n"
        started = time.monotonic()
        status, _ = guest(vm, f"(while :; do echo tick; sleep 0.2; done) | "
                              f"nc {CLIENT4} 7007 >/dev/null 2>&1 &")
        assert status == 0 and time.monotonic() - started < 5
        time.sleep(1)
        assert guest(vm, "pidof nc")[0] == 0  # still running after the exec returned
        ticks, _ = listener.communicate(timeout=30)
        assert int(ticks) >= 5
    finally:
        listener.kill()
        listener.wait()
    guest(vm, "killall nc")


@pytest.mark.lab
def test_exec_timeout_kills_the_command_and_the_channel_recovers(vm: BootedVM) -> None:
    with pytest.raises(GuestConsoleError, match="timed out after 2 s"):
        guest(vm, "sleep 300 & sleep 200", timeout=2)
    started = time.monotonic()
    status, output = guest(vm, "echo alive; ps | grep -c '[s]leep [23]00'")
    assert time.monotonic() - started < 5
    assert (status, output) == (1, "alive\n0\n")  # grep -c found nothing: all killed


@pytest.mark.lab
def test_exec_survives_garbage_and_reconnects(vm: BootedVM) -> None:
    # Noise, a request cut short and a bogus request: none may run or confuse the host.
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(vm.files.guest_socket))
        raw.sendall(b"garbage \x00\xff\r\nNSEH 0123456789abcdef 5 dG91Y2ggL3RtcC9i"
                    b"\nNSEH x 5 dG91Y2ggL3RtcC9i END\nNSEH-END 0 0\n")
    for _ in range(3):  # a new connection each time
        assert guest(vm, "echo ok; ls /tmp/b 2>&1 | grep -c 'No such'") == (0, "ok\n1\n")


@pytest.mark.lab
def test_concurrent_callers_take_turns(vm: BootedVM) -> None:
    console = GuestConsole(vm.files.guest_socket)

    async def run_all() -> list[str]:
        results = await asyncio.gather(*(console.exec(f"sleep 0.1; echo {n}") for n in range(6)))
        return [result.output for result in results]

    assert asyncio.run(run_all()) == [f"{n}\n" for n in range(6)]
    assert asyncio.run(run_all()) == [f"{n}\n" for n in range(6)]  # again, in a new loop



MIGRATING = VMDefinition.from_json({
    "name": "gtest2", "network": {"ipv4": "10.77.0.11/24", "ipv6": "fd77::11/64"}})


async def _migrate(qmp_socket: Path, uri: str) -> None:
    qmp = QMPClient("nsehtest-g")
    await qmp.connect(str(qmp_socket))
    try:
        await qmp.execute("migrate", {"uri": uri})
        for _ in range(1200):
            status = await qmp.execute("query-migrate")
            assert isinstance(status, dict)
            if status.get("status") == "completed":
                return
            assert status.get("status") not in ("failed", "cancelled"), status
            await asyncio.sleep(0.1)
        raise AssertionError("migration did not complete in 120 s")
    finally:
        await qmp.disconnect()


@pytest.mark.lab
def test_a_daemonized_qemu_logs_why_an_incoming_migration_failed(
        vm: BootedVM, image: GuestImage, tmp_path: Path) -> None:
    tap = "nsehtest-gtap4"
    record = VM(definition=MIGRATING, mark=1, state=VMState.INCOMING, record_dir=tmp_path,
                accel="tcg")
    files = record.files
    files.run_dir.mkdir()
    stream = tmp_path / "migration.sock"
    try:
        _ip("-n", HOST_NS, "tuntap", "add", tap, "mode", "tap")
        _start_qemu(image, MIGRATING, tap, files, incoming=f"unix:{stream}")
        pid = int(files.pidfile.read_text())
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(str(stream))
            peer.sendall(b"not a migration stream" * 100)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "QEMU did not give up on the bad stream"
            time.sleep(0.05)
        assert "load of migration failed" in record.qemu_said()
    finally:
        _stop_qemu(files)
        subprocess.run(["ip", "-n", HOST_NS, "link", "delete", tap], capture_output=True,
                       check=False)


@pytest.mark.lab
def test_console_keeps_working_after_live_migration(vm: BootedVM, image: GuestImage,
                                                    tmp_path: Path) -> None:
    taps = ("nsehtest-gtap2", "nsehtest-gtap3")
    source, destination = VMRunFiles(tmp_path / "src"), VMRunFiles(tmp_path / "dst")
    try:
        for tap in taps:
            _ip("-n", HOST_NS, "tuntap", "add", tap, "mode", "tap")
            _ip("-n", HOST_NS, "link", "set", tap, "master", BRIDGE, "up")
        for files in (source, destination):
            files.run_dir.mkdir()
        _start_qemu(image, MIGRATING, taps[0], source)
        asyncio.run(GuestConsole(source.guest_socket).wait_ready(120))
        guest_state = "echo kept > /tmp/state; sleep 600 >/dev/null 2>&1 &"
        assert asyncio.run(GuestConsole(source.guest_socket).exec(guest_state)).exit_code == 0

        incoming = f"unix:{tmp_path / 'migration.sock'}"
        _start_qemu(image, MIGRATING, taps[1], destination, incoming=incoming)
        asyncio.run(_migrate(source.qmp, incoming))

        after = asyncio.run(GuestConsole(destination.guest_socket).exec(
            "cat /tmp/state; hostname; pidof sleep >/dev/null && echo running"))
        assert (after.exit_code, after.output) == (0, "kept\ngtest2\nrunning\n")
        assert client("tcp", "10.77.0.11") == "hello tcp"
    finally:
        for files in (source, destination):
            _stop_qemu(files)
        for tap in taps:
            subprocess.run(["ip", "-n", HOST_NS, "link", "delete", tap], capture_output=True,
                           check=False)
