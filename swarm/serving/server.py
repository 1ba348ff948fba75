"""``InferenceServer``: a span of blocks served to inference clients over ZeroMQ.

The server half of ``swarm/serving/protocol.py`` (the client half is ``RemoteModel``).
``peers/join.py`` is the process around it (flags, signals, logging, exit codes) and
passes in the test-only fault hook (``on_step``); the server never ends its process.

Lifecycle: pick the span (``--blocks auto`` fills the weakest blocks) -> announce
JOINING -> load only the span's weights -> announce ONLINE -> serve until stopped ->
announce DRAINING, refuse new sessions, let open ones finish (bounded) -> withdraw.
With ``--blocks auto`` it checks now and then whether other blocks need it more
(Petals' rule, our ``swarm.plan_move``; each wait drawn from 0.5-1.5x the period so
servers do not move in lockstep, and ``plan_move`` never leaves a block this server
alone covers) and moves there: JOINING on the new span, load it, ONLINE, drop the old
one (sessions already open on it finish on the old weights).

Pieces: ``SpanLoader`` (weights, memory, throughput), ``HostedSessions`` (each client's
cache and inputs), ``SpanBatchers`` (concurrent steps batched into one forward).

Each inference step's output goes back to the client and, when the step names the
next server of the client's chain, straight to that server too (``PushHidden``), so
a step travels the chain once instead of returning to the client between hops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels import BlockSpan
from kernels.model_config import config_fingerprint, config_hash
from swarm import (
    Announcer,
    ModelMismatch,
    ModelRecord,
    RebalancePolicy,
    ServerRecord,
    ServerState,
    Span,
    choose_span,
    coverage_from_records,
    draw_check_delay,
    parse_span,
    plan_move,
    server_record_entries,
)
from swarm.records import model_key
from swarm.selection import effective_throughput
from swarm.serving.batching import SpanBatchers, StepBatcher
from swarm.serving.hosted_sessions import CacheBudget, HostedSession, HostedSessions, PeerQuota
from swarm.serving.protocol import (
    ForwardReply,
    ForwardRequest,
    InferenceReply,
    InferenceStep,
    OpenInference,
    PushAck,
    PushHidden,
    ServerStats,
    StatsRequest,
)
from swarm.serving.settings import ServerConfig
from swarm.serving.span_loader import SpanLoader
from swarm.serving.training_server import TrainingService
from transport import Connection, RequestContext, ServerStream
from transport.errors import MalformedMessage, ServerBusy, SwarmError

logger = logging.getLogger("swarm.join")

PUSH_TIMEOUT = 5.0  # seconds for one push to the next server; the client's copy covers a failure
LIST_TIMEOUT = 30.0  # seconds for the DHT lookup of one rebalance check

StepHook = Callable[[int], None]


class InferenceServer:
    """Serves one span of blocks; ``run()`` until ``stop`` is set.

    Args:
        config: what to serve.
        dht: a started ``SwarmDHT``.
        endpoint: a bound endpoint (its handlers are added here).
        address: the data-plane address to announce.
        version: software version for the records.
        on_step: called with a session's step count after each step it takes (replayed
            steps count), before the step runs; the process layer injects faults with it.
        reachability: the start-up check's verdict (``swarm.data_plane``), announced.
        relayed: when relayed, the libp2p plane that serves the same handlers.
    """

    def __init__(
        self,
        config: ServerConfig,
        dht,
        endpoint,
        address: str,
        version: str,
        on_step: StepHook | None = None,
        reachability=None,
        relayed=None,
    ):
        self.config = config
        self.dht = dht
        self.endpoint = endpoint
        self.address = address
        self.version = version
        self.on_step = on_step
        self.reachability = reachability
        self.relayed = relayed
        self.loader = SpanLoader(config)
        self.model_config = self.loader.model_config
        self.device = self.loader.device
        self.dtype = self.loader.dtype
        self.state = ServerState.JOINING
        self.span: Span | None = None  # announced (the target while moving)
        self.blocks: BlockSpan | None = None  # loaded and served
        self.throughput = 0.0
        quota = PeerQuota(
            max_sessions=config.max_sessions_per_client,
            max_cache_tokens=max(1, int(config.cache_tokens * config.client_cache_share)),
            mailbox_steps=config.mailbox_steps,
        )
        self.sessions = HostedSessions(CacheBudget(config.cache_tokens), quota)
        self.pushes_sent = 0
        self.pushes_used = 0
        self.client_copies_used = 0
        self.started_at = time.time()
        self._batchers = SpanBatchers(config.max_batch_rows)
        self._moved_from: list[Span] = []
        self._connections: dict[str, Connection] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._model_record: dict | None = None

    # Lifecycle.

    async def run(self, stop: asyncio.Event, on_online=None) -> None:
        """Joins, serves until ``stop`` is set, drains and leaves.

        Raises:
            SwarmError / ValueError: the span cannot be chosen or loaded.
        """
        self.span = await self._choose_span()
        announcer = Announcer(
            self.dht, self._records, period=self.config.announce_period, ttl=self.config.record_ttl
        )
        await announcer.announce_once()  # JOINING: others see the span being filled
        self.blocks = await asyncio.to_thread(self.loader.load, self.span)
        training = TrainingService(self)  # fine-tuning: forward/backward with client adapters
        for endpoint in (self.endpoint, *([self.relayed.endpoint] if self.relayed else [])):
            endpoint.add_handler(ForwardRequest, self._forward)
            endpoint.add_handler(PushHidden, self._push_received)
            endpoint.add_handler(StatsRequest, self._stats)
            endpoint.add_stream_handler(OpenInference, self._serve_session)
            training.register(endpoint)
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self.state = ServerState.ONLINE
            await announcer.announce_once()
            announcer_task = tasks.create_task(announcer.run())
            if self.config.blocks == "auto" and self.config.rebalance_period > 0:
                tasks.create_task(self.rebalance_periodically(announcer, stop))
            if on_online is not None:
                on_online(self)
            await stop.wait()
            logger.info("draining: %d open sessions", len(self.sessions))
            self.state = ServerState.DRAINING
            with contextlib.suppress(SwarmError):
                await announcer.announce_once()
            await self.sessions.wait_until_empty(self.config.drain_timeout)
            announcer.stop()
            await announcer_task
            with contextlib.suppress(SwarmError):
                await announcer.withdraw()
            for connection in self._connections.values():
                await connection.close()
            raise _Done

    def record(self) -> ServerRecord:
        """This server's record as it stands now (what the next announcement publishes)."""
        return ServerRecord(
            peer_id=self.dht.peer_id,
            state=self.state,
            span=self.span,
            throughput=self.throughput,
            inference_rate=self.throughput,
            free_cache_tokens=self.sessions.budget.free_tokens,
            load=len(self.sessions),
            addresses=(self.address, *(self.relayed.addresses if self.relayed else ())),
            curve_public_key=self.endpoint.public_key,
            version=self.version,
            device=self.device.type,
            dtype=str(self.dtype).removeprefix("torch."),
            started_at=self.started_at,
            reachability=self.reachability,
            libp2p_peer=self.relayed.peer if self.relayed else "",
        )

    def _records(self) -> dict:
        entries = server_record_entries(self.dht.swarm_name, self.record())
        if self._model_record is None:
            # Read once: re-reading config.json at each announcement fails when a connection
            # flood has taken every descriptor, and the records would lapse (issue #19).
            self._model_record = ModelRecord(
                Path(self.config.model).name,
                config_hash(self.model_config),
                self.model_config.num_layers,
                tuple(sorted(config_fingerprint(self.model_config).items())),
            ).to_wire()
        entries[model_key(self.dht.swarm_name)] = self._model_record
        return entries

    async def _choose_span(self) -> Span:
        n_blocks = self.model_config.num_layers
        self.throughput = await asyncio.to_thread(self.loader.measure_throughput)
        if self.config.blocks != "auto":
            return parse_span(self.config.blocks, n_blocks, flag="--blocks")
        servers = await self.dht.list_servers(n_blocks, timeout=30)
        coverage = coverage_from_records(servers.values(), n_blocks, exclude=(self.dht.peer_id,))
        return choose_span(coverage, self.loader.span_limit())

    async def rebalance_periodically(
        self, announcer: Announcer, stop: asyncio.Event, rng: random.Random | None = None
    ) -> None:
        """Checks every ``--rebalance-period`` (on average) and moves when worth it, until ``stop``.

        A failed check or move is logged and the next check goes on (the server keeps its span).
        """
        rng = rng or random.Random()
        policy = RebalancePolicy(mean_check_period=self.config.rebalance_period)
        n_blocks = self.model_config.num_layers
        max_blocks = await asyncio.to_thread(self.loader.span_limit)
        while True:
            try:
                await asyncio.wait_for(stop.wait(), draw_check_delay(policy, rng))
                return
            except TimeoutError:
                pass
            try:
                servers = await self.dht.list_servers(n_blocks, timeout=LIST_TIMEOUT)
                # Ourselves as we are now, not as the last announcement says.
                coverage = coverage_from_records(servers.values(), n_blocks, exclude=(self.dht.peer_id,))
                own = effective_throughput(self.record())  # a relayed server counts at a fraction
                coverage[self.span.start : self.span.end] += own
                target = plan_move(coverage, self.span, own, max_blocks, policy)
                if target is not None and not stop.is_set():
                    await self.move_to(target, announcer)
            except (SwarmError, OSError, RuntimeError) as error:
                logger.warning("rebalance check of %s failed: %s", self.span, error)

    # Handlers.

    async def move_to(self, target: Span, announcer: Announcer) -> None:
        """Moves to ``target``: announce JOINING there, load it, serve it, drop the old span.

        The old span is served until the new one is loaded (open sessions on it finish on
        the old weights); the caller checked that others cover it.

        Raises:
            SwarmError / OSError / RuntimeError: the announcement or the load failed
                (the server keeps serving its old span).
        """
        old = self.span
        logger.info("moving from blocks %s to %s", old, target)
        self.span, self.state = target, ServerState.JOINING
        try:
            await announcer.announce_once()  # tombstones on the old blocks, JOINING on the new
            blocks = await asyncio.to_thread(self.loader.load, target)
        except BaseException:
            self.span = old
            if self.state == ServerState.JOINING:
                self.state = ServerState.ONLINE
            announcer.refresh_now()
            raise
        self.blocks = blocks
        self._moved_from.append(old)
        self._batchers.retire_all()  # sessions already open keep their batcher to the end
        if self.state == ServerState.JOINING:  # not DRAINING
            self.state = ServerState.ONLINE
            await announcer.announce_once()
        logger.info("moved to blocks %s", target)

    def _sub_span(self, start: int, end: int) -> BlockSpan:
        served = Span(self.blocks.start, self.blocks.end)
        if not (served.start <= start < end <= served.end):
            if self.span != served or any(old.start <= start and end <= old.end for old in self._moved_from):
                # Moving or moved: a client read a listing from before (retryable elsewhere).
                raise ServerBusy(f"blocks {start}:{end}: this server moved to {self.span}")
            raise MalformedMessage(f"blocks {start}:{end} are not inside this server's span {served}")
        lo, hi = start - served.start, end - served.start
        if (lo, hi) == (0, len(served)):
            return self.blocks
        return BlockSpan(self.model_config, list(self.blocks.blocks[lo:hi]), start)

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if (
            hidden.dim() != 3
            or hidden.shape[-1] != self.model_config.hidden_size
            or not hidden.is_floating_point()
        ):
            raise MalformedMessage(
                f"hidden must be float (batch, seq, {self.model_config.hidden_size}), got "
                f"{hidden.dtype} {tuple(hidden.shape)}"
            )

    async def _forward(self, request: ForwardRequest, context: RequestContext) -> ForwardReply:
        blocks = self._sub_span(request.start, request.end)
        self._check_hidden(request.hidden)
        if request.hidden.shape[1] > self.model_config.max_position_embeddings:
            raise MalformedMessage(f"{request.hidden.shape[1]} tokens exceed the model's maximum length")

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return blocks(request.hidden.to(self.device, self.dtype)).to(request.hidden.dtype).cpu()

        return ForwardReply(hidden=await asyncio.to_thread(run))

    async def _push_received(self, request: PushHidden, context: RequestContext) -> PushAck:
        session = self.sessions.get(request.token)
        if session is None:
            raise MalformedMessage("no such session on this server")
        self._check_hidden(request.hidden)
        if request.hidden.shape[0] != session.batch or request.hidden.shape[1] > session.max_length:
            raise MalformedMessage(f"pushed hidden {tuple(request.hidden.shape)} does not fit the session")
        source = "client-copy" if request.from_client else "push"
        return PushAck(accepted=session.offer(request.step, request.hidden, source))

    def stats(self) -> ServerStats:
        """Counters and occupancy now (the ``StatsRequest`` reply; also ``/metrics``)."""
        return ServerStats(
            sessions=len(self.sessions),
            cache_tokens_used=self.sessions.budget.used_tokens,
            cache_tokens_total=self.sessions.budget.total_tokens,
            forwards=self._batchers.forwards,
            batched_steps=self._batchers.batched_steps,
            pushes_sent=self.pushes_sent,
            pushes_used=self.pushes_used,
            client_copies_used=self.client_copies_used,
            draining=self.state == ServerState.DRAINING,
        )

    async def _stats(self, request: StatsRequest, context: RequestContext) -> ServerStats:
        return self.stats()

    async def _serve_session(self, stream: ServerStream) -> None:
        opening: OpenInference = stream.opening
        if self.state != ServerState.ONLINE:
            raise ServerBusy(f"server is {self.state.value}, not taking sessions")
        if opening.config_hash and opening.config_hash != config_hash(self.model_config):
            raise ModelMismatch(f"this server serves a model with config hash {config_hash(self.model_config)}, "
                                f"the client's is {opening.config_hash}: they differ (see the swarm's model record)")  # fmt: skip
        if opening.max_length > self.model_config.max_position_embeddings:
            raise MalformedMessage(
                f"max_length {opening.max_length} exceeds the model's {self.model_config.max_position_embeddings}"
            )
        batcher = self._batchers.acquire(
            opening.start, opening.end, lambda: self._sub_span(opening.start, opening.end), self._tasks
        )
        try:
            session = self.sessions.open(
                opening.token, opening.batch, opening.max_length,
                lambda batch, length: batcher.span.allocate_cache(batch, length),
                owner=stream.context.peer_key,
            )  # fmt: skip
        except BaseException:
            self._batchers.release(batcher)
            raise
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
                        reply = await self._serve_step(session, batcher, step, pushes)
                    except MalformedMessage as error:
                        # The step is refused; the session and its cache stay as they were.
                        await stream.reply_error(error)
                        continue
                    await stream.reply(reply)
        finally:
            self.sessions.close(session)
            self._batchers.release(batcher)

    async def _serve_step(
        self, session: HostedSession, batcher: StepBatcher, step: InferenceStep, pushes: asyncio.TaskGroup
    ) -> InferenceReply:
        if step.hidden is not None:
            session.offer(step.step, step.hidden, "step")
            hidden, source = step.hidden, "step"
        else:
            arrived = await session.take(step.step, self.config.push_wait)
            if arrived is None:
                return InferenceReply(step=step.step, hidden=None, input_source="missing")
            hidden, source = arrived
            if source == "push":
                self.pushes_used += 1
            elif source == "client-copy":
                self.client_copies_used += 1
        session.check_step(step.position, step.new_tokens, hidden, self.model_config.hidden_size)
        session.steps += 1
        if self.on_step is not None:
            self.on_step(session.steps)
        try:
            output = await batcher.step(session.cache, hidden, step.position)  # (batch, new_tokens, hidden)
        except ValueError as error:
            raise MalformedMessage(str(error)) from error
        if step.push_address:
            pushes.create_task(self._push(step, output))
            await asyncio.sleep(0)  # let the push leave before the reply
        return InferenceReply(step=step.step, hidden=output, input_source=source)

    async def _push(self, step: InferenceStep, output: torch.Tensor) -> None:
        """Sends a step's output to the next server; failures are logged (the client's copy covers them)."""
        try:
            connection = self._connections.get(step.push_address)
            if connection is None:
                connection = await self.endpoint.connect(step.push_address, step.push_key)
                self._connections[step.push_address] = connection
            message = PushHidden(token=step.push_token, step=step.step, hidden=output)
            await connection.call(message, timeout=PUSH_TIMEOUT)
            self.pushes_sent += 1
        except SwarmError as error:
            dropped = self._connections.pop(step.push_address, None)
            if dropped is not None:
                await dropped.close()
            logger.info("push of step %d to %s failed: %s", step.step, step.push_address, error)


class _Done(Exception):
    """Ends the server's task group (cancels the batchers) after a clean drain."""


async def serve(server: InferenceServer, stop: asyncio.Event, on_online=None) -> None:
    """Runs ``server`` until ``stop``; returns after the drain."""
    try:
        await server.run(stop, on_online)
    except* _Done:
        pass
