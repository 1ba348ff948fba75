"""``PushTargets`` over a real (one-node) DHT: a server pushes only to addresses and keys the
DHT lists for the next block, and a listing past its ``ttl`` is refreshed in the background
instead of inside the push (issue #18)."""

from __future__ import annotations

import asyncio

import pytest

from swarm import Identity, SwarmDHT
from swarm.records import block_key
from swarm.serving.push_targets import PushTargets
from tests.harness import make_bound_server

pytestmark = pytest.mark.timeout(120)

ADDRESS = "tcp://127.0.0.1:5"


def test_a_listed_target_is_allowed_at_once_after_its_ttl_and_dropped_once_the_refresh_sees_it_gone():
    async def scenario():
        identity = Identity.generate()
        with SwarmDHT(identity) as dht:
            await dht.announce_server(make_bound_server(identity, 0, 2, addresses=(ADDRESS,)), timeout=30)
            now = [0.0]
            targets = PushTargets(dht, ttl=10.0, min_refresh=0.0, clock=lambda: now[0])
            key = identity.curve_public_key
            assert await targets.allows(ADDRESS, key, 1)  # looked up
            assert not await targets.allows("tcp://127.0.0.1:6", key, 1)  # not listed there
            assert not await targets.allows(ADDRESS, b"x" * 40, 1)  # another key
            await dht.withdraw([block_key(dht.swarm_name, block) for block in (0, 1)], timeout=30)
            now[0] = 11.0  # past the ttl: allowed from the listing, refreshed in the background
            assert await targets.allows(ADDRESS, key, 1)
            deadline = asyncio.get_running_loop().time() + 30
            while await targets.allows(ADDRESS, key, 1):  # the refresh lands (bounded poll)
                assert asyncio.get_running_loop().time() < deadline, "the background refresh never landed"
                await asyncio.sleep(0.05)
            await targets.close()

    asyncio.run(scenario())
