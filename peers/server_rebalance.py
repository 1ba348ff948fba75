"""Periodic rebalancing of a ``--blocks auto`` server (Petals' rule, our ``swarm.plan_move``).

Every ``--rebalance-period`` seconds on average (each wait drawn from 0.5-1.5x, so
servers do not move in lockstep) the server reads the swarm's coverage and asks
``plan_move`` whether another span would raise the weakest blocks' coverage enough.
``plan_move`` never leaves a block that this server alone covers, so a move opens no gap.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from swarm import Announcer, RebalancePolicy, coverage_from_records, draw_check_delay, plan_move
from transport.errors import SwarmError

if TYPE_CHECKING:
    from peers.server import InferenceServer

logger = logging.getLogger("swarm.join")

LIST_TIMEOUT = 30.0  # seconds for the DHT lookup of one check


async def rebalance_periodically(
    server: InferenceServer, announcer: Announcer, stop: asyncio.Event, rng: random.Random | None = None
) -> None:
    """Checks, and moves ``server`` when worth it, until ``stop`` is set.

    A failed check or move is logged and the next check goes on (the server keeps its span).
    """
    rng = rng or random.Random()
    policy = RebalancePolicy(mean_check_period=server.config.rebalance_period)
    n_blocks = server.model_config.num_layers
    max_blocks = await asyncio.to_thread(server.span_limit)
    while True:
        try:
            await asyncio.wait_for(stop.wait(), draw_check_delay(policy, rng))
            return
        except TimeoutError:
            pass
        try:
            servers = await server.dht.list_servers(n_blocks, timeout=LIST_TIMEOUT)
            # Ourselves as we are now, not as the last announcement says.
            coverage = coverage_from_records(servers.values(), n_blocks, exclude=(server.dht.peer_id,))
            coverage[server.span.start : server.span.end] += server.throughput
            target = plan_move(coverage, server.span, server.throughput, max_blocks, policy)
            if target is not None and not stop.is_set():
                await server.move_to(target, announcer)
        except (SwarmError, OSError, RuntimeError) as error:
            logger.warning("rebalance check of %s failed: %s", server.span, error)
