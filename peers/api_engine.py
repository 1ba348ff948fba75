"""What `swarm api` asks of the swarm: prompts -> token ids -> a choice's text, via ``RemoteModel``.

This is the only module of the API that calls the inference client, so the HTTP side
does not change when the client does. For each choice it:

- builds the prompt ids (a chat is rendered with the model's own chat template and
  encoded without an extra BOS, as transformers does; a text prompt gets the tokenizer's
  usual special tokens; token ids are checked against the vocabulary);
- streams tokens from the swarm (one inference session per choice, so ``n`` choices and
  concurrent requests are concurrent sessions that the servers batch); a greedy request
  uses prompt-lookup speculation by default (``speculative``): the same tokens in fewer
  passes along the chain, and no drafts while the measured acceptance says they do not pay;
- turns them into text deltas: ends at any of the model's end-of-sequence ids or at a
  stop sequence (never sent), holds back text that may be the start of a stop sequence
  or half of a UTF-8 character.

Leaving the token stream early (stop, eos, an error, or the HTTP client going away and
cancelling us) closes the session at once, which frees the servers' caches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from kernels import TextTokenizer, render_chat
from peers.api_schema import ApiError, CompletionRequest
from swarm.serving.generation import Detokenizer, Sampling


@dataclass(frozen=True)
class ChoiceResult:
    text: str
    finish_reason: str  # "stop" (eos or a stop sequence) or "length"
    completion_tokens: int


class GenerationEngine:
    """Runs choices of API requests on the swarm.

    Args:
        model: a connected ``swarm.serving.RemoteModel``.
        tokenizer: the checkpoint's tokenizer (:func:`kernels.load_tokenizer`).
        default_max_tokens: tokens generated when a request does not say.
        speculative: the drafter for greedy requests ("lookup"), or None for none. Sampled
            requests are not speculated: their tokens would differ from a seed's usual ones.
    """

    def __init__(
        self, model, tokenizer: TextTokenizer, default_max_tokens: int, speculative: str | None = "lookup"
    ):
        self.model = model
        self.speculative = speculative
        self.tokenizer = tokenizer
        self.default_max_tokens = default_max_tokens
        self.context_length = model.model_config.max_position_embeddings
        self.vocab_size = model.model_config.vocab_size

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The prompt's token ids. Raises ApiError(400) for a prompt we cannot encode."""
        from kernels import ChatTemplateError

        if request.chat:
            try:
                text = render_chat(self.tokenizer.chat_template, request.messages, add_generation_prompt=True,
                                   bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
                                   source=self.tokenizer.source)  # fmt: skip
            except ChatTemplateError as error:
                raise ApiError(400, str(error), param="messages") from error
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(request.prompt, str):
            ids = self.tokenizer.encode(request.prompt)
        else:
            ids = list(request.prompt)
            if any(not 0 <= token < self.vocab_size for token in ids):
                raise ApiError(400, f"token ids must be in [0, {self.vocab_size})", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids

    def max_tokens(self, request: CompletionRequest, prompt_tokens: int) -> int:
        """Tokens to generate; ApiError(400, context_length_exceeded) when they do not fit."""
        room = self.context_length - prompt_tokens
        if request.max_tokens is None:
            if room < 1:
                raise self._too_long(prompt_tokens, 1)
            return min(self.default_max_tokens, room)
        if request.max_tokens > room:
            raise self._too_long(prompt_tokens, request.max_tokens)
        return request.max_tokens

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> ApiError:
        return ApiError(
            400,
            f"This model's maximum context length is {self.context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )

    async def run_choice(
        self,
        request: CompletionRequest,
        ids: list[int],
        max_tokens: int,
        seed: int | None,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> ChoiceResult:
        """Generates one choice; ``on_text`` receives each delta as it becomes safe to send."""
        detokenizer = Detokenizer(self.tokenizer.decode, request.stop)
        eos = set(self.model.eos_token_ids)
        reason, count, stopped = "length", 0, False
        async with contextlib.aclosing(self._token_stream(request, ids, max_tokens, seed)) as tokens:
            async for token in tokens:
                count += 1
                if token in eos:
                    reason = "stop"
                    break
                delta, stopped = detokenizer.add(token)
                if delta and on_text is not None:
                    await on_text(delta)
                if stopped:
                    reason = "stop"
                    break
        if not stopped:  # what was held back as a possible stop sequence was not one
            delta = detokenizer.flush()
            if delta and on_text is not None:
                await on_text(delta)
        return ChoiceResult(detokenizer.text, reason, count)

    async def _token_stream(
        self, request: CompletionRequest, ids: list[int], max_tokens: int, seed: int | None
    ):
        """Token ids from the swarm, one inference session (the one call into the client)."""
        # What the request leaves unset: the checkpoint's recommendation, else OpenAI's defaults.
        chosen = {"temperature": 1.0, **self.model.sampling_defaults}
        given = {"temperature": request.temperature, "top_k": request.top_k, "top_p": request.top_p,
                 "repetition_penalty": request.repetition_penalty}  # fmt: skip
        chosen.update({name: value for name, value in given.items() if value is not None})
        sampling = Sampling(**chosen, seed=seed)
        speculative = self.speculative if sampling.temperature == 0 else None
        stream = self.model.stream(torch.tensor([ids], dtype=torch.int64), max_tokens, sampling=sampling,
                                   speculative=speculative)  # fmt: skip
        async with contextlib.aclosing(stream) as tokens:
            async for step in tokens:  # (1, 1) ids
                yield int(step[0, 0])
