"""A `--blocks auto` server moves into blocks nobody serves once others cover its own
(periodic rebalancing, short period), and the swarm serves the whole model again."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import generate, load_local_model
from kernels.tiny import write_tiny_checkpoint
from swarm.spans import Span
from tests.harness import NEW_TOKENS, PROMPT, ServingSwarm, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_auto_server_moves_into_an_uncovered_gap(tmp_path):
    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=64)
    with ServingSwarm(tmp_path, checkpoint) as swarm:
        # Alone, m takes the first half (--max-blocks 2); the second half is a gap.
        swarm.join("m", "auto", "--max-blocks", "2", "--rebalance-period", "1")
        (line,) = swarm.wait_online("m")
        first = line.split("serving blocks ", 1)[1].split()[0]
        assert first in ("0:2", "2:4"), f"m took {first}"
        gap = Span(2, 4) if first == "0:2" else Span(0, 2)
        # f covers m's blocks: m is no longer alone there and moves into the gap.
        swarm.join("f", first)
        swarm.wait_online("f")
        swarm.servers["m"].wait_for_line(f"moved to blocks {gap.start}:{gap.end}", timeout=120)

        def moved(servers) -> bool:
            record = servers.get(swarm.peer_ids["m"])
            return record is not None and record.span == gap and record.state.value == "online"

        async def scenario():
            async with await swarm.connect() as model:
                await wait_until(
                    model.list_servers, until=moved, timeout=30, what="m's new record to be listed"
                )
                return await model.generate(PROMPT, NEW_TOKENS)

        output = asyncio.run(scenario())
        assert torch.equal(output, generate(load_local_model(checkpoint), PROMPT, NEW_TOKENS))
