"""The client half of fine-tuning: the swarm's blocks inside torch autograd, with failover.

``RemoteTraining`` runs ``ids -> logits`` with the client's pieces (embeddings, norm,
head: frozen), an optional soft prompt (``kernels/prompt_tuning.py``) and LoRA
adapters (``kernels/lora.py``), the blocks on servers. Every hop of the route is one
``torch.autograd.Function`` (``_SpanHop``): its forward is a ``SpanForward`` to the
server, its backward a ``SpanBackward`` (the server recomputes the span's forward and
returns the gradients of its input and of the hop's adapters). The client owns every
trainable tensor and the optimizer; servers keep nothing but a cache of adapters by
content hash, so a backward names the hash its forward sent.

Failover: a hop whose server fails (killed, timed out, busy) bans it and runs the same
span on another chain covering exactly those blocks (a chain of several servers for a
backward runs the forward of the first ones again to get their inputs). The result is
the same computation on the same frozen weights, so the gradients are the same.

Torch's autograd is synchronous and the network is asyncio: ``forward`` and
``backward`` block the calling thread and run the requests on the model's event loop,
so call them from another thread (``await asyncio.to_thread(step)``), or use
``connect_in_thread`` which runs the loop in a thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import torch

from kernels.deep_prompts import DeepPrompt
from kernels.lora import LoraAdapters, adapter_hash
from swarm import NoRouteError, ServerRecord, Span, find_route
from swarm.serving.protocol import SpanBackward, SpanForward
from swarm.serving.server_pool import ServerPool
from swarm.serving.settings import ClientConfig
from transport.errors import RemoteError, SwarmError

logger = logging.getLogger(__name__)


def _retryable(error: BaseException) -> bool:
    return isinstance(error, SwarmError) and error.retryable


def _is_adapter_missing(error: BaseException) -> bool:
    return isinstance(error, RemoteError) and error.kind == "AdapterNotCached"


class _HopFailed(Exception):
    def __init__(self, server: ServerRecord, error: SwarmError):
        super().__init__(f"{server.peer_id}: {error}")
        self.server, self.error = server, error


class SpanClient:
    """Stateless forward/backward of block spans on servers, with adapter caching and failover.

    Args:
        servers: the model's ``ServerPool`` (listing, bans, connections).
        config: deadlines (``step_timeout``, ``route_wait``) and ``replay_attempts``.
    """

    def __init__(self, servers: ServerPool, config: ClientConfig):
        self.servers, self.config = servers, config
        self.failovers = 0
        self.reused_forwards = 0  # backwards whose server kept the forward's activations
        # The adapter hash each (peer, start, end) was last sent: one entry per server span.
        self._sent: dict[tuple[str, int, int], bytes] = {}

    async def route(self, start: int, end: int) -> list[tuple[ServerRecord, Span]]:
        """A chain covering ``[start, end)``, waiting up to ``route_wait`` for coverage.

        The first try reads the pool's live view (no DHT lookup while it is fresh; a ban makes it
        stale), later tries a new listing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.route_wait
        first = True
        while True:
            listed = await (self.servers.view() if first else self.servers.list())
            first = False
            try:
                hops = find_route(listed.values(), start, end, excluded=self.servers.banned())
                return [(hop.server, hop.span) for hop in hops]
            except NoRouteError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(self.config.route_poll)  # polling the DHT under a deadline

    async def forward(
        self, span: Span, server: ServerRecord | None, hidden: torch.Tensor,
        adapters: dict[str, torch.Tensor], scaling: float, keep: bytes = b"", prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ServerRecord | None]:  # fmt: skip
        """Runs ``span`` over ``hidden`` on ``server`` (or another chain if it fails).

        Args:
            keep: a token under which the server keeps the activations for the backward.
            prompts: deep prompts of the span's blocks (blocks, virtual, hidden), or None.
        Returns:
            the output, and the server that ran the whole span (None if a chain did).
        """
        return await self._with_failover(
            span, server, lambda route: self._forward_route(route, hidden, adapters, scaling, keep, prompts)
        )

    async def backward(
        self, span: Span, server: ServerRecord | None, hidden: torch.Tensor, grad_output: torch.Tensor,
        adapters: dict[str, torch.Tensor], scaling: float, kept: bytes = b"", prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:  # fmt: skip
        """Gradients of ``span``'s input, adapters and deep prompts on ``server`` (or another chain if
        it fails); the prompts' is None without prompts.

        ``kept``: the forward's ``keep`` token (that server skips recomputing the forward).
        """
        result, _ = await self._with_failover(
            span,
            server,
            lambda route: self._backward_route(route, hidden, grad_output, adapters, scaling, kept, prompts),
        )
        return result

    async def _with_failover(self, span: Span, server: ServerRecord | None, run):
        route = [(server, span)] if server is not None else None
        for attempt in range(1, self.config.replay_attempts + 2):
            if route is None or any(hop.peer_id in self.servers.banned() for hop, _ in route):
                route = await self.route(span.start, span.end)
            try:
                result = await run(route)
                return result, route[0][0] if len(route) == 1 else None
            except _HopFailed as failed:
                if not _retryable(failed.error) or attempt > self.config.replay_attempts:
                    raise failed.error from None
                logger.warning("server %s failed on blocks %s: %s; retrying elsewhere",
                               failed.server.peer_id, span, failed.error)  # fmt: skip
                self.servers.ban(failed.server.peer_id)
                self.failovers += 1
                route = None
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _forward_route(self, route, hidden, adapters, scaling, keep: bytes, prompts) -> torch.Tensor:
        for server, span in route:
            message = dict(start=span.start, end=span.end, hidden=hidden, keep=keep if len(route) == 1 else b"",
                           prompts=_sub_prompts(prompts, route[0][1], span))  # fmt: skip
            reply = await self._call(
                server, SpanForward, message, _sub_adapters(adapters, route[0][1], span), scaling
            )
            hidden = reply.hidden
        return hidden

    async def _backward_route(self, route, hidden, grad_output, adapters, scaling, kept: bytes, prompts):
        inputs = [hidden]
        for server, span in route[:-1]:  # a chain: recompute the inputs of its later hops
            message = dict(start=span.start, end=span.end, hidden=inputs[-1],
                           prompts=_sub_prompts(prompts, route[0][1], span))  # fmt: skip
            sub = _sub_adapters(adapters, route[0][1], span)
            inputs.append((await self._call(server, SpanForward, message, sub, scaling)).hidden)
        grads: list[dict[str, torch.Tensor]] = []
        grad_prompts: list[torch.Tensor] = []
        for (server, span), span_input in zip(reversed(route), reversed(inputs), strict=True):
            message = dict(start=span.start, end=span.end, hidden=span_input, grad_output=grad_output,
                           kept=kept if len(route) == 1 else b"",
                           prompts=_sub_prompts(prompts, route[0][1], span))  # fmt: skip
            sub = _sub_adapters(adapters, route[0][1], span)
            reply = await self._call(server, SpanBackward, message, sub, scaling)
            self.reused_forwards += reply.reused_forward
            grad_output = reply.grad_hidden
            grads.insert(0, reply.grad_adapters)
            if prompts is not None:
                if reply.grad_prompts is None:
                    raise _HopFailed(
                        server, RemoteError("MalformedMessage", "no gradient of the prompts came back")
                    )
                grad_prompts.insert(0, reply.grad_prompts)
        joined = {name: torch.cat([g[name] for g in grads]) for name in adapters}
        return grad_output, joined, torch.cat(grad_prompts) if prompts is not None else None

    async def _call(
        self, server: ServerRecord, kind, fields: dict, adapters: dict[str, torch.Tensor], scaling
    ):
        """One request; adapters go by hash when this server was sent them before."""
        key = adapter_hash(adapters, scaling) if adapters else b""
        where = (server.peer_id, fields["start"], fields["end"])
        known = self._sent.get(where) == key
        for resend in (False, True):
            inline = bool(adapters) and (resend or not known)
            message = kind(
                **fields, adapter_hash=key, adapters=adapters if inline else None, lora_scaling=scaling
            )
            try:
                connection = await self.servers.connection_to(server)
                reply = await connection.call(message, timeout=self.config.step_timeout)
            except SwarmError as error:
                if _is_adapter_missing(error) and not resend:
                    continue
                raise _HopFailed(server, error) from error
            if adapters:
                self._sent[where] = key
            return reply
        raise AssertionError("unreachable")


def _sub_adapters(adapters: dict[str, torch.Tensor], whole: Span, part: Span) -> dict[str, torch.Tensor]:
    """The adapters of blocks ``part`` out of those of ``whole`` (stacked on dim 0)."""
    lo, hi = part.start - whole.start, part.end - whole.start
    return {name: tensor[lo:hi].contiguous() for name, tensor in adapters.items()}


def _sub_prompts(prompts: torch.Tensor | None, whole: Span, part: Span) -> torch.Tensor | None:
    """The deep prompts of blocks ``part`` out of those of ``whole``."""
    return (
        None if prompts is None else prompts[part.start - whole.start : part.end - whole.start].contiguous()
    )


class _SpanHop(torch.autograd.Function):
    """One hop of the route: forward and backward of a span on a server."""

    @staticmethod
    def forward(ctx, hop: _HopContext, hidden: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        # values: the adapters' tensors (in hop.names' order), then the deep prompts if any
        adapters = dict(zip(hop.names, (v.detach() for v in values[: len(hop.names)]), strict=True))
        prompts = values[-1].detach() if hop.prompted else None
        keep = secrets.token_bytes(8) if hop.needs_grad else b""
        output, server = hop.run(
            hop.client.forward(hop.span, hop.server, hidden.detach(), adapters, hop.scaling, keep, prompts)
        )
        # The backward goes where the forward ran (its activations may be kept there).
        hop.kept = keep if server is not None else b""
        hop.server = server or hop.server
        ctx.hop, ctx.adapters, ctx.prompts = hop, adapters, prompts
        ctx.save_for_backward(hidden)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (hidden,) = ctx.saved_tensors
        hop = ctx.hop
        grad_hidden, grad_adapters, grad_prompts = hop.run(hop.client.backward(
            hop.span, hop.server, hidden.detach(), grad_output.contiguous(), ctx.adapters, hop.scaling, hop.kept,
            ctx.prompts,
        ))  # fmt: skip
        extra = (grad_prompts,) if hop.prompted else ()
        return (None, grad_hidden, *(grad_adapters[name] for name in hop.names), *extra)


class _HopContext:
    def __init__(self, client: SpanClient, loop, span: Span, server: ServerRecord, names, scaling: float,
                 needs_grad: bool, prompted: bool = False):  # fmt: skip
        self.client, self.loop, self.span, self.server = client, loop, span, server
        self.names, self.scaling, self.needs_grad, self.prompted = names, scaling, needs_grad, prompted
        self.kept = b""

    def run(self, coroutine):
        return run_on_loop(self.loop, coroutine)


def run_on_loop(loop: asyncio.AbstractEventLoop, coroutine):
    """Runs ``coroutine`` on ``loop`` (another thread's) and waits for its result.

    Raises:
        RuntimeError: called on ``loop``'s own thread (it would wait for itself).
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coroutine.close()
        raise RuntimeError(
            "RemoteModel.forward/backward block: call them from a worker thread "
            "(await asyncio.to_thread(train_step)) or use connect_in_thread()"
        )
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


class RemoteTraining:
    """``ids -> logits`` through the swarm, differentiable w.r.t. the client's prompts and adapters.

    Args:
        model: a connected ``RemoteModel`` (its pieces, servers and config are used).
        loop: the event loop the model's connections live on.
    """

    def __init__(self, model, loop: asyncio.AbstractEventLoop):
        self.model, self.loop = model, loop
        self.client = SpanClient(model.servers, model.config)
        self.last_route: list[tuple[str, Span]] = []
        for parameter in model.pieces.parameters():  # the embeddings and head stay frozen
            parameter.requires_grad_(False)

    def hidden(self, hidden: torch.Tensor, adapters: LoraAdapters | None = None, deep=None) -> torch.Tensor:
        """Runs every block over ``hidden`` (batch, seq, hidden) with autograd through the swarm.

        ``deep``: a ``DeepPrompt`` whose per-block vectors the servers add (its input vectors
        must already be in ``hidden``)."""
        n_blocks = self.model.model_config.num_layers
        route = run_on_loop(self.loop, self.client.route(0, n_blocks))
        scaling = adapters.lora.scaling if adapters is not None else 1.0
        self.last_route = [(server.peer_id, span) for server, span in route]  # of the latest forward
        for server, span in route:
            tensors = adapters.span_tensors(span.start, span.end) if adapters is not None else {}
            names = tuple(sorted(tensors))
            values = [tensors[name] for name in names] + (
                [deep.span_prompts(span.start, span.end)] if deep else []
            )
            needs_grad = torch.is_grad_enabled() and (
                hidden.requires_grad or any(v.requires_grad for v in values)
            )
            hop = _HopContext(
                self.client, self.loop, span, server, names, scaling, needs_grad, deep is not None
            )
            hidden = _SpanHop.apply(hop, hidden, *values)
        return hidden

    def forward(
        self, input_ids: torch.Tensor, adapters: LoraAdapters | None = None, prompts=None
    ) -> torch.Tensor:
        """input_ids (batch, seq) -> logits (batch, virtual + seq, vocab) float32.

        Args:
            adapters: LoRA adapters applied on the servers' blocks.
            prompts: a ``SoftPrompt`` prepended to the embeddings (its positions come first in the
                logits), or a ``DeepPrompt`` (prepended too, and its per-block vectors sent to the servers).
        """
        pieces = self.model.pieces
        hidden = pieces.embed(input_ids)
        if prompts is not None:
            hidden = prompts.prepend(hidden)
        deep = prompts if isinstance(prompts, DeepPrompt) else None
        return pieces.logits(self.hidden(hidden, adapters, deep))

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, adapters: LoraAdapters | None = None, prompts=None
    ) -> torch.Tensor:
        """Greedy continuation with the adapters, ids (batch, tokens + max_new_tokens), from a thread
        other than the model's loop: ``RemoteModel.generate(ids, n, adapter=(adapters, prompts))``
        (KV-cached sessions that apply the adapters on the servers)."""
        return run_on_loop(
            self.loop, self.model.generate(input_ids, max_new_tokens, adapter=(adapters, prompts))
        )


class connect_in_thread:
    """A ``RemoteModel`` whose event loop runs in a thread of its own, for synchronous code::

        with connect_in_thread("model-dir", initial_peers=[...]) as client:
            loss = loss_fn(client.model.forward(ids, adapters=lora)); loss.backward()
            text = client.run(client.model.generate("Hello"))

    ``client.run(coroutine)`` runs any of the model's coroutines from this thread.
    """

    def __init__(self, checkpoint_dir: str | Path, initial_peers: Sequence[str], **connect_options):
        self.checkpoint_dir, self.initial_peers, self.options = checkpoint_dir, initial_peers, connect_options
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client", daemon=True)
        self.model = None

    def __enter__(self):
        from swarm.serving.remote_model import RemoteModel

        self._thread.start()
        try:
            self.model = self.run(
                RemoteModel.connect(self.checkpoint_dir, self.initial_peers, **self.options)
            )
        except BaseException:
            self._stop()
            raise
        return self

    def run(self, coroutine):
        future: Future = asyncio.run_coroutine_threadsafe(_awaited(coroutine), self.loop)
        return future.result()

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.model is not None:
                self.run(self.model.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()


async def _awaited(awaitable):
    return await awaitable
