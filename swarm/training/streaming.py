"""Streaming DiLoCo in a training member: fragment syncs that overlap the inner steps.

Every H/P inner steps the member starts the outer step of one fragment (see
:mod:`~swarm.training.fragments` for the layout and schedule): it takes the fragment's
pseudo-gradient ``theta_global - theta_local`` and hands the matchmaking and all-reduce
to a task, while the inner loop keeps training. The result is needed only ``tau``
inner steps later (``--overlap-steps``); then the fragment's outer step runs and the
new ``theta_global`` of the fragment is merged with the local fragment, which moved on
meanwhile (Douillard et al. 2025, arXiv:2501.18512, section 2.2):

- ``tau = 0``: the local fragment is replaced, as in plain DiLoCo;
- otherwise ``local = alpha * local + (1 - alpha) * global`` (``--mix-alpha``, 0.5 in the paper);
- ``--eager`` (Kale et al. 2025, "Eager Updates", arXiv:2502.12996): when the exchange
  starts, the local fragment jumps to the outer step it would take with the last
  average in which this member's own share is replaced by its fresh pseudo-gradient;
  when the true average arrives, the local fragment keeps what it learned since and
  moves by the difference between the true and the eager outer step.

``theta_global`` changes only at those join points, on the event loop between inner
steps, so a state download or a checkpoint always sees every fragment at the same
outer step, and members stay bit-identical fragment by fragment (the hash of
``theta_global`` is compared at every matchmaking, as in plain DiLoCo).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from swarm.training.fragments import (
    Fragment,
    fragment_of_round,
    gather_views,
    model_fragments,
    outer_step_values,
    scatter_views_,
    step_fragment,
)
from swarm.training.progress import TrainerState
from swarm.training.replica import Replica

if TYPE_CHECKING:
    from swarm.training.averaging import AveragingOutcome
    from swarm.training.matchmaking import Group

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exchange:
    """One outer step's group and all-reduce outcome (the average is ``outcome.averaged``)."""

    round_index: int
    group: Group
    outcome: AveragingOutcome


class Trainer(Protocol):
    """What the streaming loop uses of ``swarm.training.trainer.Trainer`` (which runs it)."""

    config: Any
    replica: Replica
    membership: Any
    state_sync: Any
    fragment_last_round: int
    wait_seconds: float
    streaming: StreamingReplica | None

    async def exchange(self, round_index: int, pseudo_gradient, samples: float) -> Exchange | None: ...

    async def finish_exchange(self, exchanged: Exchange) -> None: ...


@dataclass(frozen=True)
class StreamingConfig:
    """Streaming DiLoCo settings (``swarm train``'s ``--streaming-fragments`` and friends)."""

    fragments: int = 1
    """P: fragments of the model, each with its own outer step every H inner steps."""
    overlap_steps: int = 0
    """tau: inner steps a fragment's exchange may take before its result is needed."""
    mix_alpha: float = 0.5
    """Weight of the local fragment when the new global one arrives after an overlap."""
    eager: bool = False
    """Step the local fragment with this member's fresh outer gradient while the average is in flight."""
    inner_steps: int = 50
    """H (copied from the trainer's settings)."""

    def __post_init__(self) -> None:
        if self.fragments < 1:
            raise ValueError(f"--streaming-fragments must be >= 1, got {self.fragments}")
        if self.inner_steps % self.fragments:
            raise ValueError(
                f"--inner-steps ({self.inner_steps}) must be a multiple of --streaming-fragments ({self.fragments})"
            )
        if not 0 <= self.overlap_steps <= self.sync_every:
            raise ValueError(
                f"--overlap-steps must be between 0 and --inner-steps / --streaming-fragments "
                f"({self.sync_every}), got {self.overlap_steps}"
            )
        if not 0 <= self.mix_alpha <= 1:
            raise ValueError(f"--mix-alpha must be in [0, 1], got {self.mix_alpha}")

    @property
    def sync_every(self) -> int:
        """Inner steps between two fragment syncs: H / P."""
        return self.inner_steps // self.fragments

    @property
    def enabled(self) -> bool:
        """Whether to run the streaming loop (plain DiLoCo otherwise)."""
        return self.fragments > 1 or self.overlap_steps > 0 or self.eager


@dataclass
class Pending:
    """A fragment sync started and not yet joined."""

    fragment: Fragment
    due_step: int
    """``replica.inner_step`` at which the result is needed."""
    weight: float = 0.0
    """The samples this sync's contribution stands for (given back if the exchange fails)."""
    eager_local: torch.Tensor | None = None
    """The local fragment the eager outer step set (None: no eager step)."""
    own: torch.Tensor | None = None
    """This member's pseudo-gradient (kept only for eager updates)."""


class StreamingReplica:
    """The fragment syncs of one :class:`~swarm.training.replica.Replica`: begin, and finish.

    Args:
        replica: the member's replica (its ``outer`` holds every fragment's ``theta_global``).
        config: P, tau, alpha and eager.
    """

    def __init__(self, replica: Replica, config: StreamingConfig):
        self.replica = replica
        self.config = config
        self.fragments = model_fragments(replica.model, config.fragments)
        self._views = [fragment.views(replica.model) for fragment in self.fragments]
        self.samples_since_sync = [0.0] * config.fragments
        """Samples trained since each fragment's last sync: the weight of its next contribution."""
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        """Eager: per fragment, (this member's last pseudo-gradient, the last average, its share)."""

    def next_fragment(self) -> Fragment:
        return self.fragments[fragment_of_round(self.replica.round, self.config.fragments)]

    def add_samples(self, samples: float) -> None:
        self.samples_since_sync = [count + samples for count in self.samples_since_sync]

    @torch.no_grad()
    def begin(self, fragment: Fragment, due_step: int) -> tuple[Pending, torch.Tensor, float]:
        """Start ``fragment``'s sync: returns the pending sync, the pseudo-gradient to average, its weight."""
        views = self._views[fragment.index]
        pseudo_gradient = fragment.gather(self.replica.outer.parameters.detach()) - gather_views(views)
        weight = self.samples_since_sync[fragment.index]
        self.samples_since_sync[fragment.index] = 0.0
        pending = Pending(fragment, due_step, weight)
        if self.config.eager and self.config.overlap_steps > 0:
            pending.own = pseudo_gradient.clone()
            if fragment.index in self._last:
                last_own, last_average, share = self._last[fragment.index]
                estimate = last_average + share * (pseudo_gradient - last_own)
                global_values = fragment.gather(self.replica.outer.parameters.detach())
                momentum = self.replica.outer.momentum
                eager, _ = outer_step_values(
                    self.replica.outer,
                    global_values,
                    None if momentum is None else fragment.gather(momentum),
                    estimate,
                )
                scatter_views_(views, eager)
                pending.eager_local = eager
        return pending, pseudo_gradient, weight

    @torch.no_grad()
    def finish(self, pending: Pending, averaged: torch.Tensor, members: int) -> None:
        """The group's average arrived: outer step of the fragment, then merge the local fragment."""
        fragment = pending.fragment
        step_fragment(self.replica.outer, fragment, averaged)
        new_global = fragment.gather(self.replica.outer.parameters.detach())
        views = self._views[fragment.index]
        if self.config.overlap_steps == 0:
            scatter_views_(views, new_global)  # plain DiLoCo: start again from theta_global
        elif pending.eager_local is not None:
            scatter_views_(views, gather_views(views) + (new_global - pending.eager_local))
        else:
            alpha = self.config.mix_alpha
            scatter_views_(views, alpha * gather_views(views) + (1 - alpha) * new_global)
        if pending.own is not None:
            self._last[fragment.index] = (pending.own, averaged.clone(), 1.0 / max(1, members))
        self.replica.zero_update_next_round = False

    @torch.no_grad()
    def abandon(self, pending: Pending) -> None:
        """The exchange failed: ``theta_global`` stays; the work goes into the fragment's next sync."""
        self.samples_since_sync[pending.fragment.index] += pending.weight
        if pending.eager_local is not None:  # undo the eager step, keep what was learned since
            views = self._views[pending.fragment.index]
            current = pending.fragment.gather(self.replica.outer.parameters.detach())
            scatter_views_(views, gather_views(views) + (current - pending.eager_local))

    def forget(self) -> None:
        """After a state download: the eager history and the sample counts refer to other parameters."""
        self._last.clear()
        self.samples_since_sync = [0.0] * self.config.fragments

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the syncs between outer steps: each fragment's samples since
        its last sync (the weight of its next contribution) and the eager history, tied to the
        ``theta_global`` they belong to (its hash)."""
        return {
            "fragments": self.config.fragments,
            "global_hash": self.replica.parameters_hash(),
            "samples_since_sync": list(self.samples_since_sync),
            "eager": {index: list(entry) for index, entry in self._last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Takes back a :meth:`state_dict` written at this member's current ``theta_global``.

        Returns:
            False (and keeps the fresh state) when ``state`` belongs to other parameters (a
            state download since the checkpoint) or another ``--streaming-fragments``.
        """
        if state.get("fragments") != self.config.fragments:
            logger.warning(
                "the checkpoint's streaming state is for %s fragments, not %d: starting the syncs afresh",
                state.get("fragments"), self.config.fragments,
            )  # fmt: skip
            return False
        if state.get("global_hash") != self.replica.parameters_hash():
            return False  # theta_global changed since (downloaded): the history is of other parameters
        eager = {}
        for index, (own, average, share) in state["eager"].items():
            size = self.fragments[index].numel
            if own.numel() != size or average.numel() != size:
                raise ValueError(f"checkpoint: eager history of fragment {index} has the wrong size")
            eager[index] = (own, average, float(share))
        self.samples_since_sync = [float(count) for count in state["samples_since_sync"]]
        self._last = eager
        return True


class StreamingLoop:
    """The inner loop of a streaming member: trains, starts fragment syncs, joins them ``tau`` steps later.

    Args:
        trainer: the member (its ``exchange`` / ``finish_exchange`` do one outer step's
            matchmaking and all-reduce, as in plain DiLoCo).
        config: the streaming settings.
    """

    def __init__(self, trainer: Trainer, config: StreamingConfig, resumed: dict[str, Any] | None = None):
        self.trainer = trainer
        self.config = config
        self.streaming = StreamingReplica(trainer.replica, config)
        if resumed is not None and self.streaming.load_state_dict(resumed):
            logger.info(
                "resumed the fragment syncs' state (sample counts, eager history) from the checkpoint"
            )
        trainer.streaming = self.streaming
        self._publishing: asyncio.Task | None = None

    async def run(self, stop: asyncio.Event) -> None:
        trainer, config = self.trainer, self.trainer.config
        rounds_done, losses, segment = 0, [], 0
        pending: tuple[Pending, asyncio.Task] | None = None
        peek: tuple[int, asyncio.Task] | None = None  # (round, whether others already exchange it)
        last_peek = time.monotonic()
        started, samples = time.monotonic(), 0
        try:
            while not stop.is_set() and not (config.max_rounds and rounds_done >= config.max_rounds):
                losses.append(await trainer.train_step())
                segment += 1
                samples += config.batch_size
                self.streaming.add_samples(config.batch_size)
                trainer.tokens_per_second = samples * config.seq_len / max(time.monotonic() - started, 1e-9)
                trainer.loss = sum(losses[-10:]) / len(losses[-10:])
                if pending is not None and trainer.replica.inner_step >= pending[0].due_step:
                    rounds_done += await self._join(*pending)
                    pending = None
                # a slower member ends its segment when the others already exchange its next sync
                next_round = trainer.replica.round + (pending is not None)
                others_ahead = (
                    peek is not None and peek[0] == next_round and peek[1].done() and peek[1].result()
                )
                if segment < self.config.sync_every and not others_ahead:
                    if peek is None or (peek[1].done() and time.monotonic() - last_peek >= 1.0):
                        last_peek = time.monotonic()
                        peek = (
                            next_round,
                            asyncio.create_task(trainer.membership.others_averaging(next_round)),
                        )
                    continue
                if pending is not None:  # tau == H/P: the last sync is due just as the next starts
                    rounds_done += await self._join(*pending)
                    pending = None
                if peek is not None:
                    peek[1].cancel()
                segment, peek = 0, None
                pending = self._start()
                if self.config.overlap_steps == 0:
                    rounds_done += await self._join(*pending)
                    pending = None
        finally:
            if peek is not None:
                peek[1].cancel()
            if pending is not None:  # leave after the sync in flight, as plain DiLoCo ends its round
                await self._join(*pending)
            if self._publishing is not None:
                await self._publishing

    def _publish_soon(self) -> None:
        """Publish the record without holding up the inner loop (one publication at a time)."""
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.create_task(self.trainer.publish(TrainerState.TRAINING))

    def _start(self) -> tuple[Pending, asyncio.Task]:
        trainer = self.trainer
        fragment = self.streaming.next_fragment()
        due = trainer.replica.inner_step + self.config.overlap_steps
        pending, pseudo_gradient, weight = self.streaming.begin(fragment, due)
        task = asyncio.create_task(self._exchange(trainer.replica.round, pseudo_gradient, weight))
        return pending, task

    async def _exchange(self, round_index: int, pseudo_gradient: torch.Tensor, weight: float):
        """Runs while the inner loop trains: catch-up check, matchmaking, all-reduce.

        Returns the exchange, None when skipped, or the active members when the run is ahead
        (the download then happens at the join point, between inner steps)."""
        trainer = self.trainer
        others = await trainer.membership.others_active()
        if max((record.round for record in others.values()), default=-1) > round_index:
            return others
        return await trainer.exchange(round_index, pseudo_gradient, weight)

    async def _join(self, pending: Pending, task: asyncio.Task) -> int:
        """Wait for a sync's exchange, take its outer step, merge, checkpoint and log. Returns 1 if averaged."""
        trainer = self.trainer
        waited = time.monotonic()
        result = await task
        trainer.wait_seconds = time.monotonic() - waited
        if isinstance(result, dict):  # the run is ahead of us: download its state now
            self.streaming.abandon(pending)
            await trainer.state_sync.catch_up(result)
            self.streaming.forget()
            self._publish_soon()
            return 0
        if result is None:
            self.streaming.abandon(pending)
            self._publish_soon()
            return 0
        exchanged: Exchange = result
        self.streaming.finish(pending, exchanged.outcome.averaged, len(exchanged.group.members))
        trainer.fragment_last_round = pending.fragment.index
        await trainer.finish_exchange(exchanged)
        if exchanged.group.resync_from:
            self.streaming.forget()
        self._publish_soon()
        fragment_hash = _hash_fragment(trainer.replica, pending.fragment)
        trainer.round_done(
            f", fragment {pending.fragment.index} hash {fragment_hash}, waited {trainer.wait_seconds:.3f} s"
        )
        return 1


def _hash_fragment(replica: Replica, fragment: Fragment) -> str:
    from swarm.training.diloco import hash_parameters

    return hash_parameters(fragment.gather(replica.outer.parameters.detach()))[:16]
