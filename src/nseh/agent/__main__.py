"""Run a host agent: `python -m nseh.agent --config /etc/nseh/agent.toml`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from nseh.agent.config import AgentConfig, AgentConfigError
from nseh.agent.conntrack import ConntrackError
from nseh.agent.firewall import FirewallError
from nseh.agent.nflog import NflogError
from nseh.agent.qemu import QemuConfigError
from nseh.prerequisites import AGENT_PROGRAMS, MissingPrerequisite, require
from nseh.sc.pki import PkiError


class AgentStartError(RuntimeError):
    """The agent cannot start; the message is one line."""


def run_agent(config_path: Path, log_level: str = "INFO") -> None:
    """Serve as the host agent until SIGTERM or SIGINT."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise AgentStartError(f"unknown log level {log_level!r} (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = AgentConfig.load(config_path)
        # Checked before anything starts, so that a host lacking them says what to install.
        require(AGENT_PROGRAMS)
    except (AgentConfigError, MissingPrerequisite) as exc:
        raise AgentStartError(str(exc)) from None
    if os.geteuid() != 0:
        raise AgentStartError("the agent needs root (nftables, conntrack, taps, QEMU)")
    from nseh.agent.host import HostAgent  # after logging is set up

    try:
        asyncio.run(HostAgent(config).run())
    # What fails at start-up: its state directory, the accelerator asked for, the base
    # firewall table, conntrack events, the IPS's NFLOG socket, TLS credentials, binding.
    except (OSError, QemuConfigError, FirewallError, ConntrackError, NflogError,
            PkiError) as exc:
        raise AgentStartError(f"the agent of {config.host} cannot start: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(prog="nseh-agent", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="agent TOML file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    try:
        run_agent(args.config, args.log_level)
    except AgentStartError as exc:
        sys.exit(f"nseh-agent: {exc}")


if __name__ == "__main__":
    main()
