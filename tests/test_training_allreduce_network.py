"""The all-reduce over real ZeroMQ endpoints (CURVE on) on 127.0.0.1."""

import asyncio

import pytest
import torch

from swarm.training.allreduce import AllReduceTimeouts, Member
from swarm.training.averaging import AveragingService
from swarm.training.averaging_wire import Contribution
from swarm.training.robust import RobustConfig
from transport import CodedTensor, Endpoint, NotAuthorized

pytestmark = pytest.mark.timeout(60)

TIMEOUTS = AllReduceTimeouts(scatter=5, gather=5, repair=5, call=5)
PLAIN_MEAN = RobustConfig(rule="mean")  # compared with the weighted mean; the rules: test_training_robust.py


async def _start_members(count, compression="int8"):
    endpoints, services, members = [], [], []
    for i in range(count):
        endpoint = Endpoint()
        address = await endpoint.bind("tcp://127.0.0.1:0")
        endpoints.append(endpoint)
        services.append(AveragingService(endpoint, compression, registration_wait=5))
        members.append(Member(f"peer{i}", bandwidth=1.0 + i, address=address, public_key=endpoint.public_key))
    return endpoints, services, members


async def _close(endpoints, services):
    for service in services:
        await service.close()
    for endpoint in endpoints:
        await endpoint.close()


@pytest.mark.parametrize("compression", ["none", "int8", "4bit"])
def test_three_members_average_bit_identically_over_zeromq(compression):
    async def scenario():
        endpoints, services, members = await _start_members(3, compression)
        generator = torch.Generator().manual_seed(0)
        vectors = [torch.randn(10_000, generator=generator) for _ in range(3)]
        weights = [1.0, 2.0, 5.0]
        try:
            outcomes = await asyncio.gather(
                *(
                    services[i].all_reduce(
                        "round-1", members, i, vectors[i], weights[i], TIMEOUTS, robust=PLAIN_MEAN
                    )
                    for i in range(3)
                )
            )
        finally:
            await _close(endpoints, services)
        return vectors, weights, outcomes

    vectors, weights, outcomes = asyncio.run(scenario())
    expected = sum(w * v for w, v in zip(weights, vectors, strict=True)) / sum(weights)
    for outcome in outcomes[1:]:
        assert torch.equal(outcome.averaged, outcomes[0].averaged)
    tolerance = {"none": 1e-6, "int8": 0.05, "4bit": 0.6}[compression]
    torch.testing.assert_close(outcomes[0].averaged, expected, rtol=0, atol=tolerance)
    assert all(o.report.contributors == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]} for o in outcomes)
    # int8 sends about a quarter of the bytes of raw float32. Each member sends its share
    # of every other part twice (to the reducer and to the backup that verifies it) and
    # its own part's result to the others: 3 (M-1)/M of the vector, plus the codec's scales.
    per_value = {"none": 4, "int8": 1, "4bit": 0.5}[compression]
    for outcome in outcomes:
        assert 0 < outcome.bytes_sent <= 3 * (2 / 3) * 10_000 * per_value * 1.25


def test_a_contribution_under_another_members_name_is_refused():
    async def scenario():
        endpoints, services, members = await _start_members(2)
        impostor = Endpoint()
        try:
            connection = await impostor.connect(members[0].address, members[0].public_key)
            victim = asyncio.create_task(
                services[0].all_reduce(
                    "round-x", members, 0, torch.ones(128), 1.0, AllReduceTimeouts(2, 2, 2, 2)
                )
            )
            forged = Contribution(
                "round-x", 0, 1, 1.0, CodedTensor(torch.full((64,), 99.0), services[0].codec)
            )
            with pytest.raises(NotAuthorized, match="not member 1"):
                await connection.call(forged, timeout=5)
            victim.cancel()
            await asyncio.gather(victim, return_exceptions=True)
        finally:
            await impostor.close()
            await _close(endpoints, services)

    asyncio.run(scenario())


@pytest.mark.parametrize("compression", ["none", "fp16", "int8", "4bit"])
def test_byte_accounting_matches_the_encoded_frames(compression):
    from swarm.training.averaging_wire import COMPRESSIONS, encoded_size, wire_size

    codec = COMPRESSIONS[compression]
    for numel in (0, 1, 63, 64, 65, 1000, 10_001):
        assert wire_size(codec, numel) == encoded_size(codec, torch.randn(numel)), numel


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_averaging_in_place_gives_the_same_bits_as_a_new_vector(compression):
    """``out=vector`` (as torch.distributed's in-place all_reduce) for two of three members."""

    async def scenario():
        endpoints, services, members = await _start_members(3, compression)
        generator = torch.Generator().manual_seed(1)
        originals = [torch.randn(10_000, generator=generator) for _ in range(3)]
        vectors = [v.clone() for v in originals]
        try:
            with pytest.raises(ValueError, match="contiguous float32"):
                await services[0].all_reduce(
                    "bad", members, 0, vectors[0], 1.0, TIMEOUTS, out=torch.empty(10, dtype=torch.float32)
                )
            outcomes = await asyncio.gather(
                *(
                    services[i].all_reduce(
                        "round-1",
                        members,
                        i,
                        vectors[i],
                        1.0,
                        TIMEOUTS,
                        out=vectors[i] if i < 2 else None,
                        robust=PLAIN_MEAN,
                    )
                    for i in range(3)
                )
            )
            # Finished rounds stay reachable for late repairs but hold only what those need:
            # the result of the one part each member backs up, encoded.
            for service in services:
                lingering = service._rounds["round-1"]
                assert lingering.vector is None
                states = lingering._states.values()
                assert not any(state.contributions for state in states)
                assert not any(state.result is not None for state in states)
                assert lingering._kept is not None
        finally:
            await _close(endpoints, services)
        return originals, vectors, outcomes

    originals, vectors, outcomes = asyncio.run(scenario())
    assert outcomes[0].averaged is vectors[0] and outcomes[1].averaged is vectors[1]
    assert torch.equal(vectors[2], originals[2])  # no out: the contribution is left alone
    for outcome in outcomes:
        assert torch.equal(outcome.averaged, outcomes[2].averaged)
    tolerance = {"none": 1e-6, "int8": 0.05}[compression]
    torch.testing.assert_close(outcomes[2].averaged, sum(originals) / 3, rtol=0, atol=tolerance)


def test_before_send_sees_every_message_with_the_services_all_reduce_count():
    """The hook the process layer injects faults through: called before each message a member
    sends, with its own all-reduce count, the message kind, the target and the group size."""
    from swarm.training.averaging import AllReduceSend

    async def scenario():
        endpoints, services, members = await _start_members(3)
        seen: list[list[AllReduceSend]] = [[] for _ in range(3)]
        for i, service in enumerate(services):
            service.before_send = seen[i].append
        try:
            for round_id in ("round-1", "round-2"):
                await asyncio.gather(
                    *(
                        services[i].all_reduce(round_id, members, i, torch.ones(1000), 1.0, TIMEOUTS)
                        for i in range(3)
                    )
                )
        finally:
            await _close(endpoints, services)
        return seen

    seen = asyncio.run(scenario())
    for i, sends in enumerate(seen):
        # To each other member: two contributions (to it as a reducer, and as the backup that
        # verifies a part), this member's result, and its verdict as the backup of part i - 1.
        expected = sorted(
            (count, f"round-{count}", kind, target, 3)
            for count in (1, 2)
            for kind in ("contribution", "contribution", "result", "verdict")
            for target in range(3)
            if target != i
        )
        assert sorted((s.all_reduce, s.round_id, s.kind, s.target, s.group_size) for s in sends) == expected
