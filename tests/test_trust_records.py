"""Records and connections a stranger cannot abuse (issue #14), with `swarm join` processes
on 127.0.0.1 and a real hivemind DHT.

- A server record signed by peer A that carries server B's address and CURVE key is in
  the DHT (validly signed by A) but no client uses it: its key is not A's, so the client
  skips it, routes through the honest servers, and generates what a local model does.
  (Before: the client chose A's record, reached B, asked it for blocks it does not hold,
  and failed with a non-retryable error.)
- A client that asks a real server to push a step's output to an arbitrary listener, to
  a swarm server's address under another key, or to a server that does not hold the
  next block, gets its step answered, and nothing reaches the listener; a push to the real next server still arrives, and the server
  keeps serving generations.
"""

from __future__ import annotations

import asyncio
import secrets
import socket

import pytest
import torch

from kernels import generate, load_local_model
from swarm import ServerRecord, ServerState, Span
from swarm.dht import DHTConfig, SwarmDHT
from swarm.identity import Identity
from swarm.records import block_key, key_binding_error
from swarm.serving.protocol import InferenceStep, OpenInference, PushAck, PushHidden, StatsRequest
from tests.harness import NEW_TOKENS, PROMPT, three_server_swarm, wait_until
from transport import Endpoint, KeyPair

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HIDDEN = 64  # three_server_swarm's tiny model


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with three_server_swarm(tmp_path_factory.mktemp("trust")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def expected(swarm):
    return generate(load_local_model(swarm.checkpoint), PROMPT, NEW_TOKENS)


def _forged(attacker: Identity, victim: ServerRecord, identity_key: bytes) -> ServerRecord:
    """A's record claiming every block, fast and idle, at the victim's address and key."""
    return ServerRecord(
        peer_id=attacker.peer_id,
        state=ServerState.ONLINE,
        span=Span(0, 4),
        throughput=1e9,
        inference_rate=1e9,
        free_cache_tokens=1_000_000,
        load=0,
        addresses=victim.addresses,
        curve_public_key=victim.curve_public_key,
        version=victim.version,
        started_at=victim.started_at,
        identity_key=identity_key,
    )


def test_a_record_carrying_another_servers_address_and_key_is_not_used(swarm, expected):
    attacker = Identity.generate()
    config = DHTConfig(
        swarm_name="swarm", initial_peers=tuple(swarm.peers), host_maddrs=("/ip4/127.0.0.1/tcp/0",)
    )

    async def scenario():
        async with SwarmDHT(attacker, config) as dht, await swarm.connect(listing=("a", "b", "c")) as model:
            b = (await model.list_servers())[swarm.peer_ids["b"]]
            results = []
            # A names its own identity key, then B's: either way the CURVE key is not A's.
            for identity_key in (attacker.public_key, b.identity_key):
                forged = _forged(attacker, b, identity_key)
                await dht.announce_server(forged)

                async def raw_listing(forged=forged):
                    return await model.dht.list(block_key("swarm", 0))

                def carries_forgery(listing, forged=forged) -> bool:
                    item = listing.get(attacker.peer_id)
                    return item is not None and item.value == forged.to_wire()

                # The forged record is in the DHT, validly signed by A, as clients read it ...
                await wait_until(raw_listing, until=carries_forgery, timeout=30, what="the forged record")
                # ... and no client uses it.
                listed = await model.list_servers()
                async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
                    route = [peer for peer, _ in session.route]
                    output = await model.generate(PROMPT, NEW_TOKENS, session=session)
                results.append((key_binding_error(forged), listed, route, output))
            return results

    for unbound, listed, route, output in asyncio.run(scenario()):
        assert unbound is not None
        assert attacker.peer_id not in listed and set(swarm.peer_ids.values()) <= set(listed)
        assert [swarm.name_of(peer) for peer in route] == ["a", "b", "c"]
        assert torch.equal(output, expected)


class _Listener:
    """What a client might name as a push target: a ZeroMQ endpoint that counts pushes, and a raw TCP port."""

    def __init__(self) -> None:
        self.pushes = 0
        self.endpoint = Endpoint()
        self.endpoint.add_handler(PushHidden, self._received)
        self.raw = socket.socket()
        self.raw.bind(("127.0.0.1", 0))
        self.raw.listen(16)
        self.raw.setblocking(False)
        self.raw_address = f"tcp://127.0.0.1:{self.raw.getsockname()[1]}"

    async def _received(self, request: PushHidden, context) -> PushAck:
        self.pushes += 1
        return PushAck(accepted=True)

    def raw_connections(self) -> int:
        count = 0
        while True:
            try:
                connection, _ = self.raw.accept()
            except BlockingIOError:
                return count
            connection.close()
            count += 1


def test_a_server_pushes_only_to_servers_of_the_next_block(swarm, expected):
    listener = _Listener()

    async def scenario():
        async with listener.endpoint, await swarm.connect(listing=("a", "b", "c")) as model:
            listener_address = await listener.endpoint.bind("tcp://127.0.0.1:0")
            servers = await model.list_servers()
            a, b, c = (servers[swarm.peer_ids[name]] for name in ("a", "b", "c"))
            to_a, to_b = await model.connection_to(a), await model.connection_to(b)
            token_b = secrets.token_bytes(16)
            on_b = await to_b.open_stream(OpenInference(token_b, 2, 3, 1, 16), timeout=10)
            on_a = await to_a.open_stream(OpenInference(secrets.token_bytes(16), 0, 2, 1, 16), timeout=10)
            hostile_targets = [
                (listener_address, listener.endpoint.public_key),  # a listener of the client's choice
                (listener.raw_address, KeyPair.generate().public),  # any TCP port
                (b.addresses[0], listener.endpoint.public_key),  # a swarm server's address, another key
                (c.addresses[0], c.curve_public_key),  # a swarm server, but not of the next block (2)
            ]
            replies = []
            for step, (address, key) in enumerate(hostile_targets):
                hidden = torch.randn(1, 4, HIDDEN)
                message = InferenceStep(step=step, position=0, new_tokens=4, hidden=hidden,
                                        push_address=address, push_key=key, push_token=token_b)  # fmt: skip
                replies.append(await on_a.call(message, timeout=30))

            async def stats_a():
                return await to_a.call(StatsRequest(), timeout=10)

            refused = await wait_until(
                stats_a,
                until=lambda stats: stats.pushes_refused >= len(hostile_targets),
                what="refused pushes",
            )
            # The real next hop still gets its push.
            step = len(hostile_targets)
            message = InferenceStep(step=step, position=0, new_tokens=4, hidden=torch.randn(1, 4, HIDDEN),
                                    push_address=b.addresses[0], push_key=b.curve_public_key, push_token=token_b)  # fmt: skip
            sent = await on_a.call(message, timeout=30)
            received = await on_b.call(InferenceStep(step=step, position=0, new_tokens=4), timeout=30)
            await on_a.close()
            await on_b.close()
            output = await model.generate(PROMPT, NEW_TOKENS)  # the server keeps serving
            return replies, refused, sent, received, output

    try:
        replies, refused, sent, received, output = asyncio.run(scenario())
        assert all(reply.hidden is not None and reply.hidden.shape == (1, 4, HIDDEN) for reply in replies)
        assert refused.pushes_refused == 4
        assert (
            listener.pushes == 0 and listener.raw_connections() == 0
        )  # nothing arrived, not even a TCP connection
        assert sent.hidden is not None
        assert received.input_source == "push" and received.hidden.shape == (1, 4, HIDDEN)
        assert torch.equal(output, expected)
    finally:
        listener.raw.close()
