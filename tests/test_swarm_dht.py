"""Swarm records in a real hivemind DHT: five peers on 127.0.0.1, signatures, expiry, private swarms."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import hivemind
import msgpack
import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm import (
    Announcer,
    DHTConfig,
    Identity,
    ModelRecord,
    RecordRejected,
    ServerRecord,
    Span,
    SwarmDHT,
    SwarmRecordValidator,
    block_key,
)
from tests.harness import make_server, wait_until
from transport.errors import DeadlineExceeded

pytestmark = pytest.mark.timeout(60)

SWARM = "test"
LOCAL = ("/ip4/127.0.0.1/tcp/0",)
N_BLOCKS = 10


def config(initial_peers=(), ttl: float = 30.0, name: str = SWARM) -> DHTConfig:
    return DHTConfig(
        swarm_name=name,
        initial_peers=tuple(initial_peers),
        host_maddrs=LOCAL,
        record_ttl=ttl,
        start_timeout=30.0,
        request_timeout=10.0,
    )


def server_record(dht: SwarmDHT, start: int, end: int) -> ServerRecord:
    """``dht``'s own record of blocks ``start:end``, started now."""
    return make_server(
        dht.peer_id,
        start,
        end,
        free_cache_tokens=4096,
        load=0,
        addresses=("tcp://127.0.0.1:9",),
        curve_public_key=dht.identity.curve_public_key,
        identity_key=dht.identity.public_key,
        version="test",
        device="",
        dtype="",
        started_at=get_dht_time(),
    )


def start_peers(count: int, swarm_key: bytes | None = None, initial=()) -> list[SwarmDHT]:
    peers: list[SwarmDHT] = []
    try:
        for _ in range(count):
            bootstrap = initial or (peers[0].visible_maddrs() if peers else ())
            peer = SwarmDHT(Identity.generate(), config(bootstrap), swarm_key=swarm_key)
            peer.start()
            peers.append(peer)
    except BaseException:
        for peer in peers:
            peer.shutdown()
        raise
    return peers


@pytest.fixture(scope="module")
def swarm_peers():
    peers = start_peers(5)
    yield peers
    for peer in peers:
        peer.shutdown()


def test_server_records_are_visible_to_all(swarm_peers):
    async def scenario():
        for index, peer in enumerate(swarm_peers):
            await peer.announce_server(server_record(peer, 2 * index, 2 * index + 2))
        expected = {peer.peer_id: Span(2 * i, 2 * i + 2) for i, peer in enumerate(swarm_peers)}
        for reader in swarm_peers:

            async def sees_all(reader=reader):
                servers = await reader.list_servers(N_BLOCKS)
                return {peer: record.span for peer, record in servers.items()} == expected

            await wait_until(sees_all, what=f"{reader.peer_id} seeing all servers")
        servers = await swarm_peers[3].list_servers(N_BLOCKS)
        first = swarm_peers[0]
        assert servers[first.peer_id].curve_public_key == first.identity.curve_public_key

    asyncio.run(scenario())


def test_model_record_majority(swarm_peers):
    async def scenario():
        good = ModelRecord("tiny-llama", "abc123", N_BLOCKS)
        for peer in swarm_peers[:3]:
            await peer.announce_model(good)
        await swarm_peers[3].announce_model(ModelRecord("other", "zzz", 4))

        async def agreed():
            return await swarm_peers[4].get_model() == good

        await wait_until(agreed, what="model record majority")

    asyncio.run(scenario())


def test_records_expire_after_owner_dies(swarm_peers):
    async def scenario():
        owner = SwarmDHT(Identity.generate(), config(swarm_peers[0].visible_maddrs(), ttl=3.0))
        owner.start()
        try:
            await owner.publish(f"{SWARM}.expiry", {"alive": True})

            async def visible():
                return owner.peer_id in await swarm_peers[2].list(f"{SWARM}.expiry")

            await wait_until(visible, what="record visible")
        finally:
            owner.shutdown()

        async def gone():
            return owner.peer_id not in await swarm_peers[2].list(f"{SWARM}.expiry")

        await wait_until(gone, timeout=15.0, what="record expired")

    asyncio.run(scenario())


def test_forged_record_is_rejected(swarm_peers):
    victim, attacker, reader = swarm_peers[0], swarm_peers[1], swarm_peers[4]
    key = f"{SWARM}.forgery"

    async def scenario():
        await victim.publish(key, {"who": "victim"})
        # The attacker stores under the victim's id; hivemind signs it with the attacker's key.
        expiration = get_dht_time() + 20
        stored = attacker._node.store(key, {"who": "attacker"}, expiration, subkey=victim.peer_id)
        assert not stored

        async def only_victim():
            listing = await reader.list(key)
            return listing.get(victim.peer_id) is not None

        await wait_until(only_victim, what="victim's record")
        for peer in swarm_peers:
            listing = await peer.list(key)
            assert listing[victim.peer_id].value == {"who": "victim"}

    asyncio.run(scenario())

    # The reasons, checked on the validator directly.
    validator = attacker.validator
    now = get_dht_time()
    record = DHTRecord(b"k" * 20, msgpack.packb(victim.peer_id), msgpack.packb({"x": 1}), now + 10)
    forged = DHTRecord(record.key, record.subkey, validator.sign_value(record), record.expiration_time)
    assert "is not the signer's peer id" in validator.check(forged)
    genuine_record = DHTRecord(b"k" * 20, msgpack.packb(attacker.peer_id), msgpack.packb({"x": 1}), now + 10)
    genuine = DHTRecord(
        genuine_record.key, genuine_record.subkey, validator.sign_value(genuine_record), now + 10
    )
    assert validator.check(genuine) is None
    extended = DHTRecord(genuine.key, genuine.subkey, genuine.value, now + 20)
    assert "bad signature" in validator.check(extended)
    far = DHTRecord(genuine.key, genuine.subkey, genuine.value, now + 10_000)
    assert "exceeds the limit" in validator.check(far)


def test_malformed_records_are_skipped(swarm_peers):
    writer, reader = swarm_peers[2], swarm_peers[3]

    async def scenario():
        # Signed but nonsense values, under a block key next to a valid record.
        await writer.publish(block_key("garbage", 0), {"state": "online", "span": "nope"})
        await swarm_peers[1].publish(block_key("garbage", 0), [1, 2, 3])
        good = SwarmDHT(writer.identity, config(name="garbage"))
        good._dht = writer._dht  # same node, other namespace
        await good.announce_server(server_record(writer, 0, 1))
        # Raw garbage from a peer that runs no validator at all.
        raw = hivemind.DHT(initial_peers=swarm_peers[0].visible_maddrs(), start=True, host_maddrs=list(LOCAL))
        try:
            raw.store(block_key("garbage", 0), b"\xff\x00garbage", get_dht_time() + 20, subkey="raw-peer")
            raw.store(block_key("garbage", 1), "not a dictionary", get_dht_time() + 20)
        finally:
            raw.shutdown()

        reader_view = SwarmDHT(reader.identity, config(name="garbage"))
        reader_view._dht = reader._dht

        async def sees_valid():
            servers = await reader_view.list_servers(2)
            return list(servers) == [writer.peer_id]

        await wait_until(sees_valid, what="valid record among garbage")
        listing = await reader_view.list(block_key("garbage", 0))
        assert "raw-peer" not in listing

    asyncio.run(scenario())


def test_announcer_refreshes_and_withdraws(swarm_peers):
    owner, reader = swarm_peers[1], swarm_peers[2]
    keys = {"current": f"{SWARM}.ann.a"}

    async def scenario():
        announcer = Announcer(owner, lambda: {keys["current"]: {"n": 1}}, period=0.5, ttl=2.0)
        task = asyncio.create_task(announcer.run())
        try:

            async def visible(key):
                return owner.peer_id in await reader.list(key)

            await wait_until(lambda: visible(f"{SWARM}.ann.a"), what="first announcement")
            started = time.monotonic()
            while time.monotonic() - started < 4.0:  # two lifetimes: only refreshes keep it alive
                await wait_until(lambda: visible(f"{SWARM}.ann.a"), timeout=1.5, what="refreshed record")
                await asyncio.sleep(0.2)
            assert announcer.rounds >= 4
            keys["current"] = f"{SWARM}.ann.b"
            announcer.refresh_now()
            await wait_until(lambda: visible(f"{SWARM}.ann.b"), what="moved record")
            assert owner.peer_id not in await reader.list(f"{SWARM}.ann.a")  # tombstoned at once
        finally:
            announcer.stop()
            await asyncio.wait_for(task, 10)
        await announcer.withdraw()
        assert owner.peer_id not in await owner.list(f"{SWARM}.ann.b")

    asyncio.run(scenario())


def test_private_swarm_refuses_outsiders():
    swarm_key = b"correct horse battery staple 42"
    members = start_peers(3, swarm_key=swarm_key)
    outsiders = []
    try:
        outsiders = [
            SwarmDHT(Identity.generate(), config(members[0].visible_maddrs()), swarm_key=None),
            SwarmDHT(
                Identity.generate(),
                config(members[0].visible_maddrs()),
                swarm_key=b"wrong key, same length!!",
            ),
        ]
        for outsider in outsiders:
            outsider.start()
        key = f"{SWARM}.private"

        async def scenario():
            await members[0].publish(key, {"secret": "members only"})

            async def members_see():
                return members[0].peer_id in await members[2].list(key)

            await wait_until(members_see, what="member record")
            for outsider in outsiders:
                try:
                    await outsider.publish(key, {"intruder": True})
                except RecordRejected:
                    pass  # refused everywhere is fine too; what matters is members never see it
            # Give the outsiders' stores time to land anywhere they could, then check.
            for member in members:
                listing = await member.list(key)
                assert set(listing) == {members[0].peer_id}
            for outsider in outsiders:
                listing = await outsider.list(key)
                assert members[0].peer_id not in listing  # sealed: outsiders cannot read it either

        asyncio.run(scenario())

        now = get_dht_time()
        record = DHTRecord(b"k" * 20, msgpack.packb(outsiders[0].peer_id), msgpack.packb({"x": 1}), now + 10)
        unsealed = DHTRecord(record.key, record.subkey, outsiders[0].validator.sign_value(record), now + 10)
        assert "not sealed with the swarm key" in members[1].validator.check(unsealed)
        record = DHTRecord(b"k" * 20, msgpack.packb(outsiders[1].peer_id), msgpack.packb({"x": 1}), now + 10)
        wrong = DHTRecord(record.key, record.subkey, outsiders[1].validator.sign_value(record), now + 10)
        assert "different swarm key" in members[1].validator.check(wrong)
        assert isinstance(members[1].validator, SwarmRecordValidator)
    finally:
        for peer in outsiders + members:
            peer.shutdown()


def test_a_request_whose_descriptor_hand_off_fails_does_not_kill_the_dht_process():
    """A peer out of descriptors (a connection flood) once lost its DHT process for good: the
    process died of the failed hand-off (EOFError) and the peer never announced again."""
    helper = Path(__file__).with_name("dht_descriptor_process.py")
    done = subprocess.run([sys.executable, str(helper)], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["first"] == "stored"
    assert report["during"] == "DeadlineExceeded", report  # that request is lost, nothing else
    assert report["alive"] is True, done.stderr[-2000:]
    assert report["after"] == "stored", report
    assert "descriptor hand-off failed" in done.stderr


def test_a_peer_whose_dht_process_died_says_so():
    async def scenario():
        async with SwarmDHT(Identity.generate(), DHTConfig(swarm_name=SWARM, host_maddrs=LOCAL)) as dht:
            dht._dht.kill()
            await asyncio.to_thread(dht._dht.join, 10)
            with pytest.raises(DeadlineExceeded, match=r"DHT process exited .*restart it"):
                await dht.publish("key", 1, timeout=1)

    asyncio.run(scenario())
