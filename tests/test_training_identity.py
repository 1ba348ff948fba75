"""Messages that name a peer are checked against the authenticated sender (real ZeroMQ, CURVE on).

A join request must come from the CURVE key the named peer's run record announces, so a
non-member cannot take a live member's place in a round; a verdict on a part is taken
only from that part's backup.
"""

import asyncio

import pytest
import torch

from swarm.training.allreduce import AllReduceTimeouts, Member
from swarm.training.averaging import AveragingService
from swarm.training.averaging_wire import Verdict
from swarm.training.matchmaking import JoinGroup, Matchmaker
from transport import Endpoint, NotAuthorized

pytestmark = pytest.mark.timeout(60)


def test_a_join_request_in_a_live_members_name_is_refused_and_the_member_keeps_its_place():
    async def scenario():
        leader_endpoint, member_endpoint, impostor = Endpoint(), Endpoint(), Endpoint()
        leader_address = await leader_endpoint.bind("tcp://127.0.0.1:0")
        member_address = await member_endpoint.bind("tcp://127.0.0.1:0")
        impostor_address = await impostor.bind("tcp://127.0.0.1:0")
        # What every member reads from the signed run records in the DHT.
        records = {
            "a-leader": (leader_address, leader_endpoint.public_key),
            "b-member": (member_address, member_endpoint.public_key),
        }

        async def live_members():
            return dict(records)

        leader = Matchmaker(leader_endpoint, live_members, window=3.0, call_timeout=2.0)
        member = Matchmaker(member_endpoint, live_members, window=3.0, call_timeout=2.0)

        def join(peer_id, address, key):
            return JoinGroup(0, peer_id, address, key, 1.0, "hash")

        try:
            leading = asyncio.create_task(
                leader.form_group(0, join("a-leader", leader_address, leader_endpoint.public_key))
            )
            connection = await impostor.connect(leader_address, leader_endpoint.public_key)
            refusals = []
            for forged in (
                join("b-member", impostor_address, impostor.public_key),  # the member's name, own key
                join("b-member", member_address, member_endpoint.public_key),  # the member's key, not held
                join("c-stranger", impostor_address, impostor.public_key),  # no record at all
            ):
                with pytest.raises(NotAuthorized) as refused:
                    await connection.call(forged, timeout=5)
                refusals.append(str(refused.value))
            await connection.close()
            following = await member.form_group(
                0, join("b-member", member_address, member_endpoint.public_key)
            )
            led = await leading
        finally:
            for endpoint in (leader_endpoint, member_endpoint, impostor):
                await endpoint.close()
        return refusals, led, following

    refusals, led, following = asyncio.run(scenario())
    assert "does not match its connection" in refusals[1]
    assert all("record does not announce" in r for r in (refusals[0], refusals[2]))
    for group in (led, following):
        assert [m.peer_id for m in group.members] == ["a-leader", "b-member"]
    assert led.members[1].public_key == following.members[1].public_key  # the real member's key


def test_a_verdict_from_a_member_that_is_not_the_parts_backup_is_refused():
    async def scenario():
        endpoints, services, members = [], [], []
        for i in range(3):
            endpoint = Endpoint()
            address = await endpoint.bind("tcp://127.0.0.1:0")
            endpoints.append(endpoint)
            services.append(AveragingService(endpoint, "int8", registration_wait=5))
            members.append(Member(f"peer{i}", 1.0, address, endpoint.public_key))
        try:
            victim = asyncio.create_task(
                services[2].all_reduce(
                    "round-v", members, 2, torch.ones(192), 1.0, AllReduceTimeouts(2, 2, 2, 2)
                )
            )
            # Member 0 is a member of the round, but the backup of part 0 is member 1.
            connection = await endpoints[0].connect(members[2].address, members[2].public_key)
            with pytest.raises(NotAuthorized, match="not member 1"):
                await connection.call(Verdict("round-v", 0, "0" * 64), timeout=5)
            await connection.close()
            victim.cancel()
            await asyncio.gather(victim, return_exceptions=True)
        finally:
            for service in services:
                await service.close()
            for endpoint in endpoints:
                await endpoint.close()

    asyncio.run(scenario())
