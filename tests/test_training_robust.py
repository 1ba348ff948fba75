"""One dishonest member among four, in the all-reduce protocol (members in one event loop).

The attacker either poisons its contribution (NaN, x1000, sign-flipped, a sample
weight of 1e9) or, as a reducer or backup, lies about a reduced part. Every honest
member must end bit-identical, close to the honest members' mean, and the attacker
must be named in the reports. The same router as test_training_allreduce_protocol.py
carries the messages; a lying member's links change what it sends.
"""

import asyncio

import pytest
import torch

from swarm.training.allreduce import AllReduceRound, Member
from swarm.training.robust import RobustConfig, aggregate
from tests.test_training_allreduce_protocol import INT8, TIMEOUTS, Router, RouterLinks

pytestmark = pytest.mark.timeout(60)

ATTACKER = 3
HONEST = [0, 1, 2]


def correlated_vectors(count=4, numel=4096, seed=0):
    """Pseudo-gradients of members training the same model: a shared direction plus noise."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(numel, generator=generator)
    return [shared + 0.3 * torch.randn(numel, generator=generator) for _ in range(count)]


class LyingLinks(RouterLinks):
    """A member whose reduced results are shifted: ``to`` selects the members it lies to."""

    def __init__(self, router, source, lie_to, dispute_all=False):
        super().__init__(router, source)
        self.lie_to = lie_to
        self.dispute_all = dispute_all

    async def send_result(self, target, part, contributors, values, timeout):
        if target in self.lie_to:
            values = values + 1.0
        return await super().send_result(target, part, contributors, values, timeout)

    async def send_verdict(self, target, part, digest, timeout):
        await super().send_verdict(target, part, "" if self.dispute_all else digest, timeout)


class DisputingBackup(AllReduceRound):
    """A backup that refuses every commit, claiming the reducer lied."""

    async def _verify(self, part, committed, contributors):
        return False


async def run_group(vectors, weights, links=None, rounds=None, robust=RobustConfig()):
    router = Router()
    members = [Member(f"peer{i}") for i in range(len(vectors))]
    for i, vector in enumerate(vectors):
        kind = (rounds or {}).get(i, AllReduceRound)
        member_links = (links or {}).get(i, lambda r, s: RouterLinks(r, s))(router, i)
        router.rounds[i] = kind(
            "r1", members, i, vector, weights[i], member_links, INT8, TIMEOUTS, robust=robust
        )
    for i, round_ in router.rounds.items():
        router.tasks[i] = asyncio.create_task(round_.run())
    results = {i: await task for i, task in router.tasks.items()}
    for round_ in router.rounds.values():
        round_.close()
    return results, router


def honest_mean(vectors):
    return sum(vectors[i] for i in HONEST) / len(HONEST)


def relative_error(result, reference):
    return float(torch.linalg.vector_norm(result - reference) / torch.linalg.vector_norm(reference))


def assert_identical(results):
    for i in HONEST[1:]:
        assert torch.equal(results[i], results[HONEST[0]])


def named(router, kind):
    found = set()
    for i in HONEST:
        report = router.rounds[i].report
        table = getattr(report, kind)
        found |= set(table) if kind == "accused" else {m for part in table.values() for m in part}
    return found


@pytest.mark.parametrize(
    ("attack", "named_as"),
    [("nan", "rejected"), ("scale", "clipped"), ("flip", None), ("weight", "clipped")],
)
def test_a_poisoned_contribution_cannot_move_the_honest_mean(attack, named_as):
    vectors = correlated_vectors()
    weights = [32.0] * 4
    if attack == "nan":
        vectors[ATTACKER] = torch.full_like(vectors[ATTACKER], float("nan"))
    elif attack == "scale":
        vectors[ATTACKER] = vectors[ATTACKER] * 1000
    elif attack == "flip":
        vectors[ATTACKER] = -vectors[ATTACKER]
    else:
        weights[ATTACKER] = 1e9
    results, router = asyncio.run(run_group(vectors, weights))
    assert_identical(results)
    assert bool(torch.isfinite(results[0]).all())
    # A weight lie alone leaves a plausible vector: the reference is then every member at equal weight.
    reference = sum(vectors) / 4 if attack == "weight" else honest_mean(vectors)
    undefended = asyncio.run(run_group(vectors, weights, robust=RobustConfig(rule="mean")))[0][0]
    defended_error = relative_error(results[0], reference)
    assert defended_error < 0.3, defended_error  # the honest spread is ~0.3 x 0.3 / sqrt(3)
    if attack != "nan":  # undefended, NaN is not even comparable
        assert defended_error < relative_error(undefended, reference) / 2
    if named_as:
        assert named(router, named_as) == {ATTACKER}


def test_the_honest_rules_agree_with_the_mean_when_nobody_attacks():
    vectors = correlated_vectors(seed=1)
    contributions = {i: (float(10 + i), v) for i, v in enumerate(vectors)}
    mean = aggregate(contributions, RobustConfig(rule="mean")).values
    # With room for the honest spread of norms nothing is clipped: CenteredClip is the mean.
    clip = aggregate(contributions, RobustConfig(rule="centered_clip", max_norm_ratio=2.0))
    assert clip.clipped == [] and clip.rejected == []
    torch.testing.assert_close(clip.values, mean, rtol=0, atol=1e-5)
    # The default bound (1x the lower median norm) trims the larger ones a little, unreported.
    default = aggregate(contributions, RobustConfig())
    assert default.clipped == [] and relative_error(default.values, mean) < 0.05
    trimmed = aggregate(contributions, RobustConfig(rule="trimmed_mean")).values
    assert relative_error(trimmed, mean) < 0.1


def test_a_reducer_that_commits_a_wrong_result_is_disputed_and_the_arbiter_decides():
    vectors = correlated_vectors(seed=2)
    # Member 3 reduces part 3; its backup is member 0, its arbiter member 1. It lies to everyone.
    lying = {ATTACKER: lambda r, s: LyingLinks(r, s, lie_to={0, 1, 2})}
    results, router = asyncio.run(run_group(vectors, [1.0] * 4, links=lying))
    honest_results, _ = asyncio.run(run_group(vectors, [1.0] * 4))
    assert_identical(results)
    start, end = router.rounds[0].parts[ATTACKER]
    # the arbiter reduced the same contributions as an honest reducer: the same part, bit for bit
    assert torch.equal(results[0][start:end], honest_results[0][start:end])
    assert router.rounds[0].report.disputed == [ATTACKER]
    assert router.rounds[1].report.repaired_parts == [ATTACKER]  # the arbiter
    assert ATTACKER in router.rounds[0].report.accused  # the backup caught it


def test_a_reducer_that_lies_only_to_the_others_is_caught_by_the_backups_digest():
    vectors = correlated_vectors(seed=3)
    lying = {ATTACKER: lambda r, s: LyingLinks(r, s, lie_to={1, 2})}  # honest commit to backup 0
    results, router = asyncio.run(run_group(vectors, [1.0] * 4, links=lying))
    honest_results, _ = asyncio.run(run_group(vectors, [1.0] * 4))
    assert_identical(results)
    assert torch.equal(results[0], honest_results[0])
    assert named(router, "accused") == {ATTACKER}


def test_a_backup_that_disputes_honest_results_cannot_replace_them():
    vectors = correlated_vectors(seed=4)
    # Member 3 backs up part 2 (reducer 2, arbiter 0): it refuses the honest commit.
    results, router = asyncio.run(
        run_group(
            vectors,
            [1.0] * 4,
            links={ATTACKER: lambda r, s: LyingLinks(r, s, lie_to=set(), dispute_all=True)},
            rounds={ATTACKER: DisputingBackup},
        )
    )
    honest_results, _ = asyncio.run(run_group(vectors, [1.0] * 4))
    assert_identical(results)
    assert torch.equal(results[0], honest_results[0])
    assert ATTACKER in router.rounds[2].report.accused  # the honest reducer names its backup


def test_a_checkpoint_is_refused_for_non_finite_parameters_or_an_exploded_loss():
    from swarm.training.run_checkpoint import checkpoint_refusal

    assert checkpoint_refusal(True, 5.0, None, 2.0) is None
    assert checkpoint_refusal(True, 5.5, 5.0, 2.0) is None
    assert "not finite" in checkpoint_refusal(False, 5.0, 5.0, 2.0)
    assert "nan" in checkpoint_refusal(True, float("nan"), 5.0, 2.0)
    assert "exploded" in checkpoint_refusal(True, 700.0, 6.0, 2.0)


def test_the_training_record_names_rejected_clipped_and_accused_peers():
    from swarm.training.progress import TrainerState, TrainingPeerRecord

    record = TrainingPeerRecord(
        TrainerState.TRAINING, 3, 30, 5.0, ((3, 5.0),), 100.0, 1000, 4, "h", ("tcp://x",), b"k", 1.0, "0",
        1.0, rejected=("peer-d",), clipped=("peer-c", "peer-d"), accused=("peer-e",),
    )  # fmt: skip
    parsed = TrainingPeerRecord.from_wire(record.to_wire())
    assert (parsed.rejected, parsed.clipped, parsed.accused) == (
        ("peer-d",),
        ("peer-c", "peer-d"),
        ("peer-e",),
    )
    older = record.to_wire()
    for name in ("rejected", "clipped", "accused"):
        del older[name]
    assert TrainingPeerRecord.from_wire(older).rejected == ()  # records of older peers still parse


def test_of_two_members_one_cannot_claim_a_thousand_times_the_others_norm_or_weight():
    honest, attacker = correlated_vectors(count=2, seed=5)
    contributions = {0: (32.0, honest), 1: (1e9, attacker * 1000)}
    result = aggregate(contributions, RobustConfig())
    assert result.clipped == [1]
    norm = float(torch.linalg.vector_norm(honest))
    assert float(torch.linalg.vector_norm(result.values)) <= 2 * norm
