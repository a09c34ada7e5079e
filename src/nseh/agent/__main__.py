"""Run a host agent: `python -m nseh.agent --config /etc/nseh/agent.toml`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from nseh.agent.config import AgentConfig, AgentConfigError


def main() -> None:
    parser = argparse.ArgumentParser(prog="nseh-agent", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="agent TOML file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = AgentConfig.load(args.config)
    except AgentConfigError as exc:
        sys.exit(f"nseh-agent: {exc}")
    from nseh.agent.host import HostAgent  # after logging is set up

    asyncio.run(HostAgent(config).run())


if __name__ == "__main__":
    main()
