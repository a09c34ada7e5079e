"""Coverage-guided fuzzing (atheris, libFuzzer) of the decoders that take bytes from peers.

    pip install '.[fuzz]'
    PYTHONPATH=src python fuzz/harness.py sc -max_total_time=60

Targets: `sc` (the SC frame decoder, fed in chunks), `ctnetlink` (conntrack entries through
every reader, the scope check and the request builders, each against a cold layout cache) and
`api` (agent API lines). Each may raise only its documented error; anything else, or a
differing cold result, is a crash that libFuzzer reports with the input that caused it.
Options after the target go to libFuzzer; the run starts from a corpus of valid inputs that
is written to a temporary directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from nseh.agent import ctnetlink
    from nseh.api import protocol
    from nseh.sc import wire

SESSION = bytes(range(16))


def sc_seeds() -> list[bytes]:
    messages = [wire.Hello(1, "h1", "web1", "precopy"), wire.HelloAck(True),
                wire.Policy("firewall", {"inbound": [{"proto": "tcp", "ports": [80]}]}),
                wire.Entries("firewall", 1, [b"\x02\0\0\0", b"x" * 40]),
                wire.Deletes("firewall", 1, [b"key"]), wire.RoundEnd(1, 2, 1),
                wire.RoundAck(1, 2, 1, 0, ["out of scope"]), wire.Final(2, 0, 0),
                wire.FinalAck(2, 0, 0, 0), wire.Resync("firewall", 2), wire.Commit(),
                wire.Abort("stop"), wire.Error("protocol", "bad")]
    frames = wire.FrameEncoder(SESSION).encode_many(messages)
    return [b"\x40" + frame for frame in frames] + [b"\x07" + b"".join(frames)]


def sc_one(data: bytes) -> None:
    if not data:
        return
    decoder, chunk = wire.FrameDecoder(), data[0] + 1
    try:
        for start in range(1, len(data), chunk):
            decoder.feed(data[start:start + chunk])
    except wire.WireError:
        try:
            decoder.feed(b"")
        except wire.WireError:
            return
        raise AssertionError("a failed decoder took more input") from None


def ctnetlink_seeds() -> list[bytes]:
    return [ctnetlink.make_entry("10.0.0.1", "10.0.0.10", "tcp", 1000, 80, zone=3),
            ctnetlink.make_entry("fd00::1", "fd00::10", "udp", 53, 53, status=0x1BE),
            ctnetlink.make_entry("10.0.0.1", "10.0.0.10", "icmp", icmp_id=7)]


SCOPE_ADDRESSES = [ipaddress.ip_address("10.0.0.10")]
READERS: list[Callable[[bytes], object]] = [
    ctnetlink.entry_key, ctnetlink.entry_summary, lambda e: ctnetlink.rewrite_mark(e, 3),
    lambda e: ctnetlink.AddressScope(SCOPE_ADDRESSES).reason_to_reject(e)]
BUILDERS = [ctnetlink.to_create_message, ctnetlink.to_update_message,
            ctnetlink.to_delete_message]


def _outcome(read: Callable[[bytes], object], entry: bytes) -> object:
    try:
        return read(entry)
    except ctnetlink.ConntrackFormatError:
        return ctnetlink.ConntrackFormatError


def ctnetlink_one(data: bytes) -> None:
    for read in READERS:
        _outcome(read, data)
    for build in BUILDERS:
        warm = _outcome(build, data)
        for purpose in (ctnetlink._CREATE, ctnetlink._UPDATE, ctnetlink._DELETE):
            purpose.recipes.layouts.clear()  # internals: the caches are per process
        if _outcome(build, data) != warm:
            raise AssertionError(f"{build.__name__}: a cached layout changed the result")


def api_seeds() -> list[bytes]:
    return [protocol.encode(protocol.Request(1, "vm.start", {"definition": {"name": "web1"}})),
            protocol.encode(protocol.Error(2, "not-found", "no VM"))]


def api_one(data: bytes) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        protocol.decode(data)


TARGETS = {"sc": (sc_seeds, sc_one), "ctnetlink": (ctnetlink_seeds, ctnetlink_one),
           "api": (api_seeds, api_one)}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    seeds, one_input = TARGETS[sys.argv[1]]
    corpus = Path(tempfile.mkdtemp(prefix=f"nseh-fuzz-{sys.argv[1]}-"))
    for number, seed in enumerate(seeds()):
        (corpus / f"seed-{number}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
