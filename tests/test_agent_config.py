"""The agent configuration file: its `[limits]` table, and one-line errors for bad files."""

from pathlib import Path

import pytest

from nseh.agent.config import AgentConfig, AgentConfigError, Limits

BASE = """host = "h1"
state_dir = "/var/lib/nseh"
api_socket = "/run/nseh/agent.sock"
management_address = "10.99.0.1"
"""


def load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return AgentConfig.load(path)


def test_without_a_limits_table_the_defaults_apply(tmp_path):
    limits = load(tmp_path, BASE).limits
    assert limits == Limits()
    assert (limits.sc_frame_bytes, limits.sc_entries_per_frame, limits.sc_entries_per_vm,
            limits.api_request_bytes, limits.policy_rules) == (
        4 * 1024 * 1024, 65_536, 1_000_000, 16 * 1024 * 1024, 1000)


def test_the_limits_table_sets_each_limit_and_survives_a_save(tmp_path):
    config = load(tmp_path, BASE + "[limits]\nsc_frame_bytes = 1048576\n"
                  "sc_entries_per_frame = 1000\nsc_entries_per_vm = 5000000\n"
                  "api_request_bytes = 65536\npolicy_rules = 50\n")
    assert config.limits == Limits(sc_frame_bytes=1_048_576, sc_entries_per_frame=1000,
                                   sc_entries_per_vm=5_000_000, api_request_bytes=65_536,
                                   policy_rules=50)
    config.save(tmp_path / "saved.toml")
    assert AgentConfig.load(tmp_path / "saved.toml") == config


@pytest.mark.parametrize(("limits", "expected"), [
    ("sc_frame_bytes = 100", "limits.sc_frame_bytes: Input should be greater than or equal to"),
    ("sc_entries_per_vm = 0", "limits.sc_entries_per_vm: Input should be greater than or equal"),
    ("api_request_bytes = 17000000", "limits.api_request_bytes: Input should be less than or"),
    ("sc_frames = 1", "limits.sc_frames: Extra inputs are not permitted"),
])
def test_a_bad_limit_is_refused_with_its_name(tmp_path, limits, expected):
    with pytest.raises(AgentConfigError, match=expected) as info:
        load(tmp_path, BASE + f"[limits]\n{limits}\n")
    assert "\n" not in str(info.value)


# Found by tests/test_fuzz.py: bytes that are not UTF-8 raised UnicodeDecodeError, deep
# nesting RecursionError, and a quoted key's line break split the message.
@pytest.mark.parametrize(("text", "expected"), [
    (b"host = \"\xff\"", "not valid TOML: 'utf-8' codec can't decode"),
    (b"a = " + b"{b = " * 2000, "not valid TOML: nested too deeply"),
    (BASE.encode() + b'"line\\nbreak" = 1', "line\\nbreak: Extra inputs are not permitted"),
])
def test_bad_files_give_one_line_errors(tmp_path, text, expected):
    path = tmp_path / "agent.toml"
    path.write_bytes(text)
    with pytest.raises(AgentConfigError) as info:
        AgentConfig.load(path)
    assert expected in str(info.value) and len(str(info.value).splitlines()) == 1
