"""A `--blocks auto` server moves into blocks nobody serves once others cover its own
(periodic rebalancing, short period), and the swarm serves the whole model again."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import generate, load_local_model
from kernels.tiny import write_tiny_checkpoint
from swarm.spans import Span
from tests.test_serving_swarm import CLIENT, NEW_TOKENS, PROMPT, Swarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_auto_server_moves_into_an_uncovered_gap(tmp_path):
    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=64)
    swarm = Swarm(tmp_path, checkpoint)
    try:
        # Alone, m takes the first half (--max-blocks 2); the second half is a gap.
        swarm.start("m", "auto", "--max-blocks", "2", "--rebalance-period", "1")
        line = swarm.servers["m"].wait_for_line("ONLINE", timeout=120)
        first = line.split("serving blocks ", 1)[1].split()[0]
        assert first in ("0:2", "2:4"), f"m took {first}"
        gap = Span(2, 4) if first == "0:2" else Span(0, 2)
        # f covers m's blocks: m is no longer alone there and moves into the gap.
        swarm.start("f", first)
        swarm.wait_online("f")
        swarm.servers["m"].wait_for_line(f"moved to blocks {gap.start}:{gap.end}", timeout=120)

        async def scenario():
            from swarm.serving import RemoteModel

            async with await RemoteModel.connect(checkpoint, swarm.peers, config=CLIENT) as model:
                for _ in range(60):  # until m's new record is listed (bounded polling)
                    servers = await model.list_servers()
                    record = servers.get(swarm.servers["m"].peer_id)
                    if record is not None and record.span == gap and record.state.value == "online":
                        break
                    await asyncio.sleep(0.5)
                return await model.generate(PROMPT, NEW_TOKENS)

        swarm.servers["m"].peer_id = line.strip().rsplit(" ", 1)[1]
        output = asyncio.run(scenario())
        assert torch.equal(output, generate(load_local_model(checkpoint), PROMPT, NEW_TOKENS))
    finally:
        swarm.close()
