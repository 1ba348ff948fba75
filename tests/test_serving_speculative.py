"""Speculative decoding (issue #18): rollback on the servers' caches and the client's replay
history, the drafters and the draft length, greedy output identical to plain greedy (through
three `swarm join` processes, also when a server is SIGKILLed mid-generation), and speculative
sampling's output distribution checked statistically against the target model's own."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kernels import KVCache, generate, load_local_model, next_token_probabilities, write_tiny_checkpoint
from swarm.serving import Sampling
from swarm.serving.drafting import DraftLength, DraftModel, PromptLookup, SpeculativeConfig, load_draft_model
from swarm.serving.hosted_sessions import HostedSession
from swarm.serving.speculative import generate_speculative
from tests.harness import three_server_swarm

# A prompt that repeats itself, so prompt lookup has something to propose from the start.
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 1, 17, 42]])
NEW_TOKENS = 24


class LocalChain:
    """A one-row session over a whole local model: what ``generate_speculative`` needs of an
    ``InferenceSession`` (step, rollback, position, max_length), run in this process."""

    def __init__(self, model, max_length: int):
        self.span = model.span
        self.cache = model.allocate_cache(1, max_length)
        self.max_length = max_length
        self.position = 0
        self.steps = 0

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        self.cache.truncate(self.position)
        self.steps += 1
        with torch.inference_mode():
            output = self.span(hidden, self.cache)
        self.position += hidden.shape[1]
        return output

    def rollback(self, length: int) -> None:
        self.position = length


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Thousands of tiny forwards: with two threads on a loaded 2-core machine each one waits
    for a parked thread at every barrier (100x slower); one thread per process, as the servers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A target model and a smaller draft model with the same tokenizer."""
    root = tmp_path_factory.mktemp("speculative")
    write_tiny_checkpoint(root / "target", num_layers=4, hidden_size=64, seed=0)
    write_tiny_checkpoint(root / "draft", num_layers=1, hidden_size=32, seed=1)
    return root / "target", root / "draft"


async def _speculate(model, ids, tokens, sampling, drafter, config=SpeculativeConfig()):
    chain = LocalChain(model, ids.shape[1] + tokens)
    pieces = [piece async for piece in generate_speculative(
        model.client, chain, ids, tokens, sampling, None, (), drafter, config)]  # fmt: skip
    return torch.cat([ids, *pieces], dim=1), chain


# ---------------------------------------------------------------- rollback


def test_cache_truncate_zeroes_the_dropped_positions_and_a_step_before_the_end_rolls_back():
    cache = KVCache([torch.ones(1, 2, 8, 4)], [torch.ones(1, 2, 8, 4)], torch.tensor([6]))
    cache.truncate(4)
    assert int(cache.lengths[0]) == 4
    assert cache.keys[0][:, :, :4].eq(1).all() and cache.keys[0][:, :, 4:6].eq(0).all()
    with pytest.raises(ValueError):
        cache.truncate(9)
    session = HostedSession(b"token-123", cache, batch=1, max_length=8)
    session.check_step(2, 1, torch.zeros(1, 1, 16), hidden_size=16)  # an earlier position is allowed
    session.roll_back(2)
    assert int(cache.lengths[0]) == 2 and cache.values[0][:, :, 2:4].eq(0).all()
    session.roll_back(5)  # past what it holds: nothing to drop
    assert int(cache.lengths[0]) == 2


# ---------------------------------------------------------------- drafters and the draft length


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(SpeculativeConfig(ngram_max=3))
    assert lookup.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], 3).tokens == [8, 9, 1]
    assert lookup.propose([5, 6, 7, 8, 9, 6, 7, 2, 6, 7], 2).tokens == [2, 6]  # the latest occurrence
    assert lookup.propose([1, 2, 3, 4], 4).tokens == []  # nothing repeats
    assert lookup.propose([3, 1, 2, 1, 2], 5).tokens == [1, 2, 1, 2, 1]  # a repeating pattern runs on
    assert lookup.propose([7, 7, 7], 3).tokens == [7, 7, 7]
    assert lookup.propose([4, 4], 0).tokens == []


def test_draft_length_follows_acceptance_and_drafts_nothing_when_it_does_not_pay():
    config = SpeculativeConfig(max_draft=8, probe_every=4)
    good = DraftLength(config)
    for _ in range(20):
        good.record(proposed=6, accepted=6, tokens=7, seconds=0.1)
    assert good.choose() == 8
    bad = DraftLength(config)
    for tokens in (2, 3, 2, 3, 2, 3):  # every draft rejected, and each verified token costs a pass
        bad.record(proposed=tokens - 1, accepted=0, tokens=tokens, seconds=0.1 * tokens)
    assert bad.token_cost == pytest.approx(1.0, abs=1e-6)
    chosen = [bad.choose() for _ in range(8)]
    assert chosen == [0, 0, 0, 1, 0, 0, 0, 1]  # a probe every probe_every passes


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_greedy_speculation_equals_plain_greedy_locally(checkpoints, kind):
    target_dir, draft_dir = checkpoints
    model = load_local_model(target_dir)
    expected = generate(model, PROMPT, NEW_TOKENS)
    drafter = (
        PromptLookup()
        if kind == "lookup"
        else DraftModel(load_draft_model(draft_dir, model.config.vocab_size))
    )
    output, chain = asyncio.run(_speculate(model, PROMPT, NEW_TOKENS, Sampling(), drafter))
    assert torch.equal(output, expected)
    if kind == "lookup":  # the tiny model loops soon: drafts are accepted, fewer passes than tokens
        assert chain.steps < NEW_TOKENS


def test_greedy_speculation_with_a_repetition_penalty_equals_the_plain_token_loop(checkpoints):
    """Each verified position is penalized for the drafts before it, as the plain loop would."""
    from swarm.serving.generation import generate_rows

    model = load_local_model(checkpoints[0])
    sampling = Sampling(repetition_penalty=1.3)

    async def plain():
        chain = LocalChain(model, PROMPT.shape[1] + NEW_TOKENS)
        rows = generate_rows(model.client, chain, PROMPT, NEW_TOKENS, sampling, None)
        return torch.cat([PROMPT, *[piece async for piece in rows]], dim=1)

    expected = asyncio.run(plain())
    output, _ = asyncio.run(_speculate(model, PROMPT, NEW_TOKENS, sampling, PromptLookup()))
    assert torch.equal(output, expected)


def test_a_draft_model_with_another_vocabulary_is_refused(checkpoints, tmp_path):
    write_tiny_checkpoint(tmp_path / "other", num_layers=1, hidden_size=32, vocab_size=300)
    with pytest.raises(ValueError, match="same tokenizer"):
        load_draft_model(tmp_path / "other", 512)


# ---------------------------------------------------------------- speculative sampling's distribution

DRAWS = 2000
CHI_SQUARE_LIMIT = 24.3  # chi-square with 7 degrees of freedom at p = 0.001


def _chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's statistic over the tokens expected at least 5 times (the rest pooled)."""
    expected = probabilities * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expect = torch.cat([expected[keep], expected[~keep].sum()[None]])
    keep_pool = expect > 0
    return float(((observed - expect) ** 2 / expect)[keep_pool].sum())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_speculative_sampling_keeps_the_target_distribution(checkpoints, kind):
    """Many seeded draws of the first two tokens; their frequencies match the target model's
    exact distributions (and differ from the draft's, so the test can tell)."""
    target_dir, draft_dir = checkpoints
    model = load_local_model(target_dir)
    draft_model = load_draft_model(draft_dir, model.config.vocab_size)
    vocab, top_k = model.config.vocab_size, 8
    first = torch.zeros(vocab)
    pairs: dict[int, torch.Tensor] = {}

    async def draws():
        drafter = PromptLookup() if kind == "lookup" else DraftModel(draft_model)
        for seed in range(DRAWS):
            sampling = Sampling(temperature=1.0, top_k=top_k, seed=seed)
            output, _ = await _speculate(model, PROMPT, 3, sampling, drafter)
            a, b = output[0, PROMPT.shape[1] :].tolist()[:2]
            first[a] += 1
            pairs.setdefault(a, torch.zeros(vocab))[b] += 1

    asyncio.run(draws())
    with torch.inference_mode():
        p_first = next_token_probabilities(model(PROMPT)[:, -1], 1.0, top_k)[0]
        mode = int(first.argmax())
        after = torch.cat([PROMPT, torch.tensor([[mode]])], dim=1)
        p_second = next_token_probabilities(model(after)[:, -1], 1.0, top_k)[0]
        q_first = next_token_probabilities(draft_model(PROMPT)[:, -1], 1.0, top_k)[0]
    assert _chi_square(first, p_first) < CHI_SQUARE_LIMIT
    assert _chi_square(pairs[mode], p_second) < CHI_SQUARE_LIMIT
    total_variation = 0.5 * float((first / DRAWS - p_first).abs().sum())
    assert total_variation < 0.05
    if kind == "draft":  # had the drafts simply been kept, the test would see it
        assert _chi_square(first, q_first) > 10 * CHI_SQUARE_LIMIT


# ---------------------------------------------------------------- through real servers


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with three_server_swarm(tmp_path_factory.mktemp("serving")) as swarm:
        yield swarm


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_speculation_through_three_servers_equals_plain_greedy_and_survives_a_sigkill(swarm):
    expected = generate(load_local_model(swarm.checkpoint), PROMPT, NEW_TOKENS)
    draft_dir = swarm.tmp_path / "draft"
    write_tiny_checkpoint(draft_dir, num_layers=1, hidden_size=32, seed=1)
    swarm.join("d", "2:3")
    swarm.wait_online("d")

    async def scenario():
        model = await swarm.connect(listing=("d",))
        async with model:
            plain = await model.generate(PROMPT, NEW_TOKENS)
            drafted = await model.generate(PROMPT, NEW_TOKENS, speculative="draft", draft_model=draft_dir)
            async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
                looked_up = await model.generate(PROMPT, NEW_TOKENS, session=session, speculative="lookup")
                passes = session._step
            # The same with a server of the chain SIGKILLed mid-generation: the replacement is
            # replayed only the accepted tokens, and the output does not change.
            async with model.inference_session(PROMPT.shape[1] + NEW_TOKENS) as session:
                pieces, killed = [PROMPT], None
                async for token in model.stream(PROMPT, NEW_TOKENS, session=session, speculative="lookup"):
                    pieces.append(token)
                    if killed is None and len(pieces) > 6:
                        killed = swarm.name_of(session.route[1][0])
                        swarm.servers[killed].kill()
                failovers = session.failovers
                kept = [sum(value.shape[1] for _, value in hop.history) for hop in session.chain]
                position = session.position
        return plain, drafted, looked_up, passes, torch.cat(pieces, dim=1), killed, failovers, kept, position

    plain, drafted, looked_up, passes, after_kill, killed, failovers, kept, position = asyncio.run(scenario())
    assert torch.equal(plain, expected)
    assert torch.equal(drafted, expected)
    assert torch.equal(looked_up, expected)
    assert passes < NEW_TOKENS  # drafts were accepted: fewer passes along the chain than tokens
    assert killed in ("b", "d") and failovers == 1
    assert torch.equal(after_kill, expected)
    # every hop, the replacement included, keeps exactly the accepted tokens for a replay (the
    # last token is never fed back, as without speculation)
    assert position == PROMPT.shape[1] + NEW_TOKENS - 1
    assert kept == [position] * len(kept)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rolled_back_session_computes_what_a_fresh_one_does(swarm):
    """Rejected positions leave nothing in any server's cache: after a rollback, the next step's
    output equals that of a session that never saw them."""

    async def scenario():
        async with await swarm.connect() as model:
            embed = model.pieces.embed
            with torch.inference_mode():
                prefix, rejected, kept = embed(PROMPT[:, :5]), embed(PROMPT[:, 5:8]), embed(PROMPT[:, 8:9])
            async with model.inference_session(16) as session:
                await session.step(prefix)
                await session.step(rejected)
                session.rollback(5)
                rolled = await session.step(kept)
                history = [[start for start, _ in hop.history] for hop in session.chain]
            async with model.inference_session(16) as fresh:
                await fresh.step(prefix)
                clean = await fresh.step(kept)
        return rolled, clean, history

    rolled, clean, history = asyncio.run(scenario())
    torch.testing.assert_close(rolled, clean, rtol=0, atol=0)
    assert history == [[0, 5]] * len(history)  # the rejected step is gone from every hop's history
