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
cache and inputs), ``SpanBatchers`` (concurrent steps batched into one forward),
``StepService`` (``steps.py``: the inference protocol's handlers: sessions, steps and
pushes) and ``TrainingService`` (``training_server.py``: fine-tuning forward/backward).
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
from swarm.serving.batching import SpanBatchers
from swarm.serving.hosted_sessions import CacheBudget, HostedSessions, PeerQuota
from swarm.serving.protocol import (
    ServerStats,
    StatsRequest,
)
from swarm.serving.settings import ServerConfig
from swarm.serving.span_loader import SpanLoader
from swarm.serving.steps import StepService
from swarm.serving.training_server import TrainingService
from transport import RequestContext
from transport.errors import MalformedMessage, ServerBusy, SwarmError

logger = logging.getLogger("swarm.join")

LIST_TIMEOUT = 30.0  # seconds for the DHT lookup of one rebalance check

StepHook = Callable[[int], None]
OutputHook = Callable[[bytes, int, torch.Tensor], torch.Tensor]
"""(session token, the session's step count, the step's output) -> the output to return (tests)."""


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
        on_output: replaces each session step's output (returned and pushed); the process
            layer injects wrong outputs with it to test spot checks (``--perturb-outputs``).
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
        on_output: OutputHook | None = None,
    ):
        self.config = config
        self.dht = dht
        self.endpoint = endpoint
        self.address = address
        self.version = version
        self.on_step = on_step
        self.on_output = on_output
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
        self.started_at = time.time()
        self.batchers = SpanBatchers(config.max_batch_rows)
        self.steps = StepService(self)  # the inference protocol's handlers (steps.py)
        self.training = TrainingService(self)  # fine-tuning: forward/backward with client adapters
        self.tasks: asyncio.TaskGroup | None = None  # the running server's task group (batchers run in it)
        self._moved_from: list[Span] = []
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
        for endpoint in (self.endpoint, *([self.relayed.endpoint] if self.relayed else [])):
            self.steps.register(endpoint)
            endpoint.add_handler(StatsRequest, self._stats)
            self.training.register(endpoint)
        async with asyncio.TaskGroup() as tasks:
            self.tasks = tasks
            self.state = ServerState.ONLINE
            await announcer.announce_once()
            announcer_task = tasks.create_task(announcer.run())
            tasks.create_task(self.training.run())  # batches fine-tuning requests
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
            await self.steps.close()
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
            identity_key=self.dht.identity.public_key,  # binds the CURVE key to the signer
            quant=self.config.quant,
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
        self.batchers.retire_all()  # sessions already open keep their batcher to the end
        if self.state == ServerState.JOINING:  # not DRAINING
            self.state = ServerState.ONLINE
            await announcer.announce_once()
        logger.info("moved to blocks %s", target)

    def sub_span(self, start: int, end: int) -> BlockSpan:
        """The served blocks ``start:end`` (a view; ``ServerBusy`` after a move, else ``MalformedMessage``)."""
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

    def stats(self) -> ServerStats:
        """Counters and occupancy now (the ``StatsRequest`` reply; also ``/metrics``)."""
        return ServerStats(
            sessions=len(self.sessions),
            cache_tokens_used=self.sessions.budget.used_tokens,
            cache_tokens_total=self.sessions.budget.total_tokens,
            forwards=self.batchers.forwards,
            batched_steps=self.batchers.batched_steps,
            pushes_sent=self.steps.pushes_sent,
            pushes_used=self.steps.pushes_used,
            client_copies_used=self.steps.client_copies_used,
            pushes_refused=self.steps.pushes_refused,
            draining=self.state == ServerState.DRAINING,
        )

    async def _stats(self, request: StatsRequest, context: RequestContext) -> ServerStats:
        return self.stats()


class _Done(Exception):
    """Ends the server's task group (cancels the batchers) after a clean drain."""


async def serve(server: InferenceServer, stop: asyncio.Event, on_online=None) -> None:
    """Runs ``server`` until ``stop``; returns after the drain."""
    try:
        await server.run(stop, on_online)
    except* _Done:
        pass
