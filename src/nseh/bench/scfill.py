"""Top a VM's conntrack entries up to an SC size: run inside a host's network namespace.

    python -m nseh.bench.scfill --mark 1 --size 10000 --clear 10000 --ipv4 10.0.0.10 \
        --ipv6 fd00::10

It deletes the synthetic entries an earlier top-up may have left (the first `--clear` of
them: they may have moved here with the VM), counts the VM's entries by ct mark (its live
connections), adds synthetic established TCP connections to the VM's port 80 until the VM has
`--size` entries, and prints {"live", "added", "removed", "total"} as JSON.
"""

from __future__ import annotations

import argparse
import json
from ipaddress import IPv4Address, IPv6Address, ip_address

from nseh.agent.conntrack import Conntrack
from nseh.agent.ctnetlink import make_entry

# Synthetic peers come from the benchmarking ranges (RFC 2544, RFC 5180), which no lab
# node uses, so they never collide with a live connection.
PEER4 = IPv4Address("198.18.0.1")
PEER6 = IPv6Address("2001:2::1")
PORTS = 60_000  # client ports per peer address
# Long enough that no synthetic entry expires during a benchmark.
TIMEOUT = 3600


def synthetic_entries(count: int, ipv4: str | None, ipv6: str | None) -> list[bytes]:
    """`count` distinct established TCP connections peer → VM:80; the same `count` gives the
    same entries, and a smaller count a prefix of them. Alternates families if both given."""
    addresses = [a for a in (ipv4, ipv6) if a]
    if not addresses:
        raise ValueError("synthetic entries need an IPv4 or IPv6 address of the VM")
    entries = []
    for index in range(count):
        vm = addresses[index % len(addresses)]
        slot = index // len(addresses)
        base = PEER4 if ip_address(vm).version == 4 else PEER6
        peer = str(base + (slot // PORTS) * 256)
        entries.append(make_entry(peer, vm, "tcp", 1024 + slot % PORTS, 80, timeout=TIMEOUT))
    return entries


def top_up(mark: int, size: int, clear: int, ipv4: str | None,
           ipv6: str | None) -> dict[str, int]:
    entries = synthetic_entries(max(size, clear), ipv4, ipv6)
    with Conntrack() as table:
        removed = table.delete(entries[:clear]) if clear else 0
        live = table.count(mark)
        added = max(0, size - live)
        if added:
            result = table.insert(entries[:added], mark=mark)
            if result.failures or result.created != added:
                raise SystemExit(f"adding {added} synthetic entries: created {result.created}, "
                                 f"{len(result.failures)} failed, first {result.failures[:1]}")
        total = table.count(mark)
    return {"live": live, "added": added, "removed": removed, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mark", type=int, required=True, help="the VM's ct mark here")
    parser.add_argument("--size", type=int, required=True, help="entries the VM should have")
    parser.add_argument("--clear", type=int, default=0,
                        help="synthetic entries of earlier top-ups to delete first")
    parser.add_argument("--ipv4")
    parser.add_argument("--ipv6")
    args = parser.parse_args()
    print(json.dumps(top_up(args.mark, args.size, args.clear, args.ipv4, args.ipv6)))


if __name__ == "__main__":
    main()
