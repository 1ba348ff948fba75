"""`swarm join` servers as real processes on 127.0.0.1 and the Python client:
greedy output equals local and `transformers` generation through 2 and 3 servers,
pushes between servers happen, a SIGKILLed server is replaced mid-generation with
identical output, an uncovered span fails with a clear error, SIGTERM drains."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from kernels import generate, load_local_model
from kernels.tiny import write_tiny_checkpoint
from peers.processes import ProcessGroup
from swarm import NoRouteError
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
from swarm.serving import ClientConfig, RemoteModel
from swarm.serving.protocol import ServerStats, StatsRequest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NEW_TOKENS = 12
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300]])
CLIENT = ClientConfig(route_wait=3.0, route_poll=0.5, step_timeout=8.0, open_timeout=5.0)


class Swarm:
    """A bootstrap DHT node plus `swarm join` children, by name."""

    def __init__(self, tmp_path, checkpoint):
        self.tmp_path = tmp_path
        self.checkpoint = checkpoint
        self.bootstrap = SwarmDHT(
            Identity.generate(), DHTConfig(swarm_name="swarm", host_maddrs=("/ip4/127.0.0.1/tcp/0",))
        )
        self.bootstrap.start()
        self.peers = [str(m) for m in self.bootstrap.visible_maddrs()]
        self.group = ProcessGroup(tmp_path)
        self.servers = {}  # name -> (process, peer id)

    def start(self, name: str, blocks: str, *extra: str) -> None:
        process = self.group.start(name, [
            "join", "--model", str(self.checkpoint), "--blocks", blocks, "--initial-peers", *self.peers,
            "--throughput-cache", str(self.tmp_path / "throughput.json"), "--announce-period", "2",
            "--record-ttl", "30", "--push-wait", "5", "--torch-threads", "1", *extra,
        ])  # fmt: skip
        self.servers[name] = process

    def wait_online(self, *names: str) -> None:
        for name in names:
            line = self.servers[name].wait_for_line("ONLINE", timeout=120)
            self.servers[name] = self.servers[name]
            self.servers[name].peer_id = line.strip().rsplit(" ", 1)[1]

    def name_of(self, peer_id: str) -> str:
        return next(
            name for name, process in self.servers.items() if getattr(process, "peer_id", None) == peer_id
        )

    def close(self) -> None:
        self.group.close()
        self.bootstrap.shutdown()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("serving")
    checkpoint = tmp_path / "model"
    write_tiny_checkpoint(checkpoint, num_layers=4, hidden_size=64)
    swarm = Swarm(tmp_path, checkpoint)
    for name, blocks in (("a", "0:2"), ("b", "2:3"), ("c", "3:4")):
        swarm.start(name, blocks)
    try:
        swarm.wait_online("a", "b", "c")
        yield swarm
    finally:
        swarm.close()


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


async def _connect(swarm, config: ClientConfig = CLIENT) -> RemoteModel:
    return await RemoteModel.connect(swarm.checkpoint, swarm.peers, config=config)


async def _stats(model: RemoteModel, peer_id: str) -> ServerStats:
    servers = await model.list_servers()
    connection = await model.connection_to(servers[peer_id])
    return await connection.call(StatsRequest(), timeout=10)


def test_three_servers_equal_local_and_transformers_and_push(swarm, expected):
    async def scenario():
        async with await _connect(swarm, dataclasses.replace(CLIENT, send_copies=False)) as model:
            async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
                assert [swarm.name_of(peer) for peer, _ in session.route] == ["a", "b", "c"]
                output = await model.generate(PROMPT, NEW_TOKENS, session=session)
            # The client never sent b or c an input: every step reached them by push.
            stats_b = await _stats(model, swarm.servers["b"].peer_id)
            stats_c = await _stats(model, swarm.servers["c"].peer_id)
            text = await model.generate("hello", 4)
            return output, stats_b, stats_c, text

    output, stats_b, stats_c, text = asyncio.run(scenario())
    assert torch.equal(output, expected)
    assert stats_b.pushes_used >= NEW_TOKENS and stats_c.pushes_used >= NEW_TOKENS
    assert stats_b.client_copies_used == 0
    assert isinstance(text, str)


def test_sigkilled_server_is_replaced_with_identical_output(swarm, expected):
    swarm.start("d", "2:3")
    swarm.wait_online("d")

    async def scenario():
        async with await _connect(swarm) as model:
            # Wait until the client sees d too, so a replacement exists.
            for _ in range(60):
                if swarm.servers["d"].peer_id in await model.list_servers():
                    break
                await asyncio.sleep(0.5)  # polling the DHT under a bound
            async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
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
        async with await _connect(swarm) as model:
            with pytest.raises(NoRouteError, match="2"):
                await model.generate(PROMPT, 2)

    asyncio.run(uncovered())


def test_two_servers_equal_local_and_sigterm_drains(swarm, expected):
    swarm.start("e", "2:4")
    swarm.wait_online("e")

    async def scenario():
        async with await _connect(swarm) as model:
            for _ in range(60):
                if swarm.servers["e"].peer_id in await model.list_servers():
                    break
                await asyncio.sleep(0.5)  # polling the DHT under a bound
            async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
                route = [swarm.name_of(peer) for peer, _ in session.route]
                output = await model.generate(PROMPT, NEW_TOKENS, session=session)
            return route, output

    route, output = asyncio.run(scenario())
    assert route == ["a", "e"]
    assert torch.equal(output, expected)
    assert swarm.servers["e"].terminate(timeout=60) == 0
