"""A DiLoCo training member: inner steps, matchmaking, all-reduce, outer step, repeat.

The trainer owns no processes or sockets of its own: it is handed a running
:class:`~swarm.dht.SwarmDHT` and a bound transport endpoint (``peers/train.py`` does
the wiring), so tests can run several trainers in one process or in many. It holds
the round logic (:meth:`Trainer._average`) and the loop around it; each concern it
relies on lives in its own module:

- :mod:`~swarm.training.trainer_config`: the member's settings (``swarm train``'s flags);
- :mod:`~swarm.training.replica`: the model, inner and outer optimisers, data position;
- :mod:`~swarm.training.membership`: the run's records in the DHT, this member's own;
- :mod:`~swarm.training.matchmaking`: forming each round's group;
- :mod:`~swarm.training.averaging`: the all-reduce of pseudo-gradients;
- :mod:`~swarm.training.state`: giving state to members that join, catching up;
- :mod:`~swarm.training.run_checkpoint`: what a checkpoint holds, written atomically.

The trainer never kills or exits its process: ``before_send`` (see
:class:`~swarm.training.averaging.AllReduceSend`) lets the process layer inject faults.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from swarm.dht import SwarmDHT
from swarm.training.allreduce import AllReduceReport
from swarm.training.averaging import AveragingService, BeforeContribute, BeforeSend
from swarm.training.data import load_corpus, member_seed
from swarm.training.matchmaking import JoinGroup, Matchmaker
from swarm.training.membership import RunMembership
from swarm.training.progress import TrainerState, TrainingPeerRecord
from swarm.training.replica import Replica
from swarm.training.run_checkpoint import (
    checkpoint_refusal,
    checkpoint_state,
    load_training_state,
    restore_checkpoint,
    save_training_state,
)
from swarm.training.state import StateSync
from swarm.training.streaming import Exchange, StreamingLoop, StreamingReplica
from swarm.training.trainer_config import TrainerConfig
from swarm.training.training_model import load_or_init_model
from transport import BaseEndpoint
from transport.errors import SwarmError

logger = logging.getLogger(__name__)


class Trainer:
    """One member of a DiLoCo run.

    Args:
        config: the member's settings.
        dht: a started DHT of the swarm.
        endpoint: a bound transport endpoint; ``address`` is how others reach it.
        address: the endpoint's public address.
        version: software version to announce.
        on_progress: called with each published record (for logs, metrics, telemetry).
        before_send: called before each all-reduce message this member sends (the
            process layer's fault injection); see :class:`~swarm.training.averaging.AllReduceSend`.
        before_contribute: called with (round, pseudo-gradient, sample weight) before this
            member's contribution goes into the all-reduce; returns the weight to send and
            may change the pseudo-gradient in place. The process layer's test-only attacker
            (``SWARM_ATTACK`` in ``peers/train.py``) uses it; the library never does.
    """

    def __init__(
        self,
        config: TrainerConfig,
        dht: SwarmDHT,
        endpoint: BaseEndpoint,
        address: str,
        version: str = "0",
        on_progress: Callable[[TrainingPeerRecord], None] | None = None,
        before_send: BeforeSend | None = None,
        reachability=None,
        before_contribute: BeforeContribute | None = None,
    ):
        self.config = config
        self.reachability = reachability  # swarm.reachability.Reachability, announced
        self.endpoint = endpoint
        self.address = address
        self.version = version
        self.on_progress = on_progress
        self.before_contribute = before_contribute
        self.membership = RunMembership(dht, config.run, config.record_ttl)
        self.peer_id = self.membership.peer_id
        self.libp2p_peer = dht.libp2p_peer_id  # who we are when we call a relayed member
        self.averaging = AveragingService(
            endpoint,
            config.compression,
            registration_wait=config.matchmaking_seconds,
            before_send=before_send,
        )
        self.matchmaker = Matchmaker(
            endpoint,
            self.membership.live_addresses,
            window=config.matchmaking_seconds,
            relayed_members=lambda: self.membership.relayed,
        )
        model = load_or_init_model(Path(config.model), config.random_init_seed)
        self.replica = Replica(model, config.diloco)
        self.state_sync = StateSync(
            endpoint,
            config.run,
            self.peer_id,
            self.replica,
            config.phase_timeout,
            has_state=lambda: self.state != TrainerState.JOINING,
        )
        self.state = TrainerState.JOINING
        self.loss = float("nan")
        self.loss_history: list[tuple[int, float]] = []
        self.tokens_per_second = 0.0
        self.bytes_last_round = 0
        self.members_last_round = 0
        self.named_last_round: dict[str, tuple[str, ...]] = {"rejected": (), "clipped": (), "accused": ()}
        """Peer ids whose contribution or reduced part this member dropped, clipped or caught lying."""
        self._last_good_loss: float | None = None  # probe loss at the last checkpoint written
        self.inner_seconds = 0.0  # time spent in inner steps since training started
        self.training_since = 0.0  # time.monotonic() when training started
        self.wait_seconds = 0.0  # streaming: how long the inner loop last waited for an exchange
        self.fragment_last_round = 0  # streaming: the fragment the last outer step synced
        self.streaming: StreamingReplica | None = None  # streaming: the fragment syncs (set by StreamingLoop)
        # streaming: the checkpoint's state of the fragment syncs, for the loop to take back
        self._resumed_streaming: dict | None = None

    # -- the loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Train until ``stop`` is set or ``max_rounds`` rounds are done; leave cleanly."""
        await asyncio.to_thread(self._attach_data)
        resumed = self._resume()
        await self.state_sync.join(await self.membership.others_active(), resumed)
        await self.publish(TrainerState.TRAINING)
        try:
            async with asyncio.TaskGroup() as tasks:
                refresher = tasks.create_task(self._refresh_record(stop))
                self.training_since = time.monotonic()
                if self.config.streaming.enabled:
                    await StreamingLoop(self, self.config.streaming, self._resumed_streaming).run(stop)
                else:
                    await self._plain_loop(stop)
                refresher.cancel()
        finally:
            await self.publish(TrainerState.LEAVING)
            await self.averaging.close()

    async def _plain_loop(self, stop: asyncio.Event) -> None:
        """Plain DiLoCo: inner phase, then the whole model's outer step, waiting for it."""
        rounds_done = 0
        while not stop.is_set() and not (self.config.max_rounds and rounds_done >= self.config.max_rounds):
            samples = await self._inner_phase(stop)
            if stop.is_set():
                break
            averaged = await self._average(samples)
            # publish first: once the log names a round, records and metrics show it
            await self.publish(TrainerState.TRAINING)
            if averaged:
                rounds_done += 1
                self.round_done()

    def round_done(self, detail: str = "") -> None:
        """Checkpoint and log a completed outer step (tests and benchmarks read this line)."""
        self._checkpoint()
        logger.info(
            "round %d done: loss %.4f, %d members, hash %s, %.2f MB sent, %.0f tokens/s, inner %.2f of %.2f s%s",
            self.replica.round,
            self.loss,
            self.members_last_round,
            self.replica.parameters_hash()[:16],
            self.bytes_last_round / 1e6,
            self.tokens_per_second,
            self.inner_seconds,
            time.monotonic() - self.training_since,
            detail,
        )

    def inner_share(self) -> float:
        """The share of wall time since training started that went into inner steps."""
        elapsed = time.monotonic() - self.training_since if self.training_since else 0.0
        return self.inner_seconds / elapsed if elapsed > 0 else 0.0

    async def train_step(self) -> float:
        """One inner step (in a worker thread, so the all-reduce runs meanwhile); counts its time."""
        started = time.monotonic()
        loss = await asyncio.to_thread(self.replica.train_step, self.config.batch_size)
        self.inner_seconds += time.monotonic() - started
        self.replica.inner_step += 1
        return loss

    async def _inner_phase(self, stop: asyncio.Event) -> int:
        """Inner steps until the round's target, a stop, or (for a slower member) the others averaging."""
        started, samples, losses = time.monotonic(), 0, []
        last_check = started
        while not stop.is_set():
            losses.append(await self.train_step())
            samples += self.config.batch_size
            elapsed = time.monotonic() - started
            self.tokens_per_second = samples * self.config.seq_len / max(elapsed, 1e-9)
            if self.config.round_seconds and elapsed >= self.config.round_seconds:
                break
            if not self.config.round_seconds and len(losses) >= self.config.inner_steps:
                break
            if time.monotonic() - last_check >= 1.0:  # a slower member ends its round with the others
                last_check = time.monotonic()
                if await self.membership.others_averaging(self.replica.round):
                    logger.info("others are averaging round %d: ending this round early", self.replica.round)
                    break
        self.loss = sum(losses[-10:]) / max(1, len(losses[-10:]))
        return samples

    async def _average(self, samples: int) -> bool:
        """Matchmaking, all-reduce and outer step of the current round. Returns False if skipped."""
        if await self.state_sync.catch_up(await self.membership.others_active()):
            return False
        pseudo_gradient = self.replica.pseudo_gradient()
        exchanged = await self.exchange(self.replica.round, pseudo_gradient, float(samples))
        if exchanged is None:
            return False
        self.replica.apply_outer_step(exchanged.outcome.averaged)
        await self.finish_exchange(exchanged)
        return True

    async def exchange(self, round_index: int, pseudo_gradient, samples: float) -> Exchange | None:
        """Form the group of outer step ``round_index`` and average ``pseudo_gradient`` with it
        (in place), weighted by ``samples``. Returns None (logged) when it could not."""
        await self.publish(TrainerState.AVERAGING)
        me = JoinGroup(
            round_index,
            self.peer_id,
            self.address,
            self.endpoint.public_key,
            self._reducer_bandwidth(),
            self.replica.parameters_hash(),
        )
        group = await self.matchmaker.form_group(round_index, me)
        if group is None:
            logger.warning("round %d: no group formed; training on", round_index)
            return None
        # a member that just synced, or is about to re-sync, adds nothing but still averages
        weight = 0.0 if self.replica.zero_update_next_round or group.resync_from else samples
        if self.before_contribute is not None:
            weight = self.before_contribute(round_index, pseudo_gradient, weight)
        try:
            outcome = await self.averaging.all_reduce(
                f"{self.config.run}/{round_index}",
                group.members,
                group.my_index,
                pseudo_gradient,
                weight,
                self.config.allreduce_timeouts,
                out=pseudo_gradient,  # in place: no second model-sized buffer per round
                robust=self.config.robust,
                verify=self.config.verify_reducers,
            )
        except SwarmError as error:
            logger.warning("round %d: all-reduce failed (%s); training on", round_index, error)
            return None
        self._name_suspects(round_index, group.members, outcome.report)
        return Exchange(round_index, group, outcome)

    async def finish_exchange(self, exchanged: Exchange) -> None:
        """After the outer step of ``exchanged``: note it, and re-sync if we disagreed with the group."""
        group = exchanged.group
        self.bytes_last_round = exchanged.outcome.bytes_sent
        self.members_last_round = len(group.members)
        self.loss_history.append((self.replica.round, self.loss))
        if group.resync_from:
            logger.error(
                "round %d: our parameters disagreed with the majority; re-syncing from %s",
                exchanged.round_index,
                group.resync_from[:12],
            )
            await self.state_sync.sync_from(group.resync_from, await self.membership.members())
            self.replica.zero_update_next_round = False  # the donor's state is exactly the group's result

    def _name_suspects(self, round_index: int, members: list, report: AllReduceReport) -> None:
        """Log and keep (for the record) whom this round's validation and verification named."""

        def peers(positions) -> tuple[str, ...]:
            return tuple(sorted({members[i].peer_id for i in positions}))

        self.named_last_round = {
            "rejected": peers(i for part in report.rejected.values() for i in part),
            "clipped": peers(i for part in report.clipped.values() for i in part),
            "accused": peers(report.accused),
        }
        for kind, named in self.named_last_round.items():
            if named:
                log = logger.error if kind != "clipped" else logger.warning
                log("round %d: %s the contribution or result of %s", round_index, kind, ", ".join(named))
        if report.disputed:
            logger.error(
                "round %d: parts %s were disputed between their reducer and backup; arbiters decided",
                round_index,
                sorted(report.disputed),
            )

    # -- data and checkpoints ----------------------------------------------------------

    def _attach_data(self) -> None:
        config = self.config
        tokenizer = Path(config.model) / "tokenizer.json"
        tokens = load_corpus(config.data, tokenizer, config.corpus_bytes, config.checkpoint_dir)
        self.replica.attach_data(tokens, config.seq_len, member_seed(self.peer_id, config.seed))

    def _resume(self) -> bool:
        """Restore the last checkpoint of ``--checkpoint-dir``, if any. Returns True if there was one."""
        checkpoint = load_training_state(self.config.checkpoint_dir) if self.config.checkpoint_dir else None
        if checkpoint is None:
            return False
        self.loss_history = restore_checkpoint(self.replica, checkpoint)
        self._resumed_streaming = checkpoint.get("streaming")
        self._last_good_loss = self.replica.probe_loss()
        logger.info("resumed from checkpoint at round %d", self.replica.round)
        return True

    def _checkpoint(self) -> None:
        """Write a checkpoint, unless the parameters are not finite or their loss exploded:
        then say so loudly and keep the last good one."""
        if not self.config.checkpoint_dir:
            return
        probe = self.replica.probe_loss()
        refusal = checkpoint_refusal(
            self.replica.parameters_finite(),
            probe,
            self._last_good_loss,
            self.config.checkpoint_explosion_factor,
        )
        if refusal is not None:
            logger.error(
                "round %d: NOT writing a checkpoint: %s; keeping the last good one in %s",
                self.replica.round,
                refusal,
                self.config.checkpoint_dir,
            )
            return
        streaming = None if self.streaming is None else self.streaming.state_dict()
        save_training_state(
            self.config.checkpoint_dir, checkpoint_state(self.replica, self.loss_history, streaming)
        )
        self._last_good_loss = probe

    def _reducer_bandwidth(self) -> float:
        """Declared bandwidth for the all-reduce; 0 (no reducer share) when reached only through relays."""
        relayed = self.reachability is not None and not self.reachability.direct
        return 0.0 if relayed else self.config.bandwidth

    # -- records -----------------------------------------------------------------------

    def record(self) -> TrainingPeerRecord:
        from hivemind.utils import get_dht_time

        return TrainingPeerRecord(
            state=self.state,
            round=self.replica.round,
            inner_step=self.replica.inner_step,
            loss=self.loss if self.loss == self.loss else 0.0,
            loss_history=tuple(self.loss_history),
            tokens_per_second=self.tokens_per_second,
            bytes_last_round=self.bytes_last_round,
            members_last_round=self.members_last_round,
            parameters_hash=self.replica.parameters_hash(),
            addresses=(self.address,),
            curve_public_key=self.endpoint.public_key,
            bandwidth=self.config.bandwidth,
            version=self.version,
            updated_at=get_dht_time(),
            reachability=self.reachability,
            libp2p_peer=self.libp2p_peer,
            **self.named_last_round,
            fragments=1 if self.streaming is None else len(self.streaming.fragments),
            fragment=self.fragment_last_round,
            wait_seconds=self.wait_seconds,
            inner_share=self.inner_share(),
        )

    async def publish(self, state: TrainerState | None = None) -> None:
        if state is not None:
            self.state = state
        record = self.record()
        await self.membership.publish(record)
        if self.on_progress is not None:
            self.on_progress(record)

    async def _refresh_record(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.record_ttl / 3)
            except TimeoutError:
                await self.publish()
