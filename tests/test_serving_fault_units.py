"""The pieces of issue #19's fault tolerance that need no network, each checked directly:
bans lifted by a restart, per-server step deadlines, quotas and the bounded mailbox,
ExceptionGroups unwrapped to the documented error, DHT refusals logged per cause, and
oversized records refused before they reach hivemind."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import pytest
import torch
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from swarm import BanList, Identity, NoRouteError, SwarmDHT
from swarm.serving.hosted_sessions import CacheBudget, HostedSession, HostedSessions, PeerQuota
from swarm.serving.server_pool import ServerPool
from swarm.serving.step_failures import first_documented_error
from swarm.signing import SwarmRecordValidator
from transport.errors import MessageTooLarge, PeerUnavailable, ServerBusy


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ban_is_lifted_when_the_server_restarts_and_decays_otherwise():
    clock = FakeClock()
    bans = BanList(base_seconds=15, max_seconds=60, clock=clock)
    bans.ban("a", evidence=1000.0)
    bans.ban("b", evidence=2000.0)
    assert bans.lift_restarted({"a": 1000.0, "b": 2500.0}) == ["b"]  # b restarted, a did not
    assert bans.banned() == {"a"}
    clock.now += 16
    assert bans.banned() == frozenset()  # decayed
    assert bans.ban("a", evidence=1000.0) == 30  # a repeat doubles
    clock.now += 30 + 61
    assert bans.ban("a", evidence=1000.0) == 15  # long after: starts over


def test_step_deadline_follows_the_servers_own_pace_within_floor_and_ceiling():
    pool = ServerPool(
        None, None, 4, BanList(), 5.0, deadline_floor=2.0, deadline_factor=5.0, deadline_ceiling=60.0
    )
    assert pool.step_deadline("a", 1) == 60.0  # nothing known: the ceiling
    for seconds in (0.05, 0.1, 0.08):
        pool.record_step("a", seconds, 1)
    assert pool.step_deadline("a", 1) == 2.0  # 5 x 0.1 s is under the floor
    pool.record_step("a", 1.0, 1)
    assert pool.step_deadline("a", 1) == pytest.approx(5.0)
    assert pool.step_deadline("a", 100) == 60.0  # a long prefill scales, up to the ceiling


def test_quota_per_client_and_bounded_mailbox():
    async def scenario():
        sessions = HostedSessions(
            CacheBudget(100), PeerQuota(max_sessions=2, max_cache_tokens=50, mailbox_steps=3)
        )

        def allocate(batch, length):
            return None

        sessions.open(b"t" * 8 + b"1", 1, 20, allocate, owner="greedy")
        with pytest.raises(ServerBusy, match="share"):
            sessions.open(b"t" * 8 + b"2", 1, 40, allocate, owner="greedy")
        sessions.open(b"t" * 8 + b"3", 1, 20, allocate, owner="greedy")
        with pytest.raises(ServerBusy, match="sessions"):
            sessions.open(b"t" * 8 + b"4", 1, 5, allocate, owner="greedy")
        other = sessions.open(b"t" * 8 + b"5", 1, 50, allocate, owner="polite")  # its own share
        assert sessions.budget.used_tokens == 90
        sessions.close(other)
        assert sessions.budget.used_tokens == 40
        sessions.open(b"t" * 8 + b"6", 1, 50, allocate, owner="polite")

        mailbox = HostedSession(b"m" * 8, None, 1, 8, mailbox_steps=3)
        accepted = [mailbox.offer(step, torch.zeros(1, 1, 4), "push") for step in range(10)]
        assert accepted == [True] * 3 + [False] * 7
        assert mailbox.offer(5, torch.zeros(1, 1, 4), "step") is True  # a step brings its own input

    asyncio.run(scenario())


def test_task_group_errors_leave_as_the_documented_error():
    route_error = NoRouteError([(0, 2)])
    group = BaseExceptionGroup("x", [asyncio.CancelledError(), ExceptionGroup("y", [route_error])])
    assert first_documented_error(group) is route_error
    busy = ServerBusy("full")
    assert first_documented_error(ExceptionGroup("z", [KeyError("k"), busy])) is busy
    bug = KeyError("k")
    assert first_documented_error(ExceptionGroup("z", [bug])) is bug


def test_refused_records_are_logged_once_per_cause(caplog):
    identity, other = Identity.generate(), Identity.generate()
    validator = SwarmRecordValidator(identity)
    now = get_dht_time()
    with caplog.at_level(logging.WARNING, logger="swarm.signing"):
        for index in range(400):  # forged records under 400 different subkeys and lifetimes
            victim = Identity.generate().peer_id if index < 5 else other.peer_id
            record = DHTRecord(
                b"k" * 20, msgpack.packb(f"{victim}{index}"), msgpack.packb({"x": 1}), now + index
            )
            forged = DHTRecord(
                record.key, record.subkey, validator.sign_value(record), record.expiration_time
            )
            assert not validator.validate(forged)
    lines = [r for r in caplog.records if "refused DHT record" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert validator.refusals == {"forged-subkey": 400}


def test_oversized_record_is_refused_before_publishing():
    async def scenario():
        with SwarmDHT(Identity.generate()) as dht:
            with pytest.raises(MessageTooLarge, match="byte limit"):
                await dht.publish("big", {"blob": b"x" * 300_000})
            await dht.publish("small", {"blob": b"x" * 100})

    asyncio.run(scenario())


def test_peer_unavailable_is_what_a_refused_connect_raises_quickly():
    """Connecting to a port nothing listens on fails at once, not at the connect deadline."""
    from transport import Endpoint, KeyPair, Timeouts

    async def scenario():
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # closed again: nothing listens there
        async with Endpoint(timeouts=Timeouts(connect=30.0)) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(PeerUnavailable, match="refused"):
                await client.connect(f"tcp://127.0.0.1:{port}", KeyPair.generate().public)
            return loop.time() - started

    assert asyncio.run(scenario()) < 15.0  # far under the 30 s deadline
