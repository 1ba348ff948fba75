"""``InferenceSession``: one generation's caches on a chain of servers, with failover.

Each step is sent to every hop of the chain at once: the first hop gets the input,
the others wait for the previous hop's push (pipelining), and the client forwards
each output it receives as a copy in case a push is lost. The client keeps every
input it sent to each hop (``rollback`` cuts them when speculative decoding rejects
drafted tokens, ``swarm/serving/speculative.py``). When a hop fails (killed, timed out, busy), its server
is banned, a replacement chain for exactly that span is found, the kept inputs are
replayed into it step by step (rebuilding the same caches), and the step goes on. A
replacement that dies during the replay is banned too and another one is tried
(``ClientConfig.replay_attempts`` at most). A copy goes without an acknowledgement:
nothing ever waited for one (the hop's answer makes its copy moot), and each cost the
server an encode and send and the client a wake-up and a decode on every hop of every
token.

A hop that does not answer within its deadline (``ServerPool.step_deadline``: a few
times what that server's recent steps took, counted from when its input was ready) and
then does not answer a ping either is given up on like a dead one, so a hung server
stalls a step for seconds while a merely slow one is waited for. A hop whose
session expired (``StreamClosed``) is reopened elsewhere or on the same server without
a ban: the server is fine. When bans would leave a span uncovered, the banned holders
are tried once more before waiting for a new one (a ban is a guess, not a verdict).
Errors leave ``step`` as the documented ``SwarmError`` classes, never as an
``ExceptionGroup``.

With ``ClientConfig.verify_fraction`` on, ``SpotChecks`` (``spot_checks.py``) has other
holders recompute a sample of the hops' outputs after the steps; a caught liar makes
``step`` raise ``ServerMisbehaved``.

Servers are found, banned and connected to through a ``ServerPool`` that every session
of a ``RemoteModel`` shares; a new session takes its route from the pool's live view and
sends each hop its opening right ahead of its first step, hop by hop in chain order
(pipelined and deferred: ``Connection.open_stream``), so the first hop's input leaves
first and a refused opening shows up as that step's failure. Hidden states travel in ``ClientConfig.activations``. The server keeps its side of each hop as a
``HostedSession`` (``swarm/serving/hosted_sessions.py``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

import torch

from swarm import NoRouteError, ServerRecord, Span, find_route
from swarm.serving.protocol import InferenceReply, InferenceStep, OpenInference, PushHidden
from swarm.serving.server_pool import ServerPool
from swarm.serving.settings import ClientConfig
from swarm.serving.spot_checks import SpotChecks
from swarm.serving.step_failures import (
    first_documented_error,
    is_server_failure,
    raise_when_awaited,
    session_lost,
    settle,
)
from transport import ClientStream, coded, wire_codec
from transport.errors import DeadlineExceeded, SwarmError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Hop:
    server: ServerRecord
    span: Span
    stream: ClientStream
    token: bytes
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, input) per step


class InferenceSession:
    """Keeps ``batch`` rows of up to ``max_length`` tokens cached along a chain of servers.

    Use as ``async with model.inference_session(max_length) as session`` and call
    :meth:`step` repeatedly (multi-turn use keeps the caches between calls).

    Args:
        servers: where to find, ban and connect to servers (shared by a model's sessions).
        config: deadlines and failover policy.
        max_length: tokens per row the servers reserve.
        batch: rows.
        lora: a ``SessionLora`` (``session_adapters.py``) every hop applies, or None.
    """

    def __init__(self, servers: ServerPool, config: ClientConfig, max_length: int, batch: int = 1, lora=None):
        self.servers = servers
        self.config = config
        self.max_length = max_length
        self.batch = batch
        self.lora = lora
        self.position = 0
        self.chain: list[_Hop] = []
        self.failovers = 0
        self.replay_failures = 0  # replacements that failed in turn while being replayed into
        self._step = 0
        self._codec = wire_codec(config.activations)  # how hidden states travel, both ways
        # spot checks of the servers' outputs (spot_checks.py); None when verification is off
        self.checks = (
            SpotChecks(servers, config.verify_fraction, config.step_timeout, self._open_hop, self._codec)
            if config.verify_fraction
            else None
        )

    async def __aenter__(self) -> InferenceSession:
        # Pipelined: the first step follows the openings without waiting for their answers;
        # a refused opening fails that step, which then fails over like any other.
        self.chain = await self._open_route(0, self.servers.n_blocks, pipelined=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.checks is not None and exc_info[0] is not None:
            await self.checks.cancel()  # leaving on an error (or cancelled): no verdict is awaited
        await self.close()

    async def close(self) -> None:
        """Ends the sessions on every server (after the spot checks in flight). Idempotent."""
        if self.checks is not None:
            await self.checks.close()  # settles the checks, then ends the checkers' sessions
        chain, self.chain = self.chain, []
        for hop in chain:
            await hop.stream.close()

    @property
    def route(self) -> list[tuple[str, Span]]:
        """The current chain as (peer id, span)."""
        return [(hop.server.peer_id, hop.span) for hop in self.chain]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs hidden (batch, new_tokens, hidden) through every block, appending to the caches.

        Returns:
            the last block's output, (batch, new_tokens, hidden).
        Raises:
            ValueError: the step would exceed ``max_length`` or has the wrong batch.
            NoRouteError: a failed span found no replacement within ``route_wait``.
            RemoteError: a server refused the step as malformed.
            RetryableError: every replacement chain tried for a failed span
                (``replay_attempts``) failed in turn (``DeadlineExceeded``, ``PeerUnavailable``...).
        """
        if hidden.shape[0] != self.batch:
            raise ValueError(f"this session has {self.batch} rows, got {hidden.shape[0]}")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{self.position + hidden.shape[1]} tokens exceed max_length={self.max_length}")
        number, position = self._step, self.position
        self._step += 1
        try:
            current = await self._run_step(hidden, number, position)
        except BaseExceptionGroup as group:
            raise first_documented_error(group) from None
        self.position += hidden.shape[1]
        if self.checks is not None:
            await self.checks.after_step(self.chain, position, current)
        return current

    def rollback(self, length: int) -> None:
        """Forgets every token after the first ``length`` (rejected draft tokens).

        Each hop's kept inputs are cut at ``length``, so a replay after a failure replays
        only accepted tokens; the servers drop theirs with the next step, whose position
        is now ``length`` (``HostedSession.roll_back``).

        Raises:
            ValueError: ``length`` is negative or past what the session holds.
        """
        if not 0 <= length <= self.position:
            raise ValueError(f"cannot roll back to {length}: the session holds {self.position} tokens")
        self.position = length
        for hop in self.chain:
            hop.history[:] = [
                (start, value[:, : length - start]) for start, value in hop.history if start < length
            ]

    async def _run_step(self, hidden: torch.Tensor, number: int, position: int) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        new_tokens = hidden.shape[1]
        async with asyncio.TaskGroup() as tasks:
            calls: dict[_Hop, asyncio.Task] = {}
            copies: dict[_Hop, asyncio.Task] = {}

            def launch(index: int, value: torch.Tensor | None) -> None:
                hop = self.chain[index]
                after = self.chain[index + 1] if index + 1 < len(self.chain) else None
                if self.checks is not None:
                    after = None  # spot checks: every input comes from the client (see spot_checks.py)
                message = InferenceStep(
                    step=number, position=position, new_tokens=hidden.shape[1],
                    hidden=None if value is None else coded(value, self._codec),
                    # a relayed next server gets the client's copy only (no server push)
                    push_address=after.server.addresses[0] if after and not after.server.relayed else "",
                    push_key=after.server.curve_public_key if after and not after.server.relayed else b"",
                    push_token=after.token if after else b"",
                )  # fmt: skip
                try:  # sent now, in chain order: the first hop's input leaves first
                    reply = hop.stream.send_call(message, timeout=self.config.step_timeout)
                except SwarmError as error:
                    reply = raise_when_awaited(error)
                calls[hop] = tasks.create_task(settle(reply))

            for index in range(len(self.chain)):
                launch(index, hidden if index == 0 else None)
            current, index = hidden, 0
            ready_at = loop.time()  # when the current hop's input was on its way
            while index < len(self.chain):
                hop = self.chain[index]
                result = await self._await_hop(hop, calls.pop(hop), ready_at, new_tokens, number)
                copy = copies.pop(hop, None)
                if copy is not None:
                    copy.cancel()  # the hop answered: its copy is moot (if still connecting)
                if isinstance(result, InferenceReply) and result.hidden is not None:
                    self.servers.record_step(hop.server.peer_id, loop.time() - ready_at, new_tokens)
                    ready_at = loop.time()
                    hop.history.append((position, current))
                    current = result.hidden
                    index += 1
                    # nothing pushes to a relayed server: its input is always the client's copy
                    if index < len(self.chain) and (
                        self.config.send_copies or self.chain[index].server.relayed or self.checks is not None
                    ):
                        after = self.chain[index]
                        copies[after] = tasks.create_task(self._send_copy(after, number, current))
                    continue
                if isinstance(result, InferenceReply):  # its input never came: resend it
                    launch(index, current)
                    ready_at = loop.time()
                    continue
                if not is_server_failure(result):
                    raise result
                logger.warning("server %s failed at step %d: %s", hop.server.peer_id, number, result)
                added = await self._replace(index, result)
                for offset in range(added):
                    launch(index + offset, current if offset == 0 else None)
                ready_at = loop.time()
        return current

    async def _await_hop(
        self, hop: _Hop, call: asyncio.Task, ready_at: float, new_tokens: int, number: int
    ) -> InferenceReply | BaseException:
        """The hop's reply, or its error; ``DeadlineExceeded`` once it ran past its step deadline
        and does not answer a ping either (a hung process), or past ``step_timeout``.

        A server that is only slow (a loaded machine) answers the ping, since its forwards run
        off its event loop: it gets another deadline instead of a ban.
        """
        loop = asyncio.get_running_loop()
        deadline = self.servers.step_deadline(hop.server.peer_id, new_tokens)
        ends_at = ready_at + deadline
        while True:
            done, _ = await asyncio.wait({call}, timeout=max(0.0, ends_at - loop.time()))
            if done:
                return call.result()
            if loop.time() - ready_at >= self.config.step_timeout or not await self.servers.answers_ping(
                hop.server, timeout=self.config.step_deadline_floor / 2
            ):
                break
            ends_at = loop.time() + deadline
        call.cancel()
        return DeadlineExceeded(
            f"server {hop.server.peer_id} did not answer step {number} within {loop.time() - ready_at:.1f}s "
            "nor a ping (hung?)"
        )

    async def _send_copy(self, hop: _Hop, number: int, hidden: torch.Tensor) -> None:
        message = PushHidden(
            token=hop.token, step=number, hidden=coded(hidden, self._codec), from_client=True
        )
        try:
            connection = await self.servers.connection_to(hop.server)
            connection.notify(message)  # no acknowledgement (see the module docstring)
        except SwarmError as error:  # the step itself reports a dead server
            logger.debug("copy for step %d to %s failed: %s", number, hop.server.peer_id, error)

    async def _replace(self, index: int, error: BaseException) -> int:
        """Swaps the failed hop for a new chain over its span and replays its inputs there.

        A replacement that fails during the replay is banned in turn and another chain is
        tried, ``ClientConfig.replay_attempts`` chains at most.

        Returns:
            how many hops replace it.
        Raises:
            NoRouteError: no replacement found within ``route_wait``.
            SwarmError: the last replacement failed too, or a server refused the replay as malformed.
        """
        failed = self.chain[index]
        if self.checks is not None:
            await self.checks.settle(raise_caught=False)
        if not session_lost(error):
            self.servers.ban(failed.server)
        self.failovers += 1
        await failed.stream.close()
        for attempt in range(1, self.config.replay_attempts + 1):
            replacement = await self._open_route(failed.span.start, failed.span.end)
            broken = await self._replay(failed.history, replacement)
            if broken is None:
                break
            hop, replay_error = broken
            for opened in replacement:
                await opened.stream.close()
            if not is_server_failure(replay_error) or attempt == self.config.replay_attempts:
                raise replay_error
            logger.warning("replacement %s failed during replay (attempt %d of %d): %s", hop.server.peer_id,
                           attempt, self.config.replay_attempts, replay_error)  # fmt: skip
            if not session_lost(replay_error):
                self.servers.ban(hop.server)
            self.replay_failures += 1
        logger.info("replaced %s with %s for blocks %s (%d steps replayed)", failed.server.peer_id,
                    [hop.server.peer_id for hop in replacement], failed.span, len(failed.history))  # fmt: skip
        self.chain[index : index + 1] = replacement
        return len(replacement)

    async def _replay(
        self, history: list[tuple[int, torch.Tensor]], hops: list[_Hop]
    ) -> tuple[_Hop, SwarmError] | None:
        """Feeds the kept inputs through ``hops``; returns the hop that failed and its error, or None."""
        loop = asyncio.get_running_loop()
        for position, value in history:
            for hop in hops:
                hop.history.append((position, value))
                peer, tokens, started = hop.server.peer_id, value.shape[1], loop.time()
                try:
                    reply = await hop.stream.call(
                        InferenceStep(
                            step=-1, position=position, new_tokens=tokens, hidden=coded(value, self._codec)
                        ),
                        timeout=self.servers.step_deadline(peer, tokens),
                    )
                except SwarmError as error:
                    return hop, error
                self.servers.record_step(peer, loop.time() - started, tokens)
                value = reply.hidden
        return None

    async def _open_route(self, start: int, end: int, pipelined: bool = False) -> list[_Hop]:
        """Opens sessions on the fastest chain over ``[start, end)``, retrying elsewhere on refusal
        (``pipelined``: without waiting for the servers to accept; see ``Connection.open_stream``).

        Raises:
            NoRouteError: some blocks had no server for ``route_wait`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.route_wait
        failed_now: set[str] = set()  # failed in this round: not retried until the next poll
        first = True
        while True:
            # The pool's live view first (no DHT lookup); after a failure, a fresh listing.
            listed = await (self.servers.view() if first else self.servers.list())
            first = False
            try:
                route = find_route(listed.values(), start, end, excluded=self.servers.banned() | failed_now)
            except NoRouteError as error:
                try:
                    # Only banned holders are left: try them again before waiting, since a
                    # ban is a guess (a stall elsewhere, a restart) and they may serve fine.
                    route = find_route(listed.values(), start, end, excluded=failed_now)
                except NoRouteError:
                    if loop.time() >= deadline:
                        if not listed:  # nothing at all under this swarm name: say so
                            raise NoRouteError(
                                error.uncovered, _nobody_hint(self.servers.dht.swarm_name)
                            ) from None
                        raise error from None
                    failed_now.clear()
                    await asyncio.sleep(self.config.route_poll)  # polling the DHT under a deadline
                    continue

            def opening(hop):
                return settle(self._open_hop(hop.server, hop.span, pipelined))

            if (
                pipelined
                and self.lora is None
                and all(not hop.server.relayed and self.servers.connected(hop.server) for hop in route)
            ):
                # Nothing to wait for (deferred openings on open connections): hop by hop, with
                # no task per hop and no event-loop turn before the first step (issue #18).
                results = [await opening(hop) for hop in route]
            else:  # all hops at once: one round trip (or connect) instead of one per hop
                results = await asyncio.gather(*map(opening, route))
            opened = [result for result in results if isinstance(result, _Hop)]
            if len(opened) == len(route):
                return opened
            for hop in opened:
                await hop.stream.close()
            for hop, error in zip(route, results, strict=True):
                if isinstance(error, _Hop):
                    continue
                if not is_server_failure(error):
                    raise error
                logger.warning("could not open a session on %s: %s", hop.peer_id, error)
                self.servers.ban(hop.server)
                failed_now.add(hop.peer_id)

    async def _open_hop(self, server: ServerRecord, span: Span, pipelined: bool = False) -> _Hop:
        token = secrets.token_bytes(16)
        connection = await self.servers.connection_to(server)
        opening = OpenInference(token=token, start=span.start, end=span.end, batch=self.batch,
                                max_length=self.max_length, config_hash=self.servers.config_hash,
                                activations=self.config.activations)  # fmt: skip
        if self.lora is not None:  # with the adapter's hash (uploaded if the server lacks it)
            stream = await self.lora.open_stream(connection, opening, self.config.open_timeout)
        else:
            # pipelined: the opening leaves with the first step, right ahead of it (a relayed
            # server's libp2p streams may reorder an opening and its first step: not for those)
            pipelined = pipelined and not server.relayed
            stream = await connection.open_stream(
                opening, timeout=self.config.open_timeout, pipelined=pipelined, deferred=pipelined
            )
        return _Hop(server, span, stream, token)


def _nobody_hint(swarm_name: str) -> str:
    return (f"no server of swarm {swarm_name!r} was found at all: check --swarm (the name the servers "
            "were started with) and --initial-peers")  # fmt: skip
