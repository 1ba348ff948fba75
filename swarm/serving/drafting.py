"""Drafters for speculative decoding: cheap guesses of the next tokens, made on the client.

A drafter proposes up to ``count`` tokens that may follow a context; the swarm then
verifies them all in one pass along the chain (``swarm/serving/speculative.py``).

- ``PromptLookup``: prompt lookup / n-gram drafting (Saxena 2023, "prompt lookup
  decoding"): find the latest earlier occurrence of the context's last n tokens and
  propose what followed it. No model; strong on code and on text that repeats its context.
- ``DraftModel``: a small local model with the same tokenizer (``draft_model=DIR``), run
  with our kernels' ``LocalModel`` and its own key/value cache, kept in step with the context.

``DraftLength`` chooses how many tokens to draft from the measured acceptance rate and the
measured cost of a verified token, and drafts nothing while drafting does not pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import KVCache, LocalModel, load_config, load_local_model, next_token_probabilities


@dataclass(frozen=True)
class Draft:
    """Proposed tokens and, for sampled drafts, the distribution each was drawn from.

    Attributes:
        tokens: the proposed ids, in order.
        probabilities: (len(tokens), vocab) float32 the drafter sampled each token from;
            None when the tokens were chosen deterministically (a point mass on each).
    """

    tokens: list[int]
    probabilities: torch.Tensor | None = None


@dataclass(frozen=True)
class SpeculativeConfig:
    """How the client drafts.

    Attributes:
        max_draft: drafted tokens per pass at most.
        ngram_max: longest context suffix prompt lookup matches.
        ngram_min: shortest context suffix prompt lookup matches.
        token_cost: prior for a verified token's cost relative to a one-token pass, until
            passes of different lengths were timed (over a 100 ms link it is ~0.01).
        probe_every: while drafting does not pay, every this many passes draft one token so
            the acceptance rate keeps being measured.
    """

    max_draft: int = 8
    ngram_max: int = 3
    ngram_min: int = 1
    token_cost: float = 0.05
    probe_every: int = 8

    def __post_init__(self) -> None:
        if self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")


class PromptLookup:
    """Proposes the tokens that followed the latest earlier occurrence of the context's suffix.

    Tries suffixes of ``ngram_max`` tokens down to ``ngram_min``; proposes nothing without a
    match. A match close to the end continues its pattern (``abcabc`` -> ``abca...``).
    """

    def __init__(self, config: SpeculativeConfig = SpeculativeConfig()):
        self.config = config

    def propose(self, context: Sequence[int], count: int, sampling=None, generator=None) -> Draft:
        if count < 1:
            return Draft([])
        context = list(context)
        for size in range(min(self.config.ngram_max, len(context) - 1), self.config.ngram_min - 1, -1):
            suffix = context[-size:]
            # latest start before the suffix itself whose n tokens equal it
            for start in range(len(context) - size - 1, -1, -1):
                if context[start : start + size] == suffix:
                    return Draft(_copy_from(context, start + size, count))
        return Draft([])


def _copy_from(context: list[int], source: int, count: int) -> list[int]:
    """``count`` tokens copied from ``context[source:]`` onward, running on into the copy itself
    when the source reaches the end (as an LZ77 match may overlap its own output): a match just
    behind the end continues the repeating pattern it is part of."""
    copied: list[int] = []
    for offset in range(count):
        index = source + offset
        copied.append(context[index] if index < len(context) else copied[index - len(context)])
    return copied


def load_draft_model(directory: str | Path, vocab_size: int) -> LocalModel:
    """The draft model of ``directory`` (a checkpoint folder), float32 on the CPU.

    Raises:
        ValueError: its vocabulary differs from the target's (it needs the same tokenizer).
    """
    config = load_config(directory)
    if config.vocab_size != vocab_size:
        raise ValueError(f"the draft model {directory} has {config.vocab_size} tokens, the model "
                         f"{vocab_size}: a draft model needs the same tokenizer")  # fmt: skip
    return load_local_model(directory).eval()


class DraftModel:
    """Drafts with a small local model; its cache follows the context across passes.

    Greedy requests draft greedily (point masses); sampled ones draw each draft from the
    draft model's distribution under the same temperature / top-k / top-p, which
    ``Draft.probabilities`` records for the accept/reject test.

    Args:
        model: the draft model (``load_draft_model``).
    """

    def __init__(self, model: LocalModel):
        self.model = model
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # the tokens the cache holds, in order

    @torch.inference_mode()
    def propose(self, context: Sequence[int], count: int, sampling=None, generator=None) -> Draft:
        if count < 1:
            return Draft([])
        context = list(context)
        self._reserve(len(context) + count)
        common = 0
        for mine, theirs in zip(self.cached, context, strict=False):
            if mine != theirs:
                break
            common += 1
        common = min(common, len(context) - 1)  # refeed at least one token for its logits
        self.cache.truncate(common)
        self.cached = context[:common]
        feed = context[common:]
        tokens: list[int] = []
        probabilities: list[torch.Tensor] = []
        sampled = sampling is not None and sampling.temperature > 0
        for _ in range(count):
            logits = self.model(torch.tensor([feed]), self.cache)[:, -1]  # (1, vocab)
            self.cached.extend(feed)
            if sampled:
                distribution = next_token_probabilities(
                    logits, sampling.temperature, sampling.top_k, sampling.top_p
                )
                token = int(torch.multinomial(distribution, 1, generator=generator))
                probabilities.append(distribution[0])
            else:
                token = int(logits.argmax(dim=-1))
            tokens.append(token)
            feed = [token]
        return Draft(tokens, torch.stack(probabilities) if sampled else None)

    def _reserve(self, length: int) -> None:
        """A cache for ``length`` tokens (a new, longer one starts over)."""
        if self.cache is None or self.cache.max_length < length:
            limit = self.model.config.max_position_embeddings
            self.cache = self.model.allocate_cache(1, min(limit, max(256, 2 * length)))
            self.cached = []


class DraftLength:
    """Chooses the draft length from measured acceptance and measured pass cost.

    With a per-token acceptance rate ``a``, ``k`` drafts yield ``(1 - a^(k+1)) / (1 - a)``
    tokens per pass (Leviathan et al. 2023); a pass of ``n`` tokens costs ``1 + c (n - 1)``
    one-token passes, ``c`` fitted from the timed passes. The chosen ``k`` maximizes tokens
    per cost; when that is ``k = 0`` (drafting does not pay), a one-token probe every
    ``probe_every`` passes keeps the rate measured.
    """

    DECAY = 0.9  # weight of the past per pass: the estimates follow what the text does now

    def __init__(self, config: SpeculativeConfig = SpeculativeConfig()):
        self.config = config
        self.accepted, self.rejected = 1.0, 1.0  # a prior of one each
        self._timings = [0.0] * 5  # decayed sums: weight, n, seconds, n*n, n*seconds
        self._idle_passes = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def token_cost(self) -> float:
        """A verified token's cost relative to a one-token pass (measured, else the prior)."""
        weight, n, seconds, nn, ns = self._timings
        variance = weight * nn - n * n
        if weight < 2 or variance < 1e-6 * max(weight * nn, 1.0):
            return self.config.token_cost
        slope = (weight * ns - n * seconds) / variance
        intercept = (seconds - slope * n) / weight
        base = intercept + slope  # a one-token pass
        return min(max(slope / base, 0.0), 1.0) if base > 0 else self.config.token_cost

    def choose(self) -> int:
        rate, cost = min(self.acceptance_rate, 0.999), self.token_cost
        gains = [
            (1 - rate ** (k + 1)) / (1 - rate) / (1 + cost * k) for k in range(self.config.max_draft + 1)
        ]
        best = max(range(len(gains)), key=gains.__getitem__)
        if best == 0:
            self._idle_passes += 1
            if self._idle_passes >= self.config.probe_every:
                self._idle_passes = 0
                return 1
        return best

    def record(self, proposed: int, accepted: int, tokens: int, seconds: float) -> None:
        """One verified pass: ``proposed`` drafts of which ``accepted`` held, ``tokens`` sent."""
        if proposed:
            self.accepted = self.DECAY * self.accepted + accepted
            self.rejected = self.DECAY * self.rejected + (1 if accepted < proposed else 0)
        if tokens <= self.config.max_draft + 1:  # a prefill is no sample of a pass's cost
            self._timings = [self.DECAY * value for value in self._timings]
            for index, value in enumerate((1.0, tokens, seconds, tokens * tokens, tokens * seconds)):
                self._timings[index] += value


def make_drafter(kind: str, draft_model: LocalModel | None, config: SpeculativeConfig):
    """The drafter ``kind`` names ("lookup" or "draft").

    Raises:
        ValueError: an unknown kind, or "draft" without a draft model.
    """
    if kind == "lookup":
        return PromptLookup(config)
    if kind == "draft":
        if draft_model is None:
            raise ValueError(
                'speculative="draft" needs draft_model=DIR (a small model with the same tokenizer)'
            )
        return DraftModel(draft_model)
    raise ValueError(f'speculative must be "lookup", "draft" or None, got {kind!r}')
