"""The client's live view of the servers (issue #18, time to first token), with `swarm join`
processes on 127.0.0.1 and a real DHT: sessions open from the view without a DHT lookup
each, the view is refreshed in the background (a new server shows up without anyone
asking), a ban refreshes it at once, a server that died while still in the view costs a
failover and not a wrong token, and closing the model stops the refresher."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import load_blocks
from kernels.tiny import write_tiny_checkpoint
from swarm.serving.remote_training import SpanClient
from tests.harness import ServingSwarm, wait_until

HIDDEN = 64
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("route-view")
    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=HIDDEN)
    with ServingSwarm(tmp_path, checkpoint) as swarm:
        swarm.join("a", "0:2")
        swarm.join("b", "2:4")
        swarm.wait_online("a", "b")
        yield swarm


def _local(swarm, hidden: torch.Tensor) -> torch.Tensor:
    blocks = load_blocks(swarm.checkpoint, 0, 4, torch.float32, "cpu").eval()
    with torch.inference_mode():
        return blocks(hidden)


def _refreshers() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "server-pool-refresher"]


def test_sessions_open_from_the_view_and_a_ban_refreshes_it(swarm):
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, HIDDEN)

    async def scenario():
        # A long period: every lookup below is one the test caused, not the timer.
        async with await swarm.connect(listing=("a", "b"), route_refresh=600.0) as model:
            await wait_until(  # the refresher's first lookup, started at connect
                lambda: not model.servers.refreshing, timeout=30, what="the first refresh to end"
            )
            before = model.servers.refreshes
            outputs = []
            for _ in range(5):
                async with model.inference_session(3) as session:
                    outputs.append(await session.step(hidden))
            after_sessions = model.servers.refreshes
            model.servers.ban(swarm.peer_ids["a"])  # the refresher wakes and looks up now
            await wait_until(
                lambda: model.servers.refreshes, until=lambda n: n > after_sessions, timeout=30,
                what="a refresh after the ban",
            )  # fmt: skip
            refreshed = model.servers.refreshes
            await model.servers.view()  # fresh again: no lookup of its own
            assert len(_refreshers()) == 1
            return before, after_sessions, refreshed, model.servers.refreshes, outputs

    before, after_sessions, refreshed, after_view, outputs = asyncio.run(scenario())
    assert after_sessions == before  # five sessions, no DHT lookup
    assert after_view == refreshed
    for output in outputs:
        torch.testing.assert_close(output, _local(swarm, hidden))


def test_fine_tuning_routes_come_from_the_view(swarm):
    """Fine-tuning forwards (``SpanClient.route``, once per forward) read the live view too."""

    async def scenario():
        async with await swarm.connect(listing=("a", "b"), route_refresh=600.0) as model:
            await wait_until(
                lambda: not model.servers.refreshing, timeout=30, what="the first refresh to end"
            )
            before = model.servers.refreshes
            client = SpanClient(model.servers, model.config)
            routes = [await client.route(0, 4) for _ in range(5)]
            return before, model.servers.refreshes, routes

    before, after, routes = asyncio.run(scenario())
    assert after == before  # five routes, no DHT lookup
    for route in routes:
        assert [(server.peer_id, (span.start, span.end)) for server, span in route] == [
            (swarm.peer_ids["a"], (0, 2)), (swarm.peer_ids["b"], (2, 4)),
        ]  # fmt: skip


def test_the_view_follows_the_swarm_and_a_dead_server_in_it_costs_a_failover(swarm):
    torch.manual_seed(1)
    hidden = torch.randn(1, 4, HIDDEN)

    async def scenario():
        async with await swarm.connect(listing=("a", "b"), route_refresh=0.5) as model:
            swarm.join("c", "0:4")  # one hop over every block: the cheapest route once listed
            swarm.wait_online("c")
            await wait_until(  # nobody asks: the background refresh finds c
                lambda: model.servers.known, until=lambda known: swarm.peer_ids["c"] in known,
                timeout=60, what="the live view to list c",
            )  # fmt: skip
            async with model.inference_session(4) as session:
                await session.step(hidden)
                first_route = [swarm.name_of(peer) for peer, _ in session.route]
        # A client whose view holds c, then c dies with its record still live.
        async with await swarm.connect(listing=("a", "b", "c"), route_refresh=600.0) as model:
            await wait_until(
                lambda: model.servers.known, until=lambda known: swarm.peer_ids["c"] in known,
                timeout=30, what="the view to list c",
            )  # fmt: skip
            swarm.servers["c"].kill()
            async with model.inference_session(4) as session:
                output = await session.step(hidden)
                route = [swarm.name_of(peer) for peer, _ in session.route]
                failovers = session.failovers
            banned = model.servers.banned()
        return first_route, route, failovers, banned, output

    first_route, route, failovers, banned, output = asyncio.run(scenario())
    assert first_route == ["c"]
    # Refused at connect (the opening's retry) or at the first step (a failover): either way once.
    assert route == ["a", "b"] and failovers <= 1
    assert swarm.peer_ids["c"] in banned
    torch.testing.assert_close(output, _local(swarm, hidden))


def test_closing_the_model_stops_the_refresher(swarm):
    async def scenario():
        model = await swarm.connect(listing=("a", "b"), route_refresh=0.2)
        running = len(_refreshers())
        await model.close()
        return running, len(_refreshers())

    assert asyncio.run(scenario()) == (1, 0)
