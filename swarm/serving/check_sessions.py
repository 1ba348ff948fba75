"""``CheckSessions``: where a spot check's recomputation runs: a cached session on another holder.

A spot check (``spot_checks.py``) needs another holder's outputs for every position of
the checked hop since that hop's last check. Recomputing the hop's whole input prefix
statelessly at each check costs the checker a prefill of the prefix per check, so the
checker's work grows with the square of the session's length; on a small swarm
(``benchmarks/robust.py``: the checker shares the cores with the generation) that work
slowed every step. Instead, each checked hop has a *shadow*: an ordinary inference
session (``OpenInference``, the session every generating client opens) on one checker,
fed only at checks, with the positions since the last check as one multi-token step. The
checker's cache holds the hop's inputs so far, so each position is computed once, in
steps of about ``1 / verify_fraction`` tokens.

Why this keeps the spot checks' properties:

- The checked server still receives nothing extra: the shadow lives on another server,
  and its inputs come from the client's own copy of what the hop was sent.
- The checker sees a session like any other (multi-token steps are what prefills and
  speculative decoding send). Its inputs are coded for the wire like the hop's
  (``ClientConfig.activations``), and a session with LoRA adapters applies them on the
  checker too (a stateless forward could not).
- A shadow's checker is redrawn at random among the comparable holders now and then (and
  whenever it fails, is banned or stops being listed), so a liar cannot count on one
  colluding checker for a whole session. A new shadow is fed the whole prefix once, the
  cost every check used to pay, so the chance per check is :data:`CHECKER_REDRAW` times
  the share of the prefix that check covers: the redraws' prefills then cost on average
  half of what the checks themselves compute, however long the session (a fixed chance
  would make the checker's work quadratic in the length again). A session of L tokens
  redraws about ``CHECKER_REDRAW * ln(L / prompt)`` times.
- A shadow is fed from the smaller of what it holds and the check's first position: after
  a rollback (speculative decoding) the step's position rolls the checker's cache back
  as it does the hop's (``HostedSession.roll_back``). The checks of one hop run one at a
  time, in the order they were started (:meth:`CheckSessions.lock`), so a shadow is never
  fed an older prefix after a newer one.
- The tie-breaker after a mismatch gets a fresh session, fed the whole prefix in one step
  and closed: it holds nothing between checks (a mismatch is rare).

A shadow costs its checker one more session's cache (the hop's ``max_length``); a
checker without room refuses it (``ServerBusy``) and the check fails as any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from swarm import ServerRecord, Span
from swarm.serving.protocol import InferenceReply, InferenceStep
from transport import coded
from transport.errors import MalformedMessage, SwarmError

CHECKER_REDRAW = 0.5
"""A check of w of a hop's L positions so far moves its shadow to a checker drawn anew with
chance ``CHECKER_REDRAW * w / L`` (one prefill of L positions: w / 2 on average)."""

OpenHop = Callable[[ServerRecord, Span, bool], Awaitable]
"""``InferenceSession._open_hop``: (server, span, pipelined) -> an opened hop (its ``stream``)."""


@dataclass(eq=False)
class _Shadow:
    checker: ServerRecord
    opened: object  # the session on the checker (an InferenceSession hop: .stream)
    fed: int = 0  # the checker's cache holds the checked hop's inputs [0, fed)
    steps: int = 0


def input_prefix(history: list[tuple[int, torch.Tensor]], start: int = 0) -> torch.Tensor:
    """A hop's inputs (position, (batch, n, hidden)) per step, as one tensor (batch, positions,
    hidden) of the positions from ``start`` on; an entry replaces what earlier entries held from
    its position on (a rollback). Walks back from the end: the cost is that of the tail."""
    parts: list[torch.Tensor] = []
    taken = None  # positions from here on are taken by later entries
    for position, value in reversed(history):
        end = position + value.shape[1] if taken is None else min(taken, position + value.shape[1])
        if end > (begin := max(position, start)):
            parts.append(value[:, begin - position : end - position])
        taken = position if taken is None else min(taken, position)
        if taken <= start:
            break
    return torch.cat(parts[::-1], dim=1)


def inputs_end(history: list[tuple[int, torch.Tensor]]) -> int:
    """The position after a hop's last input (0 for none): the last entry cut everything after it."""
    if not history:
        return 0
    position, value = history[-1]
    return position + value.shape[1]


class CheckSessions:
    """The shadows of one client session's hops (see the module docstring).

    Args:
        open_hop: opens a session like the client session's own (batch, max_length, codec,
            adapters) on a server, for a span.
        codec: how hidden states travel (the client session's).
        timeout: seconds for one recomputation step.

    Attributes:
        opened: checker sessions opened (shadows and tie-breakers); positions_sent: positions
            fed to checkers in all (each position of a hop once while its shadow lasts).
    """

    def __init__(self, open_hop: OpenHop, codec, timeout: float):
        self._open_hop = open_hop
        self._codec = codec
        self.timeout = timeout
        self.opened = self.positions_sent = 0
        self._shadows: dict[object, _Shadow] = {}  # by checked hop
        self._locks: dict[object, asyncio.Lock] = {}

    def lock(self, hop) -> asyncio.Lock:
        """Held by a check of ``hop`` for its whole run: the checks of a hop run in start order
        (an uncontended acquire does not yield, and waiters are woken first come, first served)."""
        return self._locks.setdefault(hop, asyncio.Lock())

    def checker_of(self, hop) -> ServerRecord | None:
        shadow = self._shadows.get(hop)
        return None if shadow is None else shadow.checker

    async def recompute(
        self,
        hop,
        holders: list[ServerRecord],
        inputs: list[tuple[int, torch.Tensor]],
        first: int,
        redraw: bool,
    ) -> tuple[ServerRecord, int, torch.Tensor]:
        """The outputs of ``hop``'s blocks for its ``inputs`` (position, (batch, n, hidden)) per
        step, see :func:`input_prefix`) from ``first`` on, by its shadow (opened on ``holders[0]`` when it has none, when
        ``redraw``, or when its checker is not among ``holders``).

        Returns:
            (the checker, the first position computed (<= first), outputs from it on).
        Raises:
            SwarmError: the checker failed (the shadow is dropped).
        """
        shadow = self._shadows.get(hop)
        if shadow is not None and (redraw or shadow.checker.peer_id not in {h.peer_id for h in holders}):
            await self.drop(hop)
            shadow = None
        if shadow is None:
            opened = await self._open_hop(holders[0], hop.span, True)
            self.opened += 1
            shadow = self._shadows[hop] = _Shadow(holders[0], opened)
        start = min(shadow.fed, first)
        try:
            outputs = await self._step(shadow, start, input_prefix(inputs, start))
        except SwarmError:
            await self.drop(hop)
            raise
        shadow.fed = inputs_end(inputs)
        return shadow.checker, start, outputs

    async def recompute_once(self, server: ServerRecord, span: Span, prefix: torch.Tensor) -> torch.Tensor:
        """``span``'s outputs for the whole ``prefix`` by ``server``, in a session of its own (the tie-breaker)."""
        shadow = _Shadow(server, await self._open_hop(server, span, True))
        self.opened += 1
        try:
            return await self._step(shadow, 0, prefix)
        finally:
            await shadow.opened.stream.close()

    async def drop(self, hop) -> None:
        """Closes ``hop``'s shadow, if any (the next check opens a new one)."""
        shadow = self._shadows.pop(hop, None)
        if shadow is not None:
            await shadow.opened.stream.close()

    async def keep_only(self, hops) -> None:
        """Closes the shadows of hops not in ``hops`` (replaced after a failure)."""
        for hop in [hop for hop in self._shadows if hop not in hops]:
            await self.drop(hop)
            self._locks.pop(hop, None)

    async def close(self) -> None:
        """Closes every shadow."""
        await self.keep_only(())

    async def _step(self, shadow: _Shadow, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """Feeds hidden (batch, n, hidden) at ``position``; returns the span's outputs, same shape."""
        self.positions_sent += hidden.shape[1]
        step = InferenceStep(step=shadow.steps, position=position, new_tokens=hidden.shape[1],
                             hidden=coded(hidden.contiguous(), self._codec))  # fmt: skip
        shadow.steps += 1
        reply = await shadow.opened.stream.call(step, timeout=self.timeout)
        if (
            not isinstance(reply, InferenceReply)
            or reply.hidden is None
            or reply.hidden.shape != hidden.shape
        ):
            raise MalformedMessage(f"{shadow.checker.peer_id} answered a check step of {tuple(hidden.shape)} with "
                                   f"{getattr(getattr(reply, 'hidden', None), 'shape', type(reply).__name__)}")  # fmt: skip
        return reply.hidden
