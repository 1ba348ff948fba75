"""The server half of fine-tuning: stateless forward and backward of a span, frozen weights.

``TrainingService`` answers ``SpanForward`` and ``SpanBackward`` (``protocol.py``) for
the span an ``InferenceServer`` holds. A backward request carries the span's inputs and
the gradient of its outputs; the service recomputes the forward with autograd (the
client's LoRA adapters applied, ``kernels/lora.py``) and returns the gradients of the
inputs and of the adapters. Gradients are asked of those tensors only
(``torch.autograd.grad``), so no server weight gets a gradient or changes, ever;
quantized blocks work the same (the gradient flows through the dequantized weights).

Memory: the tokens (batch x seq) of the requests in flight, and of forwards whose
activations are kept for their backward (``SpanForward.keep``: the backward then
skips the recomputation; kept ones expire after ``KEEP_SECONDS``), are bounded by the
server's ``--cache-tokens``; a request over the budget is refused with ``ServerBusy``
(the client goes to another holder or retries), and a forward is only kept if it fits. Adapters are kept by content hash in an
``AdapterCache`` (bounded, expiring) so a backward after its forward, or every step of
a generation, need not resend them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.lora import adapter_hash, check_span_tensors, lora_applied
from kernels.model import BlockSpan
from swarm.serving.protocol import (
    AdapterNotCached,
    SpanBackward,
    SpanBackwardReply,
    SpanForward,
    SpanForwardReply,
)
from transport import RequestContext
from transport.errors import MalformedMessage, ServerBusy

ADAPTER_CACHE_ENTRIES = 64  # span adapters kept at once (a few clients, a few steps each)
ADAPTER_CACHE_SECONDS = 600.0  # an adapter unused this long is dropped
KEEP_SECONDS = 60.0  # activations kept for a backward that never comes are dropped after this


class AdapterCache:
    """Adapters by content hash, least recently used first out, expiring when unused.

    Args:
        max_entries: entries kept at most.
        ttl: seconds an entry lives after its last use.
        clock: seconds, monotonic (injected in tests).
    """

    def __init__(
        self, max_entries: int = ADAPTER_CACHE_ENTRIES, ttl: float = ADAPTER_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        self.max_entries, self.ttl, self.clock = max_entries, ttl, clock
        self._entries: OrderedDict[bytes, tuple[float, dict[str, torch.Tensor], float]] = OrderedDict()

    def put(self, key: bytes, tensors: dict[str, torch.Tensor], scaling: float) -> None:
        self._expire()
        self._entries[key] = (self.clock(), tensors, scaling)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, key: bytes) -> tuple[dict[str, torch.Tensor], float] | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries[key] = (self.clock(), entry[1], entry[2])
        self._entries.move_to_end(key)
        return entry[1], entry[2]

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def _expire(self) -> None:
        now = self.clock()
        for key in [key for key, (used, _, _) in self._entries.items() if now - used > self.ttl]:
            del self._entries[key]


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
        self.adapters = cache or AdapterCache()
        self.budget_tokens = server.config.cache_tokens
        self.tokens_in_flight = 0
        self.clock = clock
        self.forwards = 0
        self.backwards = 0
        self.reused_forwards = 0  # backwards that used their forward's kept activations
        self._kept: dict[tuple, _Kept] = {}
        self.kept_tokens = 0

    def register(self, endpoint) -> None:
        endpoint.add_handler(SpanForward, self._forward)
        endpoint.add_handler(SpanBackward, self._backward)

    async def _forward(self, request: SpanForward, context: RequestContext) -> SpanForwardReply:
        blocks, hidden = self._checked(request, request.hidden)
        adapters = self._adapters(request, len(blocks.blocks))
        if request.keep:
            graph = await self._run(hidden, lambda: _graph(blocks, hidden, adapters))
            tokens = hidden.shape[0] * hidden.shape[1]
            if self.tokens_in_flight + self.kept_tokens + tokens <= self.budget_tokens:
                key = (request.keep, request.start, request.end, request.adapter_hash)
                self._kept[key] = _Kept(self.clock() + KEEP_SECONDS, tokens, *graph)
                self.kept_tokens += tokens
            output = graph[0].detach()
        else:

            def run() -> torch.Tensor:
                with torch.no_grad(), _maybe_lora(blocks, adapters):
                    return blocks(hidden)

            output = await self._run(hidden, run)
        self.forwards += 1
        return SpanForwardReply(hidden=output.to(request.hidden.dtype).cpu())

    async def _backward(self, request: SpanBackward, context: RequestContext) -> SpanBackwardReply:
        blocks, hidden = self._checked(request, request.hidden)
        if tuple(request.grad_output.shape) != tuple(request.hidden.shape):
            raise MalformedMessage(
                f"grad_output must have the shape of hidden {tuple(request.hidden.shape)}, "
                f"got {tuple(request.grad_output.shape)}"
            )
        _check_finite("grad_output", request.grad_output)
        grad_output = request.grad_output.to(self.server.device, self.server.dtype)
        adapters = self._adapters(request, len(blocks.blocks))
        kept = self._take_kept((request.kept, request.start, request.end, request.adapter_hash))
        if kept is not None and tuple(kept.leaf.shape) != tuple(hidden.shape):
            kept = None  # not this input's forward: recompute

        def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            output, leaf, trained = (
                (kept.output, kept.leaf, kept.trained) if kept else _graph(blocks, hidden, adapters)
            )
            names = list(trained)
            with torch.enable_grad():
                grads = torch.autograd.grad(output, [leaf, *(trained[n] for n in names)], grad_output)
            return grads[0], dict(zip(names, grads[1:], strict=True))

        grad_hidden, grad_adapters = await self._run(hidden, run)
        self.backwards += 1
        self.reused_forwards += kept is not None
        dtype = request.hidden.dtype
        return SpanBackwardReply(
            grad_hidden=grad_hidden.to(dtype).cpu(),
            grad_adapters={name: grad.to(dtype).cpu() for name, grad in grad_adapters.items()},
            reused_forward=kept is not None,
        )

    def _take_kept(self, key: tuple) -> _Kept | None:
        self._expire_kept()
        kept = self._kept.pop(key, None) if key[0] else None
        if kept is not None:
            self.kept_tokens -= kept.tokens
        return kept

    def _expire_kept(self) -> None:
        now = self.clock()
        for key in [key for key, kept in self._kept.items() if kept.expires_at < now]:
            self.kept_tokens -= self._kept.pop(key).tokens

    def _checked(self, request, hidden: torch.Tensor) -> tuple[BlockSpan, torch.Tensor]:
        if self.server.blocks is None:
            raise ServerBusy("this server is still loading its blocks")
        blocks = self.server.sub_span(request.start, request.end)
        self.server.steps.check_hidden(hidden)
        if hidden.shape[1] > self.server.model_config.max_position_embeddings:
            raise MalformedMessage(f"{hidden.shape[1]} tokens exceed the model's maximum length")
        _check_finite("hidden", hidden)
        if not math.isfinite(request.lora_scaling):
            raise MalformedMessage("lora_scaling must be finite")
        return blocks, hidden.to(self.server.device, self.server.dtype)

    def _adapters(self, request, n_blocks: int) -> tuple[dict[str, torch.Tensor], float] | None:
        """The request's adapters on the device (cached by hash), or None without adapters."""
        if request.adapters:
            try:
                check_span_tensors(self.server.model_config, request.adapters, n_blocks)
            except ValueError as error:
                raise MalformedMessage(f"adapters: {error}") from error
            key = adapter_hash(request.adapters, request.lora_scaling)
            if request.adapter_hash and request.adapter_hash != key:
                raise MalformedMessage("adapter_hash does not match the adapters sent")
            tensors = {n: t.to(self.server.device, self.server.dtype) for n, t in request.adapters.items()}
            self.adapters.put(key, tensors, request.lora_scaling)
            return tensors, request.lora_scaling
        if not request.adapter_hash:
            return None
        cached = self.adapters.get(request.adapter_hash)
        if cached is None:
            raise AdapterNotCached("this server does not hold that adapter (any more): send it")
        tensors, scaling = cached
        first = next(iter(tensors.values()))
        if first.shape[0] != n_blocks:
            raise MalformedMessage(f"the cached adapter covers {first.shape[0]} blocks, not {n_blocks}")
        return tensors, scaling

    async def _run(self, hidden: torch.Tensor, compute):
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.budget_tokens:
            raise ServerBusy(f"{tokens} tokens exceed this server's budget of {self.budget_tokens}")
        self._expire_kept()
        if self.tokens_in_flight + self.kept_tokens + tokens > self.budget_tokens:
            raise ServerBusy(f"busy: {self.tokens_in_flight} of {self.budget_tokens} tokens in flight")
        self.tokens_in_flight += tokens
        try:
            return await asyncio.to_thread(compute)
        except ValueError as error:
            raise MalformedMessage(str(error)) from error
        finally:
            self.tokens_in_flight -= tokens


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise MalformedMessage(f"{name} holds NaN or infinite values")


@dataclass
class _Kept:
    """A forward's autograd graph, kept for its backward."""

    expires_at: float
    tokens: int
    output: torch.Tensor
    leaf: torch.Tensor
    trained: dict[str, torch.Tensor]


def _graph(blocks: BlockSpan, hidden: torch.Tensor, adapters):
    """The span's forward with autograd: (output, input leaf, adapter leaves by name)."""
    with torch.enable_grad():
        leaf = hidden.detach().requires_grad_(True)
        trained = {} if adapters is None else {
            name: tensor.detach().requires_grad_(True) for name, tensor in adapters[0].items()
        }  # fmt: skip
        with _maybe_lora(blocks, None if adapters is None else (trained, adapters[1])):
            output = blocks(leaf)
    return output, leaf, trained


def _maybe_lora(blocks: BlockSpan, adapters: tuple[dict[str, torch.Tensor], float] | None):
    if adapters is None:
        return contextlib.nullcontext()
    return lora_applied(blocks, adapters[0], adapters[1])
