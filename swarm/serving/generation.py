"""The client's token loop: embed -> the swarm's blocks -> norm + head -> sample.

``Sampling`` says how the next token is picked; ``generate_rows`` runs the loop over an
open ``InferenceSession`` with only the pieces it needs: the local embeddings and head,
a decoder for text, and the end-of-sequence id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch

from kernels import ClientPieces, sample_next_token
from swarm.serving.session import InferenceSession

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked (``temperature == 0``: greedy).

    Attributes:
        temperature: 0 is greedy; otherwise sampling with ``top_k`` / ``top_p``.
        top_k: sample among the k most likely tokens (None: all).
        top_p: nucleus sampling mass (None: off).
        repetition_penalty: >1 discourages tokens already seen (CTRL-style).
        stop: texts that end generation (not included in the result).
        seed: seeds the sampler for reproducible output.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: logits (batch, vocab) of tokens in seen (batch, n) are
    divided by ``penalty`` when positive, multiplied when negative."""
    if penalty == 1.0:
        return logits
    chosen = logits.gather(1, seen)  # (batch, n)
    chosen = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits.scatter(1, seen, chosen)


async def generate_rows(
    pieces: ClientPieces,
    session: InferenceSession,
    ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    decode: Decode | None,
    eos_token_id: int | None,
) -> AsyncIterator[str | torch.Tensor]:
    """Yields new text pieces (with ``decode``) or new ids (batch, 1) (without) until done.

    Rows that produced ``eos_token_id`` keep emitting it (ids) and generation stops once
    every row has; text stops at the end token or a stop string.
    """
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    eos = eos_token_id
    seen = ids
    step_input = ids  # (batch, tokens)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    produced: list[int] = []
    emitted = ""
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            hidden = pieces.embed(step_input)  # (batch, tokens, hidden)
        output = await session.step(hidden)
        with torch.inference_mode():
            logits = pieces.logits(output)[:, -1]  # (batch, vocab) float32
            logits = penalize_repetitions(logits, seen, sampling.repetition_penalty)
            token = sample_next_token(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        if eos is not None:
            token = torch.where(finished, torch.full_like(token, eos), token)
            finished |= token == eos
        step_input = token[:, None]  # (batch, 1)
        seen = torch.cat([seen, step_input], dim=1)
        if decode is None:
            yield step_input
            if eos is not None and bool(finished.all()):
                return
            continue
        if eos is not None and bool(finished[0]):
            return
        produced.append(int(token[0]))
        text = decode(produced)
        cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
        if cut >= 0:
            if cut > len(emitted):
                yield text[len(emitted) : cut]
            return
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            yield text[len(emitted) :]
            emitted = text
