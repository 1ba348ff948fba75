"""Local generation with our own model: the baseline that remote generation must match."""

from __future__ import annotations

import torch

from kernels.model import LocalModel


def next_token_probabilities(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution (batch, vocab) float32 that :func:`sample_next_token` samples from
    (``temperature > 0``): logits divided by the temperature, cut to the ``top_k`` best and to
    the smallest set whose probability reaches ``top_p``, softmaxed. Speculative sampling
    accepts or rejects drafts against exactly this distribution."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (always keep the best one).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (batch, vocab) -> (batch,) int64.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by the
    temperature, cut to the ``top_k`` best and to the smallest set whose probability
    reaches ``top_p``, and sampled with ``generator`` (seeded by the caller for
    reproducible runs).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probabilities = next_token_probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: LocalModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt (batch, prompt_len) -> prompt plus up to ``max_new_tokens`` tokens.

    One prefill, then one cached step per token. Rows that produced ``eos_token_id``
    keep emitting it; generation stops early once every row has.
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    cache = model.allocate_cache(batch, prompt_len + max_new_tokens)
    tokens = [input_ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    step_input = input_ids
    for _ in range(max_new_tokens):
        logits = model(step_input, cache)[:, -1]  # (batch, vocab)
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        step_input = next_token[:, None]  # (batch, 1)
        tokens.append(step_input)
        if eos_token_id is not None and bool(finished.all()):
            break
    return torch.cat(tokens, dim=1)
