"""The all-reduce protocol with deterministic failure injection (members in one event loop).

The same protocol over real ZeroMQ between real processes is tested in
test_training_allreduce_network.py; here a router implements the round's
:class:`GroupLinks` in process, so that a member can be killed at an exact point of
the protocol.
"""

import asyncio

import pytest
import torch

from swarm.training.allreduce import AllReduceRound, AllReduceTimeouts, GroupLinks, Member
from swarm.training.averaging_wire import codec_round_trip
from swarm.training.robust import RobustConfig
from transport import Int8BlockwiseCodec
from transport.errors import PeerUnavailable

pytestmark = pytest.mark.timeout(60)

TIMEOUTS = AllReduceTimeouts(scatter=0.5, gather=0.5, repair=0.5, call=0.5)
PLAIN_MEAN = RobustConfig(rule="mean")
"""These tests check the protocol against the weighted mean; test_training_robust.py the rules."""


INT8 = Int8BlockwiseCodec(64)
"""The rounds' wire codec."""


def int8_round_trip(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` as a member receives them (the router passes tensors, not bytes)."""
    return codec_round_trip(INT8, values, out)


class Router:
    """Delivers messages between rounds; ``kill_rule = (member, kind, target)`` kills a member as it sends that."""

    def __init__(self):
        self.rounds: dict[int, AllReduceRound] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.dead: set[int] = set()
        self.kill_rule = None
        self.calls: list[tuple[int, str, int]] = []
        self.contributions: list[tuple[int, int, int]] = []  # delivered: (source, target, part)

    def links(self, source: int) -> GroupLinks:
        return RouterLinks(self, source)

    async def deliver(self, source: int, kind: str, target: int) -> AllReduceRound:
        """The target's round, once ``source`` may send ``kind`` to it (it may be killed doing so)."""
        self.calls.append((source, kind, target))
        if self.kill_rule == (source, kind, target):
            self.dead.add(source)
            self.tasks[source].cancel()
            await asyncio.sleep(3600)  # never returns: the task is being cancelled
        if target in self.dead or source in self.dead:
            raise PeerUnavailable(f"member {target} is gone")
        return self.rounds[target]


class RouterLinks:
    """:class:`GroupLinks` of member ``source`` through a :class:`Router`."""

    def __init__(self, router: Router, source: int):
        self.router = router
        self.source = source

    async def send_contribution(self, target, part, weight, values, timeout) -> None:
        round_ = await self.router.deliver(self.source, "contribution", target)
        self.router.contributions.append((self.source, target, part))
        round_.on_contribution(self.source, part, weight, int8_round_trip(values))  # as the wire decodes it

    async def send_result(self, target, part, contributors, values, timeout):
        round_ = await self.router.deliver(self.source, "result", target)
        return await round_.on_result(part, values.clone(), contributors)

    async def send_verdict(self, target, part, digest, timeout) -> None:
        round_ = await self.router.deliver(self.source, "verdict", target)
        round_.on_verdict(part, digest)

    async def request_repair(self, target, part, weight, values, timeout, arbitrate):
        round_ = await self.router.deliver(self.source, "repair", target)
        result, contributors = await asyncio.wait_for(
            round_.on_repair(self.source, part, weight, int8_round_trip(values), arbitrate), timeout * 4
        )
        return (None if result is None else result.clone()), contributors


async def run_group(vectors, weights, kill_rule=None, bandwidths=None):
    router = Router()
    router.kill_rule = kill_rule
    bandwidths = bandwidths or [1.0] * len(vectors)
    members = [Member(f"peer{i}", bandwidths[i]) for i in range(len(vectors))]
    for i, vector in enumerate(vectors):
        router.rounds[i] = AllReduceRound(
            "r1",
            members,
            i,
            vector,
            weights[i],
            router.links(i),
            INT8,
            TIMEOUTS,
            robust=PLAIN_MEAN,
        )
    for i, round_ in router.rounds.items():
        router.tasks[i] = asyncio.create_task(round_.run())
    results = {}
    for i, task in router.tasks.items():
        try:
            results[i] = await task
        except asyncio.CancelledError:
            assert i in router.dead
    for round_ in router.rounds.values():
        round_.close()
    return results, router


def make_vectors(count, numel=1000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=generator) for _ in range(count)]


def assert_all_identical(results):
    values = list(results.values())
    for other in values[1:]:
        assert torch.equal(values[0], other)


def test_all_members_get_the_weighted_mean_bit_identically():
    vectors = make_vectors(4)
    weights = [10.0, 30.0, 0.0, 60.0]
    results, _ = asyncio.run(run_group(vectors, weights, bandwidths=[1, 2, 1, 4]))
    assert len(results) == 4
    assert_all_identical(results)
    expected = sum(w * v for w, v in zip(weights, vectors, strict=True)) / sum(weights)
    # int8 round trips of the contributions and of the result: half a step of absmax / 127 each
    largest = max(v.abs().max().item() for v in vectors)
    atol = (expected.abs().max().item() + largest) / 254 + 1e-6
    torch.testing.assert_close(results[0], expected, rtol=0, atol=atol)


def test_member_dead_before_scatter_is_excluded_and_its_part_repaired():
    vectors = make_vectors(3, seed=1)
    results, router = asyncio.run(run_group(vectors, [1.0, 1.0, 1.0], kill_rule=(1, "contribution", 0)))
    assert set(results) == {0, 2}
    assert_all_identical(results)
    expected = (vectors[0] + vectors[2]) / 2  # member 1 never contributed to any part
    torch.testing.assert_close(results[0], expected, rtol=0, atol=expected.abs().max().item() / 100)
    assert router.rounds[2].report.repaired_parts == [1]  # member 2 is the backup of part 1


def test_reducer_dead_after_committing_to_backup_still_gives_identical_survivors():
    vectors = make_vectors(3, seed=2)
    # Member 0 reduces part 0, commits to backup 1, then dies before sending the result to member 2.
    results, router = asyncio.run(run_group(vectors, [1.0, 2.0, 3.0], kill_rule=(0, "result", 2)))
    assert set(results) == {1, 2}
    assert_all_identical(results)
    # Part 0 keeps member 0's contribution: the committed result is served by the backup.
    start, end = router.rounds[1].parts[0]
    full = (vectors[0] + 2 * vectors[1] + 3 * vectors[2]) / 6
    torch.testing.assert_close(results[1][start:end], full[start:end], rtol=0, atol=0.05)
    assert router.rounds[1].report.repaired_parts == []


def test_reducer_dead_before_committing_lets_the_backup_take_over():
    vectors = make_vectors(3, seed=3)
    results, router = asyncio.run(run_group(vectors, [1.0, 1.0, 1.0], kill_rule=(0, "result", 1)))
    assert set(results) == {1, 2}
    assert_all_identical(results)
    assert router.rounds[1].report.repaired_parts == [0]
    start, end = router.rounds[1].parts[0]
    survivors = (vectors[1] + vectors[2]) / 2
    torch.testing.assert_close(results[1][start:end], survivors[start:end], rtol=0, atol=0.05)


def test_a_member_reached_through_relays_backs_up_no_part_even_when_a_reducer_dies():
    vectors = make_vectors(4, seed=4)
    relayed = [1.0, 1.0, 1.0, 0.0]  # member 3 declares 0: it reduces nothing
    results, router = asyncio.run(run_group(vectors, [1.0] * 4, bandwidths=relayed))
    assert_all_identical(results)
    assert router.rounds[0].parts[3][0] == router.rounds[0].parts[3][1]  # its part is empty
    received = {part for _, target, part in router.contributions if target == 3}
    assert received <= {3}, f"the relayed member got copies of parts {received - {3}} to back up"
    expected = sum(vectors) / 4
    torch.testing.assert_close(results[0], expected, rtol=0, atol=expected.abs().max().item() / 50)
    # the reducer of part 2 dies before committing: its backup is member 0, not the ring's next (3)
    results, router = asyncio.run(
        run_group(vectors, [1.0] * 4, kill_rule=(2, "result", 0), bandwidths=relayed)
    )
    assert set(results) == {0, 1, 3}
    assert_all_identical(results)
    assert router.rounds[0].report.repaired_parts == [2]
    start, end = router.rounds[0].parts[2]
    survivors = (vectors[0] + vectors[1] + vectors[3]) / 3
    torch.testing.assert_close(results[0][start:end], survivors[start:end], rtol=0, atol=0.05)


def test_a_released_round_still_answers_late_requests_from_what_it_kept():
    """After ``release`` a finished round answers a slower member's repair for the part it
    backs up, ignores a late contribution, and refuses parts it does not back up."""
    from swarm.training.parts import fallback_reducer

    async def scenario():
        results, router = await run_group(make_vectors(3, seed=7), [1.0, 1.0, 1.0])
        for round_ in router.rounds.values():
            round_.release()
        member = router.rounds[0]
        backed = next(p for p in range(3) if fallback_reducer(p, [1.0] * 3) == 0)
        other = next(p for p in range(3) if p not in (0, backed))
        size = member.parts[backed][1] - member.parts[backed][0]
        late, contributors = await member.on_repair(1, backed, 1.0, torch.zeros(size))
        start, end = member.parts[backed]
        assert torch.equal(late.decode(), results[0][start:end]) and contributors == [0, 1, 2]
        own = member.parts[0][1] - member.parts[0][0]
        member.on_contribution(2, 0, 1.0, torch.full((own,), 99.0))  # ignored: reduced already
        assert not member._states[0].contributions
        with pytest.raises(ValueError, match="not the backup"):
            await member.on_repair(1, other, 1.0, torch.zeros(size))

    asyncio.run(scenario())
