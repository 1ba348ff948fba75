"""The client's token loop: embed -> the swarm's blocks -> norm + head -> sample.

``Sampling`` says how the next token is picked; ``generate_rows`` runs the loop over an
open ``InferenceSession`` with only the pieces it needs: the local embeddings and head,
a decoder for text, and the end-of-sequence ids (a chat model may have several: Llama 3
Instruct ends a turn with ``<|eot_id|>`` and a text with ``<|end_of_text|>``).
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


class Detokenizer:
    """Token ids -> the text deltas that are safe to show, ending at a stop sequence.

    Text that may be the start of a stop sequence, or half of a UTF-8 character, is held
    back until the next token decides; a stop sequence itself is never shown.

    Args:
        decode: ids -> text.
        stop: texts that end generation.
    """

    def __init__(self, decode: Decode, stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything shown so far

    def add(self, token: int) -> tuple[str, bool]:
        """Appends ``token``; returns (new text to show, whether a stop sequence ended it)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            return self._advance(text[:cut]), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        end = len(text) - hold
        while end > 0 and text[end - 1] == "\ufffd":  # half a character: wait for the rest
            end -= 1
        return self._advance(text[:end]), False

    def flush(self) -> str:
        """What was held back, once generation ended without a stop sequence."""
        return self._advance(self.decode(self.ids))

    def _advance(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta, self.text = upto[len(self.text) :], upto
        return delta


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
    eos_token_ids: Sequence[int] = (),
) -> AsyncIterator[str | torch.Tensor]:
    """Yields new text pieces (with ``decode``) or new ids (batch, 1) (without) until done.

    Rows that produced any of ``eos_token_ids`` keep emitting the first of them (ids) and
    generation stops once every row has; text stops at an end token or a stop string.
    """
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    eos = eos_token_ids[0] if eos_token_ids else None
    eos_set = torch.tensor(list(eos_token_ids), dtype=torch.int64)
    seen = ids
    step_input = ids  # (batch, tokens)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    text = Detokenizer(decode, sampling.stop) if decode is not None else None
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
            finished |= torch.isin(token, eos_set)
        step_input = token[:, None]  # (batch, 1)
        seen = torch.cat([seen, step_input], dim=1)
        if decode is None:
            yield step_input
            if eos is not None and bool(finished.all()):
                return
            continue
        if eos is not None and bool(finished[0]):
            break
        delta, stopped = text.add(int(token[0]))
        if delta:
            yield delta
        if stopped:
            return
    if text is not None and (rest := text.flush()):
        yield rest
