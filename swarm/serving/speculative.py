"""Speculative decoding through the chain: drafts verified several at a time, rejected ones rolled back.

Over a slow link a token costs one pass along the chain, whatever the compute. Here the
client drafts ``k`` tokens cheaply (``swarm/serving/drafting.py``) and sends the last
accepted token plus the drafts as one multi-token step; the servers compute all ``k + 1``
positions in one pass (pushes carry the step like any other), and the client checks each
draft against the target model's own prediction at its position:

- greedy: a draft is accepted while it equals the target's argmax; the first mismatch is
  replaced by the argmax. The output is token-for-token the output of greedy decoding
  without speculation.
- sampling: speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft ``d``
  drawn from ``q`` is accepted with probability ``min(1, p(d) / q(d))``, where ``p`` is the
  target's distribution after temperature / top-k / top-p / repetition penalty; on a
  rejection the token is drawn from ``max(p - q, 0)`` normalized. A deterministic draft
  (prompt lookup) is a point mass ``q``. Each token is distributed exactly as without
  speculation (the same seed draws different tokens, though).

After the check the session rolls back to the accepted length (``InferenceSession.rollback``):
the servers drop the rejected positions with the next step, and a replay after a failure
replays only accepted tokens. Speculation runs one row (batch 1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import torch

from kernels import ClientPieces, next_token_probabilities
from swarm.serving.drafting import Draft, DraftLength, DraftModel, SpeculativeConfig
from swarm.serving.generation import Decode, Detokenizer, Sampling, penalize_repetitions


def _target_logits(
    logits: torch.Tensor, context: list[int], draft: list[int], penalty: float
) -> torch.Tensor:
    """logits (k + 1, vocab) with the repetition penalty each position would have seen."""
    if penalty == 1.0:
        return logits
    rows = []
    for index in range(logits.shape[0]):
        seen = torch.tensor([context + draft[:index]], dtype=torch.int64)
        rows.append(penalize_repetitions(logits[index : index + 1], seen, penalty))
    return torch.cat(rows)


def verify_greedy(logits: torch.Tensor, draft: Sequence[int]) -> tuple[int, int]:
    """(drafts accepted, the token after them) for greedy decoding; logits (k + 1, vocab)."""
    best = logits.argmax(dim=-1).tolist()  # (k + 1,)
    accepted = 0
    while accepted < len(draft) and draft[accepted] == best[accepted]:
        accepted += 1
    return accepted, best[accepted]


def verify_sampled(target: torch.Tensor, draft: Draft, generator: torch.Generator | None) -> tuple[int, int]:
    """(drafts accepted, the token after them) by speculative sampling.

    Args:
        target: (k + 1, vocab) the target's distribution at each position.
        draft: the k drafts and the distribution each was drawn from (None: point masses).
        generator: the sampler's random numbers.
    """
    for index, token in enumerate(draft.tokens):
        drafted = 1.0 if draft.probabilities is None else float(draft.probabilities[index, token])
        if float(torch.rand((), generator=generator)) * drafted < float(target[index, token]):
            continue
        if draft.probabilities is None:
            residual = target[index].clone()
            residual[token] = 0.0
        else:
            residual = (target[index] - draft.probabilities[index]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # only float rounding gets here: p and q agree
            residual = target[index]
        return index, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    last = target[len(draft.tokens)]
    return len(draft.tokens), int(torch.multinomial(last, 1, generator=generator))


async def generate_speculative(
    pieces: ClientPieces,
    session,
    ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    decode: Decode | None,
    eos_token_ids: Sequence[int],
    drafter,
    config: SpeculativeConfig = SpeculativeConfig(),
) -> AsyncIterator[str | torch.Tensor]:
    """``generate_rows`` with speculation: yields text pieces (with ``decode``) or ids (1, 1).

    Args:
        session: an open ``InferenceSession`` of one row (anything with ``step``, ``rollback``,
            ``position`` and ``max_length``).
        drafter: ``PromptLookup`` or ``DraftModel``.
    Raises:
        ValueError: ``ids`` has more than one row.
    """
    if ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding runs one row, got {ids.shape[0]} (pass the prompts as a list)"
        )
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = set(eos_token_ids)
    text = Detokenizer(decode, sampling.stop) if decode is not None else None
    lengths = DraftLength(config)
    context = ids[0].tolist()
    pending = ids.to(torch.int64)  # (1, n): tokens not yet in the servers' caches
    produced = 0
    while produced < max_new_tokens:
        room = min(max_new_tokens - produced - 1, session.max_length - session.position - pending.shape[1])
        wanted = min(lengths.choose(), room)
        if wanted < 1:
            draft = Draft([])
        elif isinstance(drafter, DraftModel):  # a model's forwards: off the loop that serves the sessions
            draft = await asyncio.to_thread(drafter.propose, context, wanted, sampling, generator)
        else:
            draft = drafter.propose(context, wanted, sampling, generator)
        step = torch.cat([pending, torch.tensor([draft.tokens], dtype=torch.int64)], dim=1)  # (1, n + k)
        began = time.perf_counter()
        with torch.inference_mode():
            hidden = pieces.embed(step)  # (1, n + k, hidden)
        output = await session.step(hidden)
        seconds = time.perf_counter() - began
        with torch.inference_mode():
            logits = pieces.logits(output[:, -(len(draft.tokens) + 1) :])[0]  # (k + 1, vocab) float32
            logits = _target_logits(logits, context, draft.tokens, sampling.repetition_penalty)
            if sampling.temperature <= 0:
                accepted, following = verify_greedy(logits, draft.tokens)
            else:
                target = next_token_probabilities(
                    logits, sampling.temperature, sampling.top_k, sampling.top_p
                )
                accepted, following = verify_sampled(target, draft, generator)
        lengths.record(len(draft.tokens), accepted, step.shape[1], seconds)
        # counted back from the end: a soft-prompted session's first step holds more than ``step``
        session.rollback(session.position - (len(draft.tokens) - accepted))
        pending = torch.tensor([[following]], dtype=torch.int64)
        for token in [*draft.tokens[:accepted], following]:
            context.append(token)
            produced += 1
            if text is None:
                yield torch.tensor([[token]], dtype=torch.int64)
                if token in eos or produced == max_new_tokens:
                    return
                continue
            if token in eos:
                if rest := text.flush():
                    yield rest
                return
            delta, stopped = text.add(token)
            if delta:
                yield delta
            if stopped:
                return
            if produced == max_new_tokens:
                break
    if text is not None and (rest := text.flush()):
        yield rest
