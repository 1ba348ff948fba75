"""``swarm status``: the health page's summary in the terminal (or as JSON with ``--json``).

Exit code: 0 healthy, 1 degraded, 2 broken, 3 the DHT could not be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from peers.health_server import add_view_arguments, open_dht, view_config_from_args
from swarm.health import RunProgressTracker, build_health_state
from swarm.health_display import clip_text
from transport.errors import SwarmError

_EXIT_CODES = {"healthy": 0, "degraded": 1, "broken": 2}


def _number(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _safe(value: Any) -> str:
    """Terminal-safe text: clipped, control characters (escape sequences) replaced."""
    return clip_text(value)


def format_summary(state: dict[str, Any]) -> str:
    """Renders the ``/api/state`` document as plain text for the terminal.

    Args:
        state: the snapshot (see ``swarm.health``).

    Returns:
        Several lines, no trailing newline.
    """
    lines = [f"swarm {_safe(state['swarm'])}: {state['verdict'].upper()}"]
    model = state["model"]
    if model is None:
        lines.append("model: none announced")
    else:
        lines.append(
            f"model {_safe(model['model_id'])} ({model['n_blocks']} blocks): {model['verdict']}, {_safe(model['reason'])}"
        )
        bar = "".join(
            "." if not block["covered"] else (str(block["servers"]) if block["servers"] < 10 else "+")
            for block in model["blocks"]
        )
        lines.append(f"  servers per block: [{bar}]  ('.' = uncovered)")
    lines.append(f"servers ({len(state['servers'])}):")
    lines.append(
        f"  {'peer':<10} {'state':<9} {'version':<12} {'span':<9} {'tok/s':>9} {'cache':>9} {'load':>5} {'uptime':>8}  device"
    )
    for server in state["servers"]:
        span = f"{server['span'][0]}:{server['span'][1]}"
        uptime = "-" if server["uptime"] is None else f"{server['uptime']:.0f}s"
        stale = "*" if server["stale_version"] else ""
        lines.append(
            f"  {_safe(server['short_id']):<10} {server['state']:<9} {_safe(server['version'])[:11] + stale:<12} {span:<9} "
            f"{_number(server['throughput']):>9} {server['free_cache_tokens']:>9} {server['load']:>5} {uptime:>8}  "
            f"{_safe(server['device'])} {_safe(server['dtype'])}"
        )
    for run in state["runs"]:
        flag = " STALLED" if run["stalled"] else ""
        lines.append(
            f"run {_safe(run['name'])}: round {run['round']}, {run['members']} members, "
            f"{_number(run['tokens_per_second'])} tokens/s, {run['bytes_per_round']:,} bytes/round, "
            f"loss {_number(run['loss'], 4)}{flag}"
        )
    if state["alerts"]:
        lines.append("alerts:")
        lines.extend(f"  [{alert['severity']}] {_safe(alert['message'])}" for alert in state["alerts"])
    return "\n".join(lines)


async def read_state(args: argparse.Namespace) -> dict[str, Any]:
    """Starts an ephemeral DHT node, reads the swarm once, and builds the snapshot.

    Raises:
        SwarmError: the DHT node did not start or the read missed its deadline.
    """
    from swarm.health_reader import read_swarm_view

    view_config = view_config_from_args(args)
    async with open_dht(view_config) as dht:
        view = await read_swarm_view(
            dht, view_config.swarm, runs=view_config.runs, timeout=view_config.request_timeout
        )
    return build_health_state(
        view, now=time.time(), tracker=RunProgressTracker(), thresholds=view_config.thresholds
    )


def _handle(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        state = asyncio.run(read_state(args))
    except ValueError as error:
        print(f"swarm status: {error}", file=sys.stderr)
        return 3
    except SwarmError as error:
        print(f"swarm status: cannot read the swarm: {error}", file=sys.stderr)
        return 3
    print(json.dumps(state, indent=2) if args.json else format_summary(state))
    return _EXIT_CODES.get(state["verdict"], 2)


def register(subparsers: Any) -> None:
    """Adds ``swarm status`` to the command line."""
    parser = subparsers.add_parser("status", help="print the swarm's health summary")
    add_view_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the /api/state document instead")
    parser.set_defaults(handler=_handle)
