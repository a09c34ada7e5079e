"""Loading VM definitions: good ones parse, bad ones give one-line errors naming the field."""

from pathlib import Path

import pytest

from nseh.definition import DefinitionError, VMDefinition, load_definition

GOOD = """
name = "web1"
memory_mib = 256
[network]
ipv4 = "10.0.0.10/24"
ipv6 = "fd00::10/64"
floating_ipv4 = "203.0.113.10"
floating_ipv6 = "2001:db8:203::10"
[[policy.inbound]]
proto = "tcp"
ports = [7, 80]
peers = ["10.0.0.0/24", "fd00::/64"]
[[policy.outbound]]
proto = "icmp"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vm.toml"
    path.write_text(text)
    return path


def test_a_good_definition_loads(tmp_path):
    vm = load_definition(write(tmp_path, GOOD))
    assert vm.name == "web1" and vm.memory_mib == 256
    assert [str(a) for a in vm.addresses] == ["10.0.0.10", "fd00::10"]
    assert vm.policy.inbound[0].ports == (7, 80)
    assert str(vm.network.floating_ipv4) == "203.0.113.10"
    assert [(str(floating), str(interface)) for floating, interface in vm.network.floating] == [
        ("203.0.113.10", "10.0.0.10/24"), ("2001:db8:203::10", "fd00::10/64")]
    assert vm.mac.startswith("52:54:00:") and vm.mac == load_definition(
        write(tmp_path, GOOD)).mac


def test_the_name_can_be_given_outside_the_file(tmp_path):
    assert load_definition(write(tmp_path, GOOD), name="web2").name == "web2"


@pytest.mark.parametrize(("text", "expected"), [
    ("name = ", "not valid TOML"),
    ('name = "Web 1"\n[network]\nipv4 = "10.0.0.1/24"', "name:"),
    ('name = "a"\n[network]\n', "network: a VM needs an ipv4 or an ipv6 address"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.300/24"', "network.ipv4"),
    ('name = "a"\nmemory_mib = 1\n[network]\nipv4 = "10.0.0.1/24"', "memory_mib"),
    ('name = "a"\ncolour = 1\n[network]\nipv4 = "10.0.0.1/24"', "colour"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.1/24"\n[[policy.inbound]]\nproto = "icmp"\n'
     'ports = [1]', "ports are only valid with proto tcp or udp"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.1/24"\n[[policy.inbound]]\nproto = "tcp"\n'
     'ports = [70000]', "policy.inbound.0.ports.0"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.1/24"\nmac = "01:00:00:00:00:01"',
     "multicast"),
    ('name = "a"\n[network]\nipv6 = "fd00::1/64"\nfloating_ipv4 = "203.0.113.9"',
     "floating_ipv4 needs an ipv4 address"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.1/24"\nfloating_ipv4 = "10.0.0.9"',
     "inside the VM's own network 10.0.0.0/24"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.1/24"\nfloating_ipv4 = "fd00::9"',
     "network.floating_ipv4"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.1/24"\nfloating_ipv6 = "2001:db8:203::9"',
     "floating_ipv6 needs an ipv6 address"),
    ('name = "a"\n[network]\nipv6 = "fd00::1/64"\nfloating_ipv6 = "fd00::9"',
     "inside the VM's own network fd00::/64"),
    ('name = "a"\n[network]\nipv6 = "fd00::1/64"\nfloating_ipv6 = "203.0.113.9"',
     "network.floating_ipv6"),
    ('name = "a"\n[network]\nipv6 = "fd00::1/64"\nfloating_ipv6 = "fe80::9"',
     "floating_ipv6 fe80::9 is not a unicast address a host can own"),
    ('name = "a"\n[network]\nipv6 = "fd00::1/64"\nfloating_ipv6 = "ff02::1"',
     "floating_ipv6 ff02::1 is not a unicast address"),
    ('name = "a"\n[network]\nipv4 = "10.0.0.1/24"\nfloating_ipv4 = "224.0.0.1"',
     "floating_ipv4 224.0.0.1 is not a unicast address"),
    # Found by tests/test_fuzz.py: a RecursionError, a ValueError, and a line break that the
    # message quoted from a key.
    ("a = " + "[" * 3000, "not valid TOML: nested too deeply"),
    ("memory_mib = " + "9" * 5000, "not valid TOML: Exceeds the limit"),
    ('name = "a"\n"col\\nour" = 1\n[network]\nipv4 = "10.0.0.1/24"',
     "col\\nour: Extra inputs are not permitted"),
])
def test_bad_definitions_give_one_line_errors(tmp_path, text, expected):
    with pytest.raises(DefinitionError) as info:
        load_definition(write(tmp_path, text))
    message = str(info.value)
    assert expected in message and "\n" not in message and str(tmp_path) in message


def test_bytes_that_are_not_utf8_are_a_definition_error(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_bytes(b"name = \"\xff\"")
    with pytest.raises(DefinitionError, match="not valid TOML: 'utf-8' codec"):
        load_definition(path)


def test_a_policy_over_the_agents_rule_limit_is_refused():
    document = {"name": "a", "network": {"ipv4": "10.0.0.1/24"},
                "policy": {"inbound": [{"proto": "tcp"}] * 2, "outbound": [{"proto": "udp"}]}}
    assert len(VMDefinition.from_json(document).policy.inbound) == 2  # no limit: any size
    assert VMDefinition.from_json(document, max_policy_rules=3).policy.outbound
    with pytest.raises(DefinitionError,
                       match=r"^definition: policy: 3 rules exceed limits\.policy_rules = 2$"):
        VMDefinition.from_json(document, max_policy_rules=2)


def test_a_missing_file_is_a_definition_error(tmp_path):
    with pytest.raises(DefinitionError, match="cannot read"):
        load_definition(tmp_path / "absent.toml")
