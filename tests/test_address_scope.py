"""The destination's fast scope check agrees with the slow, full decode."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nseh.agent.ctnetlink import (
    AddressScope,
    ConntrackFormatError,
    entry_addresses,
    entry_zone,
    make_entry,
)

VM = [ipaddress.ip_address("10.0.0.10"), ipaddress.ip_address("fd00::10")]
v4 = st.sampled_from(["10.0.0.10", "10.0.0.11", "192.0.2.1"])
v6 = st.sampled_from(["fd00::10", "fd00::11", "2001:db8::1"])
ports = st.integers(1, 65535)


@st.composite
def entries(draw):
    family = draw(st.sampled_from([v4, v6]))
    return make_entry(draw(family), draw(family), draw(st.sampled_from(["tcp", "udp"])),
                      draw(ports), draw(ports), zone=draw(st.sampled_from([0, 0, 0, 7])),
                      mark=draw(st.integers(0, 5)))


def slow_verdict(entry: bytes) -> bool:
    return entry_zone(entry) == 0 and not set(VM).isdisjoint(entry_addresses(entry))


@given(st.lists(entries(), min_size=1, max_size=30))
def test_fast_check_agrees_with_full_decode(batch):
    scope = AddressScope(VM)  # one scope for the batch: later entries hit the layout cache
    for entry in batch:
        assert (scope.reason_to_reject(entry) is None) == slow_verdict(entry)


@given(st.binary(max_size=120))
def test_garbage_raises_only_format_errors(data):
    try:
        verdict = AddressScope(VM).reason_to_reject(data)
    except ConntrackFormatError:
        return
    assert verdict is None or isinstance(verdict, str)


def test_an_appended_second_tuple_cannot_smuggle_other_addresses():
    inside = make_entry("10.0.0.99", "10.0.0.10", "tcp", 1, 7)
    outside = make_entry("10.0.0.99", "10.0.0.98", "tcp", 1, 7)
    # The kernel would take the last CTA_TUPLE_ORIG; the check refuses duplicates.
    smuggled = inside + outside[4:]
    with pytest.raises(ConntrackFormatError, match="duplicate"):
        AddressScope(VM).reason_to_reject(smuggled)


def natted(client: str, floating: str, vm: str, *, inbound: bool) -> bytes:
    """A 1:1-NATed TCP entry as the kernel dumps it: `inbound`, client -> floating:7 with
    replies from vm:7 (DNAT); else vm -> client:7 with replies to floating (SNAT)."""
    if inbound:
        entry, translated = make_entry(client, floating, "tcp", 40000, 7), \
            make_entry(vm, client, "tcp", 7, 40000)
    else:
        entry, translated = make_entry(vm, client, "tcp", 40000, 7), \
            make_entry(client, floating, "tcp", 7, 40000)
    # The reply tuple is the second attribute (after the original tuple): take it from the
    # translated connection's original tuple, which has the same layout.
    start = 4 + int.from_bytes(entry[4:6], "little")
    size = int.from_bytes(entry[start:start + 2], "little")
    assert entry[start + 4:start + size] != translated[4 + 4:4 + size]
    return entry[:start + 4] + translated[4 + 4:4 + size] + entry[start + size:]


@pytest.mark.parametrize(("client", "floating", "vm"), [
    ("198.51.100.7", "203.0.113.10", "10.0.0.10"),
    ("2001:db8:1::7", "2001:db8:203::10", "fd00::10"),
])
def test_natted_entries_of_the_vm_are_in_scope_by_its_own_address(client, floating, vm):
    scope = AddressScope(VM)
    for inbound in (True, False):
        entry = natted(client, floating, vm, inbound=inbound)
        assert {str(a) for a in entry_addresses(entry)} == {client, floating, vm}
        assert scope.reason_to_reject(entry) is None
    # The floating address alone does not make a connection the VM's (the host's own).
    reason = scope.reason_to_reject(make_entry(client, floating, "tcp", 40000, 7))
    assert reason is not None and "none of the allowed addresses" in reason
