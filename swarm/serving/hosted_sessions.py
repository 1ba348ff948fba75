"""The server's side of inference sessions: the cache budget and each client's hosted state.

A ``HostedSession`` is what a server keeps for one client's ``InferenceSession``
(``swarm/serving/session.py``) on its span: the key/value cache, the step count and an
input mailbox. ``HostedSessions`` is the table of open ones.

A session's cache is allocated from a budget of tokens (``batch * max_length`` per
session); a session that does not fit is refused with ``ServerBusy`` so the client
routes elsewhere. Step inputs may arrive in the step itself, pushed by the previous
server of the chain, or as the client's copy: the mailbox keeps the first copy of
each step and drops the rest, and holds at most ``mailbox_steps`` inputs. A step at an
earlier position than the session holds first truncates the cache there (``roll_back``):
that is how speculative decoding's rejected draft tokens leave nothing behind.

Quotas (issue #19): one peer (one CURVE key) holds at most ``PeerQuota.max_sessions``
sessions and ``PeerQuota.max_cache_tokens`` of the budget, so a greedy client leaves the
rest to the others; beyond either it gets ``ServerBusy`` (and routes elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import torch

from kernels import KVCache
from transport.codecs import Codec, RawCodec
from transport.errors import MalformedMessage, ServerBusy


@dataclass(frozen=True)
class PeerQuota:
    """What one peer (one CURVE key) may hold on this server.

    Attributes:
        max_sessions: open sessions.
        max_cache_tokens: cache tokens over its sessions.
        mailbox_steps: inputs one session's mailbox holds before refusing more.
    """

    max_sessions: int = 64
    max_cache_tokens: int = 2**62
    mailbox_steps: int = 4


class CacheBudget:
    """Counts cache tokens handed out to sessions.

    Args:
        total_tokens: the budget, in tokens (one token = one position of one row).
    """

    def __init__(self, total_tokens: int):
        self.total_tokens = total_tokens
        self.used_tokens = 0

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.used_tokens

    def reserve(self, tokens: int) -> None:
        """Takes ``tokens`` from the budget.

        Raises:
            ServerBusy: not enough is free (retryable: another server may have room).
        """
        if tokens > self.free_tokens:
            raise ServerBusy(
                f"cache budget exhausted: session needs {tokens} tokens, {self.free_tokens} of "
                f"{self.total_tokens} free"
            )
        self.used_tokens += tokens

    def release(self, tokens: int) -> None:
        self.used_tokens -= tokens


@dataclass
class HostedSession:
    """One client's inference session as this server holds it.

    Attributes:
        token: the session's name (pushes address it).
        cache: keys/values of the span, ``batch`` rows of ``max_length`` tokens.
        inputs: step number -> (input hidden, source), first copy only.
    """

    token: bytes
    cache: KVCache
    batch: int
    max_length: int
    inputs: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)
    steps: int = 0  # steps taken so far (replayed ones included)
    owner: object = None  # the peer key that opened it (quotas)
    mailbox_steps: int = 4
    adapter: object = None  # a ServedAdapter (adapter_cache.py) applied to every step, or None
    codec: Codec = field(
        default_factory=RawCodec
    )  # how its outputs travel (the client's ``activations`` choice)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def tokens(self) -> int:
        return self.batch * self.max_length

    def offer(self, step: int, hidden: torch.Tensor, source: str) -> bool:
        """Stores the input of ``step`` unless a copy is already there or the mailbox is full.

        Returns:
            whether it was stored.
        """
        if source == "step":  # the step brought its own input: older ones are moot
            for old in [s for s in self.inputs if s < step]:
                del self.inputs[old]
        if step in self.inputs or (self.inputs and step < min(self.inputs)):
            return False
        if len(self.inputs) >= self.mailbox_steps:
            return False  # bounded: pushes far ahead of the steps are dropped (the step resends)
        self.inputs[step] = (hidden, source)
        self._arrived.set()
        return True

    async def take(self, step: int, timeout: float) -> tuple[torch.Tensor, str] | None:
        """The input of ``step`` once a copy arrives, or None after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while step not in self.inputs:
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                # a scope, not wait_for: wait_for runs the wait in a task of its own, one more
                # event-loop turn between a push's arrival and the forward (issue #18)
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return None
        # Older inputs can no longer be asked for (the client moved on).
        for old in [s for s in self.inputs if s < step]:
            del self.inputs[old]
        return self.inputs[step]

    def check_step(self, position: int, new_tokens: int, hidden: torch.Tensor, hidden_size: int) -> None:
        """Validates a step against this session before it touches the cache.

        Raises:
            MalformedMessage: the shapes or positions do not fit the session.
        """
        if new_tokens < 1:
            raise MalformedMessage(f"a step needs at least one token, got new_tokens={new_tokens}")
        expected = (self.batch, new_tokens, hidden_size)
        if tuple(hidden.shape) != expected:
            raise MalformedMessage(f"hidden has shape {tuple(hidden.shape)}, this session expects {expected}")
        if not hidden.is_floating_point():
            raise MalformedMessage(f"hidden must be floating point, got {hidden.dtype}")
        held = int(self.cache.lengths.max()) if self.batch else 0
        if not 0 <= position <= held:
            raise MalformedMessage(f"position {position} is outside the {held} tokens this session holds")
        if position + new_tokens > self.max_length:
            raise MalformedMessage(
                f"positions {position}..{position + new_tokens} exceed the session's max_length {self.max_length}"
            )

    def roll_back(self, position: int) -> None:
        """Drops every cached token from ``position`` on: a step at an earlier position than the
        session holds replaces what follows it (the client rejected drafted tokens, or replays)."""
        held = int(self.cache.lengths.max()) if self.batch else 0
        if position < held:
            self.cache.truncate(position)


class HostedSessions:
    """The open sessions by token, with the budget they draw from."""

    def __init__(self, budget: CacheBudget, quota: PeerQuota = PeerQuota()):
        self.budget = budget
        self.quota = quota
        self._sessions: dict[bytes, HostedSession] = {}
        self._by_owner: dict[object, tuple[int, int]] = {}  # owner -> (sessions, cache tokens)
        self._closed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(
        self, token: bytes, batch: int, max_length: int, allocate, owner: object = None
    ) -> HostedSession:
        """Reserves the cache and registers a session; ``allocate(batch, max_length) -> KVCache``.

        Args:
            owner: who opens it (the client's CURVE key); quotas count per owner.
        Raises:
            MalformedMessage: bad sizes, or the token is in use.
            ServerBusy: the budget cannot hold it, or the owner is at its quota.
        """
        if batch < 1 or max_length < 1:
            raise MalformedMessage(f"batch {batch} and max_length {max_length} must be positive")
        if len(token) < 8:
            raise MalformedMessage("session token must have at least 8 bytes")
        if token in self._sessions:
            raise MalformedMessage("session token already in use")
        tokens = batch * max_length
        sessions, held = self._by_owner.get(owner, (0, 0))
        if sessions >= self.quota.max_sessions:
            raise ServerBusy(f"this client holds {sessions} sessions here, the most one client may")
        if held + tokens > self.quota.max_cache_tokens:
            raise ServerBusy(
                f"per-client cache budget: this client holds {held} tokens here, {tokens} more would "
                f"exceed its share of {self.quota.max_cache_tokens}"
            )
        self.budget.reserve(tokens)
        try:
            session = HostedSession(
                token, allocate(batch, max_length), batch, max_length, owner=owner,
                mailbox_steps=self.quota.mailbox_steps,
            )  # fmt: skip
        except BaseException:
            self.budget.release(tokens)
            raise
        self._sessions[token] = session
        self._by_owner[owner] = (sessions + 1, held + tokens)
        return session

    def close(self, session: HostedSession) -> None:
        if self._sessions.pop(session.token, None) is session:
            self.budget.release(session.tokens)
            sessions, held = self._by_owner.pop(session.owner, (1, session.tokens))
            if sessions > 1:
                self._by_owner[session.owner] = (sessions - 1, held - session.tokens)
        self._closed.set()

    async def wait_until_empty(self, timeout: float) -> None:
        """Returns once no session is open, or after ``timeout`` seconds (a drain's bound)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._sessions) and loop.time() < deadline:
            self._closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), deadline - loop.time())

    def get(self, token: bytes) -> HostedSession | None:
        return self._sessions.get(token)
