"""``SpotChecks``: a client recomputes a sample of its session's work on other holders of the blocks.

With ``ClientConfig.verify_fraction = f``, every ``P = round(1/f)``-th step is checked,
from a step drawn at random among the first ``P`` (with a generator the servers cannot
see); a checked step checks every hop of the chain. To check a hop, the client feeds the hop's inputs since its last
check (it keeps every input it sent, ``_Hop.history``) to the hop's *shadow*: a session
on another server holding the hop's blocks, of a kind comparable with the hop's server
(``output_tolerance``), that holds the hop's earlier inputs in its cache
(``check_sessions.py``), and compares the recomputed outputs with the outputs the hop
returned for every position not yet checked.

Why this design:

- *Indistinguishable.* The checked server receives nothing at all: the check runs on
  another server, so it cannot be honest only when watched. The checker serves an
  ordinary inference session over the client's usual connection.
- *Cheap on long sessions.* One round trip per hop per checked step, off the critical
  path (the next token does not wait for it); the checker computes each position once,
  in steps of about ``1/f`` tokens. Recomputing the whole prefix statelessly at each check
  (the first version) made the checker's work grow with the square of the length, and
  on a small swarm that work slowed every step (``benchmarks/robust.py``). Mirroring
  every step on the checker would cost it a step per token instead of one per check.
  Since each check compares every position since that hop's last check, every output
  is eventually checked at any ``f``, and ``f`` only sets how soon: a liar is caught
  within ``P + MAX_LAG_STEPS - 1`` steps of its first wrong output (that one counted).
- *Periodic, not drawn per step.* Drawing each step with chance ``f`` (the first version)
  checks as often on average, but leaves a tail: at 0.33, 0.5% of liars went 16 steps
  unnoticed. A period bounds the delay for every liar at the same cost. Nothing is
  gained by hiding the period: the checked server sees no check, and whatever it does
  between two checks is compared at the next one (the session's last outputs at
  :meth:`SpotChecks.settle`).
- *Bounded.* At most :data:`MAX_PENDING` checks run at once, and a check's result is
  awaited at most :data:`MAX_LAG_STEPS` steps after it started (only then does a step wait
  for it); each is under ``step_timeout``; the session awaits them before it closes or
  replays.

On a mismatch a third holder, comparable with both, recomputes the same prefix; the
server the third disagrees with is the liar. It is banned by this client
(``ServerPool.ban``) and a signed report goes to the DHT (``swarm.server_reports``).
When the liar was the hop, the session's outputs from the first wrong position on are
wrong, and the next ``step`` (or :meth:`SpotChecks.settle`) raises ``ServerMisbehaved``
so the generation is rerun through honest servers (``verified_generation``).
While checks are on, the client disables server-to-server pushes: each server's input is
then exactly what the client saw, so a liar cannot return one tensor to the client and
push another to the next server, making that honest server look guilty.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import deque
from dataclasses import dataclass, field

import torch
from hivemind.utils import get_dht_time

from swarm import ServerRecord, ServerState, Span
from swarm.server_reports import MisbehaviourReport
from swarm.serving.check_sessions import CHECKER_REDRAW, CheckSessions, OpenHop, input_prefix, inputs_end
from swarm.serving.output_tolerance import ServerKind, relative_error, tolerance
from transport.errors import RetryableError, SwarmError

logger = logging.getLogger(__name__)

RECOMMENDED_VERIFY_FRACTION = 0.125
"""The fraction to verify at when in doubt (``benchmarks/robust.py``): every 8th step, so a liar
is caught within 8 + :data:`MAX_LAG_STEPS` - 1 = 10 steps of its first wrong output, whatever
the draw (issue #14 asks for 16), for one checker step of about 8 tokens per 8 tokens. Every
output is checked at any fraction; a larger one only catches sooner, at one checker round
trip per check."""
MAX_PENDING = 4
"""Checks in flight at once per session; a step waits for the oldest beyond this."""
MAX_LAG_STEPS = 3
"""A check's result is awaited at most this many steps after it started, so a liar is caught
within this many steps of the first check that follows its first wrong output, however
fast the steps run compared with a check. A check is one round trip to its checker, about
as long as a step, and it is awaited in the ``after_step`` of the step MAX_LAG_STEPS - 1
after its own: with 2 it had one step's time and a step waited for nearly every check
(0.9 ms per token of 7.4 on the 2-core VM, ``benchmarks/robust.py``); 3 gives it two."""


class ServerMisbehaved(RetryableError):
    """A server of the chain returned outputs that two other holders of its blocks disagree
    with. It is banned and reported; rerun the generation (retryable: other servers will do).

    Attributes:
        peer_id: the liar.
        position: the first position whose output was wrong.
    """

    def __init__(self, message: str, peer_id: str = "", position: int = 0):
        super().__init__(message)
        self.peer_id = peer_id
        self.position = position


@dataclass(frozen=True)
class Verdict:
    """A resolved mismatch: ``liar`` disagreed with two other holders of ``span``."""

    liar: str
    span: Span
    position: int  # first wrong position of the liar's outputs (the hop's), else of the checked window
    in_chain: bool  # the liar was the checked hop (the session's outputs are wrong), not the checker
    evidence: str


@dataclass(eq=False)
class _Outputs:
    """What one hop returned and no check has taken yet, by position."""

    entries: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    clean_through: int | None = None  # positions before this were checked and agreed
    agreed: list[tuple[int, int]] = field(default_factory=list)  # checked windows past clean_through

    def agree(self, start: int, end: int) -> None:
        """Window ``[start, end)`` was checked right; ``clean_through`` advances over contiguous ones."""
        self.agreed.append((start, end))
        self.agreed.sort()
        while self.agreed and self.agreed[0][0] <= (self.clean_through or 0):
            self.clean_through = max(self.clean_through or 0, self.agreed.pop(0)[1])

    def add(self, position: int, value: torch.Tensor) -> None:
        self.entries = _truncated(self.entries, position)
        if self.clean_through is None or self.clean_through > position:
            # a new hop starts clean where it joined: what came before was another server's,
            # whose remaining outputs the session checked before replacing it (settle)
            self.clean_through = position
        self.entries.append((position, value))


def _truncated(entries: list[tuple[int, torch.Tensor]], position: int) -> list[tuple[int, torch.Tensor]]:
    """``entries`` (position, (batch, n, hidden)) cut to what lies before ``position`` (a rollback)."""
    kept = [(start, value) for start, value in entries if start < position]
    if kept and kept[-1][0] + kept[-1][1].shape[1] > position:
        start, value = kept[-1]
        kept[-1] = (start, value[:, : position - start])
    return kept


class SpotChecks:
    """One session's spot checks (see the module docstring).

    Args:
        servers: the model's ``ServerPool`` (listing, bans, connections, its ``reports``).
        fraction: share of steps checked, in (0, 1]: every ``round(1 / fraction)``-th step.
        timeout: seconds for one recomputation on one server.
        open_hop: opens a session like the checked session's own on a server
            (``InferenceSession._open_hop``): the checkers' sessions.
        codec: how the checked session's hidden states travel.
        rng: draws the first checked step and which holders check (seeded in tests only).

    Attributes:
        checks: hops compared; mismatches: of those, found different; unchecked: hops with
            no comparable other holder; failed: checks that could not run (a server failed);
        verdicts: resolved mismatches; unresolved: mismatches no third holder could decide.
        largest_agreeing: the largest error of an agreeing comparison, as a share of its tolerance.
        checker_redraw: a check of w of L positions draws the hop's checker anew with chance
            ``checker_redraw * w / L`` (``check_sessions.CHECKER_REDRAW``); sessions: the
            checkers' sessions.
    """

    def __init__(
        self,
        servers,
        fraction: float,
        timeout: float,
        open_hop: OpenHop,
        codec,
        rng: random.Random | None = None,
    ):
        self.servers = servers
        self.sessions = CheckSessions(open_hop, codec, timeout)
        self.checker_redraw = CHECKER_REDRAW
        self.fraction = fraction
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.checks = self.mismatches = self.unchecked = self.failed = self.unresolved = 0
        self.verdicts: list[Verdict] = []
        self.largest_agreeing = 0.0
        self._outputs: dict[object, _Outputs] = {}  # by hop
        self._pending: deque[tuple[int, asyncio.Task]] = deque()  # (step it started after, check)
        self._steps = 0
        self.period = max(1, round(1 / fraction))  # every period-th step is checked...
        self._phase = self.rng.randrange(self.period)  # ...starting with this one
        self._unraised: list[Verdict] = []

    async def after_step(self, chain: list, position: int, output: torch.Tensor) -> None:
        """Notes every hop's output of the step at ``position``; maybe starts checks of them.

        Raises:
            ServerMisbehaved: a check (of this or an earlier step) caught a hop of the chain.
        """
        self._raise_caught()
        for index, hop in enumerate(chain):
            returned = chain[index + 1].history[-1][1] if index + 1 < len(chain) else output
            self._outputs.setdefault(hop, _Outputs()).add(position, returned)
        self._outputs = {hop: self._outputs[hop] for hop in chain}  # replaced hops are done with
        await self.sessions.keep_only(chain)
        if self._steps % self.period == self._phase:
            for hop in chain:
                self._start(hop)
        self._steps += 1
        while self._pending and (
            len(self._pending) > MAX_PENDING or self._pending[0][0] <= self._steps - MAX_LAG_STEPS
        ):
            await self._pending.popleft()[1]
        while self._pending and self._pending[0][1].done():
            self._pending.popleft()
        self._raise_caught()

    @property
    def verified_position(self) -> int:
        """Positions before this have every hop's output checked and agreed with (0: none yet)."""
        return min((record.clean_through or 0 for record in self._outputs.values()), default=0)

    async def settle(self, *, raise_caught: bool = True) -> None:
        """Checks what was not checked yet, and waits for every check (each bounded by ``timeout``).

        Raises:
            ServerMisbehaved: with ``raise_caught``, a check caught a hop of the chain.
        """
        for hop in list(self._outputs):
            self._start(hop)
        while self._pending:
            await self._pending.popleft()[1]
        if raise_caught:
            self._raise_caught()

    async def close(self) -> None:
        """Checks what was not checked yet, waits for every check, and ends the checkers' sessions."""
        await self.settle(raise_caught=False)
        await self.sessions.close()

    async def cancel(self) -> None:
        """Stops the checks in flight (the session is being dropped without a verdict)."""
        for _, task in self._pending:
            task.cancel()
        await asyncio.gather(*(task for _, task in self._pending), return_exceptions=True)
        self._pending.clear()
        self._outputs = {}  # nothing left to check either (close() would start checks of it)
        await self.sessions.close()

    def _raise_caught(self) -> None:
        if self._unraised:
            verdict = min(self._unraised, key=lambda caught: caught.position)
            self._unraised = []
            raise ServerMisbehaved(
                f"server {verdict.liar} returned wrong outputs for blocks {verdict.span} from position "
                f"{verdict.position} (two other holders agree); it is banned and reported",
                verdict.liar,
                verdict.position,
            )

    def _start(self, hop) -> None:
        record = self._outputs.get(hop)
        if record is None or not record.entries:
            return
        window, record.entries = record.entries, []  # a check holds what it compares
        inputs = list(hop.history)  # as they stand now (pointers): a check feeds only their tail
        window = _truncated(window, inputs_end(inputs))  # a rollback with no step since: nothing past it
        if not window:
            return
        # Tracked in _pending and always awaited (settle) or cancelled (cancel).
        check = asyncio.ensure_future(self._check(hop, inputs, window, record))
        self._pending.append((self._steps, check))

    async def _check(
        self,
        hop,
        inputs: list[tuple[int, torch.Tensor]],
        window: list[tuple[int, torch.Tensor]],
        record: _Outputs,
    ) -> None:
        try:
            async with self.sessions.lock(hop):  # a hop's checks feed its shadow in order
                if await self._compare(hop, inputs, window):
                    last, value = window[-1]
                    record.agree(window[0][0], last + value.shape[1])
        except SwarmError as error:
            self.failed += 1
            logger.info(
                "spot check of %s on blocks %s could not run: %s", hop.server.peer_id, hop.span, error
            )

    async def _compare(
        self, hop, inputs: list[tuple[int, torch.Tensor]], window: list[tuple[int, torch.Tensor]]
    ) -> bool:
        """Whether the hop's outputs in ``window`` (for its ``inputs``) were checked and found right."""
        server, span = hop.server, hop.span
        kind = ServerKind.of(server)
        holders = [
            record for record in (await self._listing()).values()
            if record.peer_id != server.peer_id and record.state == ServerState.ONLINE
            and record.span.start <= span.start and span.end <= record.span.end
            and record.peer_id not in self.servers.banned()
            and tolerance(kind, ServerKind.of(record)) is not None
        ]  # fmt: skip
        if not holders:
            self.unchecked += 1
            return False
        self.rng.shuffle(holders)
        positions = [p for start, value in window for p in range(start, start + value.shape[1])]
        claimed = torch.cat([value for _, value in window], dim=1)  # (batch, len(positions), hidden)
        redraw = self.rng.random() < self.checker_redraw * len(positions) / inputs_end(inputs)
        checker, first, outputs = await self.sessions.recompute(hop, holders, inputs, positions[0], redraw)
        recomputed = outputs[:, [p - first for p in positions]]
        holders = [record for record in holders if record.peer_id != checker.peer_id]
        self.checks += 1
        allowed = tolerance(kind, ServerKind.of(checker))
        error = relative_error(claimed, recomputed)
        if error <= allowed:
            self.largest_agreeing = max(self.largest_agreeing, error / allowed)
            return True
        self.mismatches += 1
        logger.warning("spot check: %s and %s disagree on blocks %s; asking a third holder",
                       server.peer_id, checker.peer_id, span)  # fmt: skip
        prefix = input_prefix(inputs)  # (batch, positions, hidden): the tie-breaker's input
        for third in holders:
            if tolerance(ServerKind.of(checker), ServerKind.of(third)) is None:
                continue
            try:
                decider = (await self.sessions.recompute_once(third, span, prefix))[:, positions]
            except SwarmError as error:
                logger.info("tie-breaker %s failed: %s", third.peer_id, error)
                continue
            hop_agrees = relative_error(claimed, decider) <= tolerance(kind, ServerKind.of(third))
            checker_agrees = relative_error(recomputed, decider) <= tolerance(
                ServerKind.of(checker), ServerKind.of(third)
            )
            evidence = _evidence(span, positions, prefix, claimed, recomputed, decider)
            if checker_agrees and not hop_agrees:
                errors = _position_errors(claimed, decider)
                first = (
                    positions[next(i for i, e in enumerate(errors) if e > allowed)]
                    if errors
                    else positions[0]
                )
                await self._convict(server, Verdict(server.peer_id, span, first, True, evidence))
            elif hop_agrees and not checker_agrees:
                await self.sessions.drop(hop)
                await self._convict(checker, Verdict(checker.peer_id, span, positions[0], False, evidence))
                return True
            else:
                await self.sessions.drop(hop)  # the next check draws its checker anew
                self.unresolved += 1
            return False
        self.unresolved += 1
        logger.warning("spot check on blocks %s unresolved: no third comparable holder answered", span)
        return False

    async def _listing(self) -> dict[str, ServerRecord]:
        """The pool's live view (``ServerPool.view``): no DHT lookup per check."""
        return await self.servers.view()

    async def _convict(self, liar: ServerRecord, verdict: Verdict) -> None:
        logger.warning("server %s computes blocks %s wrong (from position %d): banned and reported",
                       liar.peer_id, verdict.span, verdict.position)  # fmt: skip
        known = any(earlier.liar == verdict.liar for earlier in self.verdicts)
        self.verdicts.append(verdict)
        if verdict.in_chain:
            self._unraised.append(verdict)
        if known:  # checks in flight at once caught it again: banned and reported once
            return
        # By peer id, not by record: a restart does not lift it. The longest ban the client's
        # BanList gives (repeated bans double up to its max_seconds): a liar is not a glitch.
        for _ in range(32):
            if self.servers.ban(liar.peer_id) >= self.servers.bans.max_seconds:
                break
        report = MisbehaviourReport(
            liar.peer_id, (verdict.span.start, verdict.span.end), verdict.evidence, get_dht_time()
        )
        try:
            await self.servers.reports.file(report)
        except SwarmError as error:
            logger.warning("could not publish the report on %s: %s", liar.peer_id, error)


def _position_errors(output: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Relative error per position (the worst row), for finding the first wrong position."""
    return [relative_error(output[:, [i]], reference[:, [i]]) for i in range(output.shape[1])]


def _evidence(span: Span, positions: list[int], *tensors: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{span.start}:{span.end}:{positions}".encode())
    for tensor in tensors:
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
