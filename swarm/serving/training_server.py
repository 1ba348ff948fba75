"""The server half of fine-tuning: stateless forward and backward of a span, frozen weights.

``TrainingService`` answers ``SpanForward`` and ``SpanBackward`` (``protocol.py``) for
the span an ``InferenceServer`` holds. A backward request carries the span's inputs and
the gradient of its outputs; the service recomputes the forward with autograd (the
client's LoRA adapters applied, ``kernels/lora.py``, and its deep prompts added before
each block, ``kernels/deep_prompts.py``) and returns the gradients of the inputs, of the
adapters and of the prompts. Gradients are asked of those tensors only
(``torch.autograd.grad``), so no server weight gets a gradient or changes, ever;
quantized blocks work the same (the gradient flows through the dequantized weights).

Concurrent requests of different clients with the same shapes run as one batch
(``training_batches.py``); a large graph is checkpointed block by block
(``kernels/span_training.py``) so it keeps one tensor per block.

Memory: the tokens (batch x seq) of the requests in flight, and of forwards whose
activations are kept for their backward (``SpanForward.keep``: the backward then
skips the recomputation; kept ones expire after ``KEEP_SECONDS``), are bounded by the
server's ``--cache-tokens``; a request over the budget is refused with ``ServerBusy``
(the client goes to another holder or retries), and a forward is only kept if it fits.
Adapters are kept by content hash (``adapter_cache.py``) so a backward after its
forward, or every session of a generation (``PutAdapter``), need not resend them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import torch

from kernels.model import BlockSpan
from swarm.serving.adapter_cache import AdapterCache, AdapterStore, ServedAdapter
from swarm.serving.protocol import (
    PutAdapter,
    PutAdapterReply,
    SpanBackward,
    SpanBackwardReply,
    SpanForward,
    SpanForwardReply,
)
from swarm.serving.training_batches import TrainingBatcher, TrainingGraph, TrainingJob
from transport import RequestContext
from transport.errors import MalformedMessage, ServerBusy

KEEP_SECONDS = 60.0  # activations kept for a backward that never comes are dropped after this


class TrainingService:
    """Fine-tuning requests on an ``InferenceServer``'s span.

    Args:
        server: the ``InferenceServer`` (its ``sub_span``, device, dtype and
            ``config.cache_tokens``, the budget of tokens in flight, are used).
    """

    def __init__(
        self, server, cache: AdapterCache | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.server = server
        self.store = AdapterStore(server.model_config, server.device, server.dtype, cache)
        self.adapters = self.store.cache
        self.batcher = TrainingBatcher(server.sub_span, server.config.max_batch_rows)
        self.budget_tokens = server.config.cache_tokens
        self.tokens_in_flight = 0
        self.clock = clock
        self.forwards = 0
        self.backwards = 0
        self.reused_forwards = 0  # backwards that used their forward's kept activations
        self._kept: dict[tuple, tuple[float, int, TrainingGraph]] = {}  # key -> (expires, tokens, graph)
        self.kept_tokens = 0

    def register(self, endpoint) -> None:
        endpoint.add_handler(SpanForward, self._forward)
        endpoint.add_handler(SpanBackward, self._backward)
        endpoint.add_handler(PutAdapter, self._put_adapter)

    async def run(self) -> None:
        """Runs the batcher until cancelled (in the server's task group)."""
        await self.batcher.run()

    def session_adapter(self, start: int, end: int, key: bytes) -> ServedAdapter:
        """The adapters a session on blocks ``[start, end)`` opened with hash ``key`` applies.

        Raises:
            AdapterNotCached: not held: the client uploads them (``PutAdapter``) and opens again.
        """
        return self.store.find(key, end - start)

    async def _put_adapter(self, request: PutAdapter, context: RequestContext) -> PutAdapterReply:
        self._blocks(request)
        self._check_scaling(request)
        adapter = self.store.add(request.adapters, request.lora_scaling, request.end - request.start)
        return PutAdapterReply(adapter_hash=adapter.key)

    async def _forward(self, request: SpanForward, context: RequestContext) -> SpanForwardReply:
        _, hidden, adapter, prompts = self._checked(request)
        kind = "keep" if request.keep else "forward"
        job = TrainingJob(kind, request.start, request.end, hidden, adapter, prompts)
        result = await self._run(hidden, job)
        if request.keep:
            tokens = hidden.shape[0] * hidden.shape[1]
            if self.tokens_in_flight + self.kept_tokens + tokens <= self.budget_tokens:
                key = (request.keep, request.start, request.end, request.adapter_hash)
                self._kept[key] = (self.clock() + KEEP_SECONDS, tokens, result)
                self.kept_tokens += tokens
            output = result.output.detach()
        else:
            output = result
        self.forwards += 1
        return SpanForwardReply(hidden=output.to(request.hidden.dtype).cpu())

    async def _backward(self, request: SpanBackward, context: RequestContext) -> SpanBackwardReply:
        _, hidden, adapter, prompts = self._checked(request)
        if tuple(request.grad_output.shape) != tuple(request.hidden.shape):
            raise MalformedMessage(
                f"grad_output must have the shape of hidden {tuple(request.hidden.shape)}, "
                f"got {tuple(request.grad_output.shape)}"
            )
        _check_finite("grad_output", request.grad_output)
        grad_output = request.grad_output.to(self.server.device, self.server.dtype)
        kept = self._take_kept((request.kept, request.start, request.end, request.adapter_hash))
        if kept is not None and (
            tuple(kept.leaf[kept.rows].shape) != tuple(hidden.shape)
            or (kept.prompts is None) != (prompts is None)
        ):
            kept = None  # not this input's forward: recompute
        if kept is not None:
            result = await self._compute(hidden, lambda: kept.gradients(grad_output))
        else:
            job = TrainingJob("backward", request.start, request.end, hidden, adapter, prompts, grad_output)
            result = await self._run(hidden, job)
        grad_hidden, grad_adapters, grad_prompts = result
        self.backwards += 1
        self.reused_forwards += kept is not None
        dtype = request.hidden.dtype
        return SpanBackwardReply(
            grad_hidden=grad_hidden.to(dtype).cpu(),
            grad_adapters={name: grad.to(dtype).cpu() for name, grad in grad_adapters.items()},
            reused_forward=kept is not None,
            grad_prompts=None if grad_prompts is None else grad_prompts.to(dtype).cpu(),
        )

    def _take_kept(self, key: tuple) -> TrainingGraph | None:
        self._expire_kept()
        entry = self._kept.pop(key, None) if key[0] else None
        if entry is None:
            return None
        self.kept_tokens -= entry[1]
        return entry[2]

    def _expire_kept(self) -> None:
        now = self.clock()
        for key in [key for key, (expires_at, _, _) in self._kept.items() if expires_at < now]:
            self.kept_tokens -= self._kept.pop(key)[1]

    def _blocks(self, request) -> BlockSpan:
        if self.server.blocks is None:
            raise ServerBusy("this server is still loading its blocks")
        return self.server.sub_span(request.start, request.end)

    @staticmethod
    def _check_scaling(request) -> None:
        if not math.isfinite(request.lora_scaling):
            raise MalformedMessage("lora_scaling must be finite")

    def _checked(self, request) -> tuple[BlockSpan, torch.Tensor, ServedAdapter | None, torch.Tensor | None]:
        """The request's blocks, input, adapters and deep prompts, validated, on the device."""
        blocks = self._blocks(request)
        hidden = request.hidden
        self.server.steps.check_hidden(hidden)
        if hidden.shape[1] > self.server.model_config.max_position_embeddings:
            raise MalformedMessage(f"{hidden.shape[1]} tokens exceed the model's maximum length")
        _check_finite("hidden", hidden)
        self._check_scaling(request)
        adapter = self.store.of_request(request, len(blocks.blocks))
        prompts = request.prompts
        if prompts is not None:
            expected = (len(blocks.blocks), f"virtual <= {hidden.shape[1]}", hidden.shape[2])
            if (prompts.dim() != 3 or prompts.shape[0] != len(blocks.blocks) or prompts.shape[2] != hidden.shape[2]
                    or not 1 <= prompts.shape[1] <= hidden.shape[1] or not prompts.is_floating_point()):  # fmt: skip
                raise MalformedMessage(f"prompts must have shape {expected}, got {tuple(prompts.shape)}")
            _check_finite("prompts", prompts)
            prompts = prompts.to(self.server.device, self.server.dtype)
        return blocks, hidden.to(self.server.device, self.server.dtype), adapter, prompts

    async def _run(self, hidden: torch.Tensor, job: TrainingJob):
        return await self._within_budget(hidden, lambda: self.batcher.submit(job))

    async def _compute(self, hidden: torch.Tensor, compute):
        return await self._within_budget(hidden, lambda: asyncio.to_thread(compute))

    async def _within_budget(self, hidden: torch.Tensor, start):
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.budget_tokens:
            raise ServerBusy(f"{tokens} tokens exceed this server's budget of {self.budget_tokens}")
        self._expire_kept()
        if self.tokens_in_flight + self.kept_tokens + tokens > self.budget_tokens:
            raise ServerBusy(f"busy: {self.tokens_in_flight} of {self.budget_tokens} tokens in flight")
        self.tokens_in_flight += tokens
        try:
            return await start()
        except ValueError as error:
            raise MalformedMessage(str(error)) from error
        finally:
            self.tokens_in_flight -= tokens


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise MalformedMessage(f"{name} holds NaN or infinite values")
