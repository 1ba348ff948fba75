"""`swarm join` servers as real processes on 127.0.0.1 and the Python client:
greedy output equals local and `transformers` generation through 2 and 3 servers,
pushes between servers happen, a SIGKILLed server is replaced mid-generation with
identical output, an uncovered span fails with a clear error, SIGTERM drains."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import generate, load_local_model
from swarm import NoRouteError
from swarm.serving import RemoteModel
from swarm.serving.protocol import ServerStats, StatsRequest
from tests.harness import NEW_TOKENS, PROMPT, three_server_swarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with three_server_swarm(tmp_path_factory.mktemp("serving")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def expected(swarm):
    local = generate(load_local_model(swarm.checkpoint), PROMPT, NEW_TOKENS)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(swarm.checkpoint, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = reference.generate(
            PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
        )
    torch.testing.assert_close(local, theirs, rtol=0, atol=0)
    return local


async def _stats(model: RemoteModel, peer_id: str) -> ServerStats:
    servers = await model.list_servers()
    connection = await model.connection_to(servers[peer_id])
    return await connection.call(StatsRequest(), timeout=10)


def test_three_servers_equal_local_and_transformers_and_push(swarm, expected):
    async def scenario():
        async with await swarm.connect(send_copies=False) as model:
            async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
                assert [swarm.name_of(peer) for peer, _ in session.route] == ["a", "b", "c"]
                output = await model.generate(PROMPT, NEW_TOKENS, session=session)
            # The client never sent b or c an input: every step reached them by push.
            stats_b = await _stats(model, swarm.peer_ids["b"])
            stats_c = await _stats(model, swarm.peer_ids["c"])
            text = await model.generate("hello", 4)
            return output, stats_b, stats_c, text

    output, stats_b, stats_c, text = asyncio.run(scenario())
    assert torch.equal(output, expected)
    assert stats_b.pushes_used >= NEW_TOKENS and stats_c.pushes_used >= NEW_TOKENS
    assert stats_b.client_copies_used == 0
    assert isinstance(text, str)


def test_sigkilled_server_is_replaced_with_identical_output(swarm, expected):
    swarm.join("d", "2:3")
    swarm.wait_online("d")

    async def scenario():
        # A client that sees d too, so a replacement exists.
        model = await swarm.connect(listing=("d",))
        async with model, model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
            pieces, killed = [PROMPT], None
            async for token in model.stream(PROMPT, NEW_TOKENS, session=session):
                pieces.append(token)
                if len(pieces) == 5:
                    killed = swarm.name_of(session.route[1][0])
                    swarm.servers[killed].kill()
            return torch.cat(pieces, dim=1), killed, session.failovers

    output, killed, failovers = asyncio.run(scenario())
    assert killed in ("b", "d") and failovers == 1
    assert torch.equal(output, expected)
    # Only one server of blocks 2:3 is left: kill it too and generation must fail, naming them.
    survivor = "d" if killed == "b" else "b"
    swarm.servers[survivor].kill()

    async def uncovered():
        async with await swarm.connect() as model:
            with pytest.raises(NoRouteError, match="2"):
                await model.generate(PROMPT, 2)

    asyncio.run(uncovered())


def test_two_servers_equal_local_and_sigterm_drains(swarm, expected):
    swarm.join("e", "2:4")
    swarm.wait_online("e")

    async def scenario():
        async with await swarm.connect(listing=("e",)) as model:
            async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
                route = [swarm.name_of(peer) for peer, _ in session.route]
                output = await model.generate(PROMPT, NEW_TOKENS, session=session)
            return route, output

    route, output = asyncio.run(scenario())
    assert route == ["a", "e"]
    assert torch.equal(output, expected)
    assert swarm.servers["e"].terminate(timeout=60) == 0
