"""``StepService``: the inference protocol's handlers on a server: sessions, steps, pushes.

The serving half of ``swarm/serving/protocol.py`` for inference (the fine-tuning half is
``training_server.py``); ``InferenceServer`` (``server.py``) owns the lifecycle, the
records and the span, and registers this service on its endpoints.

- ``OpenInference`` opens a stream: a ``HostedSession`` (its cache within the budget and
  the client's quota) on the span's ``StepBatcher``; each ``InferenceStep`` takes its
  input from the step, or waits for the previous server's push (or the client's copy),
  runs batched with other sessions' steps, and returns the output.
- When a step names the next server of the client's chain, its output is also pushed
  there (``PushHidden``), so a step travels the chain once instead of returning to the
  client between hops, but only to an address and key the DHT lists for the next block
  (``PushTargets``), never to an arbitrary address a client names. A push goes one way
  (``Connection.notify``): its acknowledgement cost the sender a wake-up and the receiver
  a send on every hop of every token, and told nothing the transport does not (a next
  server that went away fails the send at once; its connection is dropped and the next
  push reconnects). A failed or refused push is only logged: the next server's step
  reports its input missing and the client resends it. The push and the reply leave from the
  batcher the moment the forward ends (``StepBatcher.step``'s ``on_result``), before the
  event loop reads a message that arrived meanwhile (often the client's copy).
- ``ForwardRequest``: a stateless forward of a sub-span (no cache).
"""

from __future__ import annotations

import asyncio
import logging

import torch

from kernels.model_config import config_hash
from swarm import ModelMismatch, ServerState
from swarm.serving.batching import StepBatcher
from swarm.serving.hosted_sessions import HostedSession
from swarm.serving.protocol import (
    ForwardReply,
    ForwardRequest,
    InferenceReply,
    InferenceStep,
    OpenInference,
    PushAck,
    PushHidden,
)
from swarm.serving.push_targets import PushTargets
from transport import Connection, RequestContext, ServerStream, coded, wire_codec
from transport.errors import MalformedMessage, ServerBusy, SwarmError

logger = logging.getLogger("swarm.join")


class StepService:
    """Serves inference sessions, steps, pushes and stateless forwards for one ``InferenceServer``.

    Attributes:
        pushes_sent: step outputs pushed to the next server (sent; pushes are not acknowledged).
        pushes_used: steps whose input arrived by a push.
        client_copies_used: steps whose input came from the client's copy first.
        pushes_refused: pushes not sent: the target is no server of the next block.
    """

    def __init__(self, server) -> None:
        self.server = server  # an InferenceServer: span, sessions, batchers, config
        self.pushes_sent = 0
        self.pushes_used = 0
        self.client_copies_used = 0
        self.pushes_refused = 0
        self.push_targets = PushTargets(server.dht)
        self._connections: dict[tuple[str, bytes], Connection] = {}  # push targets, by (address, key)
        self._config_hash: str | None = None  # the served model's (config_hash)

    def register(self, endpoint) -> None:
        endpoint.add_handler(ForwardRequest, self._forward)
        endpoint.add_handler(PushHidden, self._push_received)
        endpoint.add_stream_handler(OpenInference, self._serve_session)

    async def close(self) -> None:
        """Closes the connections to push targets (and their listings' background lookups)."""
        await self.push_targets.close()
        for connection in self._connections.values():
            await connection.close()
        self._connections.clear()

    def check_hidden(self, hidden: torch.Tensor) -> None:
        if (
            hidden.dim() != 3
            or hidden.shape[-1] != self.server.model_config.hidden_size
            or not hidden.is_floating_point()
        ):
            raise MalformedMessage(
                f"hidden must be float (batch, seq, {self.server.model_config.hidden_size}), got "
                f"{hidden.dtype} {tuple(hidden.shape)}"
            )

    async def _forward(self, request: ForwardRequest, context: RequestContext) -> ForwardReply:
        blocks = self.server.sub_span(request.start, request.end)
        self.check_hidden(request.hidden)
        if request.hidden.shape[1] > self.server.model_config.max_position_embeddings:
            raise MalformedMessage(f"{request.hidden.shape[1]} tokens exceed the model's maximum length")

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return (
                    blocks(request.hidden.to(self.server.device, self.server.dtype))
                    .to(request.hidden.dtype)
                    .cpu()
                )

        return ForwardReply(hidden=await asyncio.to_thread(run))

    async def _push_received(self, request: PushHidden, context: RequestContext) -> PushAck:
        session = self.server.sessions.get(request.token)
        if session is None:
            raise MalformedMessage("no such session on this server")
        self.check_hidden(request.hidden)
        if request.hidden.shape[0] != session.batch or request.hidden.shape[1] > session.max_length:
            raise MalformedMessage(f"pushed hidden {tuple(request.hidden.shape)} does not fit the session")
        source = "client-copy" if request.from_client else "push"
        return PushAck(accepted=session.offer(request.step, request.hidden, source))

    async def _serve_session(self, stream: ServerStream) -> None:
        opening: OpenInference = stream.opening
        if self.server.state != ServerState.ONLINE:
            raise ServerBusy(f"server is {self.server.state.value}, not taking sessions")
        if self._config_hash is None:  # once: a JSON dump and a SHA-256 per opening took ~30 us
            self._config_hash = config_hash(self.server.model_config)
        if opening.config_hash and opening.config_hash != self._config_hash:
            raise ModelMismatch(f"this server serves a model with config hash {self._config_hash}, "
                                f"the client's is {opening.config_hash}: they differ (see the swarm's model record)")  # fmt: skip
        if opening.max_length > self.server.model_config.max_position_embeddings:
            raise MalformedMessage(
                f"max_length {opening.max_length} exceeds the model's {self.server.model_config.max_position_embeddings}"
            )
        adapter = None
        if opening.adapter_hash:  # LoRA for every step (AdapterNotCached: the client uploads it)
            adapter = self.server.training.session_adapter(opening.start, opening.end, opening.adapter_hash)
        codec = wire_codec(opening.activations)  # MalformedMessage for an unknown one
        batcher = self.server.batchers.acquire(
            opening.start,
            opening.end,
            lambda: self.server.sub_span(opening.start, opening.end),
            self.server.tasks,
        )
        try:
            session = self.server.sessions.open(
                opening.token, opening.batch, opening.max_length,
                lambda batch, length: batcher.span.allocate_cache(batch, length),
                owner=stream.context.peer_key,
            )  # fmt: skip
        except BaseException:
            self.server.batchers.release(batcher)
            raise
        session.adapter = adapter
        session.codec = codec
        try:
            async with asyncio.TaskGroup() as pushes:
                async for step in stream:
                    if not isinstance(step, InferenceStep):
                        # Any registered kind decodes; only steps belong here (the session stays).
                        await stream.reply_error(
                            MalformedMessage(
                                f"a session takes {InferenceStep.kind} messages, got {step.kind}"
                            )
                        )
                        continue
                    try:
                        reply = await self._serve_step(session, batcher, step, pushes, stream)
                    except MalformedMessage as error:
                        # The step is refused; the session and its cache stay as they were.
                        await stream.reply_error(error)
                        continue
                    if reply is not None:  # else it left right after the forward
                        await stream.reply(reply)
        finally:
            self.server.sessions.close(session)
            self.server.batchers.release(batcher)

    async def _serve_step(
        self, session: HostedSession, batcher: StepBatcher, step: InferenceStep, pushes: asyncio.TaskGroup,
        stream: ServerStream,
    ) -> InferenceReply | None:  # fmt: skip
        """Runs one step; its push and reply are sent as soon as the forward ends (None: the
        reply is out), or the reply to send when its input never came."""
        if step.hidden is not None:
            session.offer(step.step, step.hidden, "step")
            hidden, source = step.hidden, "step"
        else:
            arrived = await session.take(step.step, self.server.config.push_wait)
            if arrived is None:
                return InferenceReply(step=step.step, hidden=None, input_source="missing")
            hidden, source = arrived
            if source == "push":
                self.pushes_used += 1
            elif source == "client-copy":
                self.client_copies_used += 1
        session.check_step(step.position, step.new_tokens, hidden, self.server.model_config.hidden_size)
        session.roll_back(step.position)  # tokens after it (rejected drafts) leave nothing behind
        session.steps += 1
        if self.server.on_step is not None:
            self.server.on_step(session.steps)

        def send(output: torch.Tensor) -> None:  # (batch, new_tokens, hidden)
            # Right after the forward, before the event loop reads anything else (a client's
            # copy arriving meanwhile cost ~0.5 ms before the push and the reply; issue #18).
            if self.server.on_output is not None:  # test faults only (peers/faults.py)
                output = self.server.on_output(session.token, session.steps, output)
            output = coded(output, session.codec)  # the reply and the push travel alike
            if step.push_address:
                self._start_push(step, output, batcher.span.end, pushes)
            stream.reply_now(InferenceReply(step=step.step, hidden=output, input_source=source))

        try:
            await batcher.step(session.cache, hidden, step.position, session.adapter, on_result=send)
        except ValueError as error:
            raise MalformedMessage(str(error)) from error
        return None

    def _start_push(
        self, step: InferenceStep, output: torch.Tensor, next_block: int, pushes: asyncio.TaskGroup
    ) -> None:
        """Sends the push now when its target is a listed one with an open connection (the
        usual case), else from a task (a DHT lookup or a connect first)."""
        target = (step.push_address, step.push_key)
        connection = self._connections.get(target)
        if connection is None or not self.push_targets.listed_now(*target, next_block):
            pushes.create_task(self._push(step, output, next_block))
            return
        try:
            self._send_push(connection, step, output)
        except SwarmError as error:
            pushes.create_task(self._push_failed(step, error))

    async def _push(self, step: InferenceStep, output: torch.Tensor, next_block: int) -> None:
        """Sends a step's output to the next server (a server of ``next_block``); failures and
        refusals are logged (the client's copy covers them)."""
        if not await self.push_targets.allows(step.push_address, step.push_key, next_block):
            self.pushes_refused += 1
            if self.pushes_refused & (self.pushes_refused - 1) == 0:  # 1, 2, 4, ...: a flood logs little
                logger.info("refused push #%d (step %d to %s): no server of block %d announces that address and key",
                            self.pushes_refused, step.step, step.push_address[:200], next_block)  # fmt: skip
            return
        target = (step.push_address, step.push_key)
        try:
            connection = self._connections.get(target)
            if connection is None:
                fresh = await self.server.endpoint.connect(*target)
                connection = self._connections.setdefault(target, fresh)
                if connection is not fresh:  # another session's push connected meanwhile
                    await fresh.close()
            self._send_push(connection, step, output)
        except SwarmError as error:
            await self._push_failed(step, error)

    def _send_push(self, connection, step: InferenceStep, output: torch.Tensor) -> None:
        """Sends ``output`` as ``step``'s push now, one way (no acknowledgement).

        Raises:
            SwarmError: the connection is closed or the next server is disconnected.
        """
        connection.notify(PushHidden(token=step.push_token, step=step.step, hidden=output))
        self.pushes_sent += 1

    async def _push_failed(self, step: InferenceStep, error: SwarmError) -> None:
        """Drops the connection a push failed on (the next push reconnects) and logs it."""
        dropped = self._connections.pop((step.push_address, step.push_key), None)
        if dropped is not None:
            await dropped.close()
        logger.info("push of step %d to %s failed: %s", step.step, step.push_address, error)
