"""A DiLoCo training member: inner steps, matchmaking, all-reduce, outer step, repeat.

The trainer owns no processes or sockets of its own: it is handed a running
:class:`~swarm.dht.SwarmDHT` and a bound transport endpoint (``peers/train.py`` does
the wiring), so tests can run several trainers in one process or in many.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swarm.dht import SwarmDHT
from swarm.training.allreduce import AllReduceTimeouts
from swarm.training.averaging import AveragingService
from swarm.training.checkpoint import load_training_state, save_training_state
from swarm.training.data import WindowSampler, default_corpus_dir, list_text_files, tokenize_corpus
from swarm.training.diloco import (
    CachedHash,
    DiLoCoConfig,
    OuterOptimizer,
    flatten_parameters,
    hash_parameters,
    load_flat_parameters_,
    make_inner_optimizer,
)
from swarm.training.matchmaking import JoinGroup, Matchmaker
from swarm.training.model import language_model_loss, load_or_init_model
from swarm.training.progress import (
    TrainerState,
    TrainingPeerRecord,
    parse_run_listing,
    run_index_entry,
    run_key,
)
from swarm.training.state import StateReply, StateRequest, choose_donor, download_state
from transport import BaseEndpoint, CodedTensor, RawCodec, RequestContext, ServerBusy
from transport.errors import SwarmError

logger = logging.getLogger(__name__)


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of one training member; ``swarm train`` maps its flags 1:1 onto these."""

    run: str = _opt("demo", "name of the training run to start or join")
    model: str = _opt(
        "", "checkpoint directory: config.json, tokenizer.json and (unless --init random) weights"
    )
    init: str = _opt(
        "checkpoint", "how the first member initialises the run: 'checkpoint' weights or 'random'"
    )
    seed: int = _opt(0, "seed of the random init and of this peer's data order (mixed with its peer id)")
    data: str = _opt("", "directory of text files; empty: the Python standard library's sources")
    corpus_bytes: int = _opt(4_000_000, "bytes of text to read from the corpus")
    seq_len: int = _opt(128, "tokens per training sequence")
    batch_size: int = _opt(8, "sequences per inner step")
    inner_steps: int = _opt(50, "H: inner steps per round (ignored with --round-seconds)")
    round_seconds: float = _opt(
        0.0, "end each round after this many seconds of inner steps instead (0: use H)"
    )
    max_rounds: int = _opt(0, "stop after this many outer rounds (0: run until stopped)")
    compression: str = _opt("int8", "pseudo-gradient codec on the wire: int8, 4bit, fp16 or none")
    inner_lr: float = _opt(4e-4, "peak inner AdamW learning rate (DiLoCo: 4e-4)")
    warmup_steps: int = _opt(100, "inner learning-rate warm-up steps")
    outer_lr: float = _opt(0.7, "outer Nesterov learning rate (DiLoCo: 0.7)")
    outer_momentum: float = _opt(0.9, "outer Nesterov momentum (DiLoCo: 0.9)")
    matchmaking_seconds: float = _opt(15.0, "how long a round's leader waits for the other members")
    phase_timeout: float = _opt(60.0, "deadline of each all-reduce phase, in seconds")
    bandwidth: float = _opt(100e6, "declared bytes/s; sets this member's share of the all-reduce")
    checkpoint_dir: str = _opt("", "write checkpoints here and resume from them (empty: no checkpoints)")
    record_ttl: float = _opt(30.0, "seconds this member's run record lives unless refreshed")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(
                "--model is required: a checkpoint directory with config.json and tokenizer.json"
            )
        if self.init not in ("checkpoint", "random"):
            raise ValueError(f"--init must be 'checkpoint' or 'random', got {self.init!r}")
        for name in ("seq_len", "batch_size", "inner_steps", "corpus_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.matchmaking_seconds <= 0 or self.phase_timeout <= 0 or self.record_ttl <= 0:
            raise ValueError("--matchmaking-seconds, --phase-timeout and --record-ttl must be positive")

    @property
    def diloco(self) -> DiLoCoConfig:
        return DiLoCoConfig(
            inner_lr=self.inner_lr,
            warmup_steps=self.warmup_steps,
            outer_lr=self.outer_lr,
            outer_momentum=self.outer_momentum,
        )


@dataclass(frozen=True)
class FaultInjection:
    """Kill this process (SIGKILL) as it sends the all-reduce message ``kind`` in its
    ``nth`` all-reduce (counting from 1) among at least ``min_members`` members.

    Read from ``SWARM_FAULT=nth:kind[:min_members]``, e.g. ``2:result:3``; for tests and
    demos only. Counting this member's own all-reduces rather than naming a round makes
    the fault independent of when it joined the run.
    """

    nth: int
    kind: str
    min_members: int = 2

    @classmethod
    def from_environment(cls) -> FaultInjection | None:
        value = os.environ.get("SWARM_FAULT", "")
        if not value:
            return None
        try:
            nth, kind, *rest = value.split(":")
            return cls(int(nth), kind, *(int(r) for r in rest[:1]))
        except ValueError:
            raise ValueError(
                f"SWARM_FAULT={value!r}: expected nth:kind[:min_members], e.g. 2:result:3"
            ) from None


class Trainer:
    """One member of a DiLoCo run.

    Args:
        config: the member's settings.
        dht: a started DHT of the swarm.
        endpoint: a bound transport endpoint; ``address`` is how others reach it.
        address: the endpoint's public address.
        version: software version to announce.
        on_progress: called with each published record (for logs, metrics, telemetry).
    """

    def __init__(
        self,
        config: TrainerConfig,
        dht: SwarmDHT,
        endpoint: BaseEndpoint,
        address: str,
        version: str = "0",
        on_progress: Callable[[TrainingPeerRecord], None] | None = None,
    ):
        self.config = config
        self.dht = dht
        self.endpoint = endpoint
        self.address = address
        self.version = version
        self.on_progress = on_progress
        self.peer_id = str(dht.peer_id)
        self.key = run_key(dht.swarm_name, config.run)
        self.averaging = AveragingService(
            endpoint, config.compression, registration_wait=config.matchmaking_seconds
        )
        self.matchmaker = Matchmaker(endpoint, self._live_members, window=config.matchmaking_seconds)
        endpoint.add_handler(StateRequest, self._on_state_request)
        self.fault = FaultInjection.from_environment()
        self.fault_countdown = self.fault.nth if self.fault else 0
        self._parameters_hash = CachedHash()
        self.model = load_or_init_model(Path(config.model), config.seed if config.init == "random" else None)
        self.outer = OuterOptimizer(flatten_parameters(self.model), config.diloco)
        self.inner, self.schedule = make_inner_optimizer(self.model, config.diloco)
        self.sampler: WindowSampler | None = None
        self.state = TrainerState.JOINING
        self.inner_step = 0
        self.loss = float("nan")
        self.loss_history: list[tuple[int, float]] = []
        self.tokens_per_second = 0.0
        self.bytes_last_round = 0
        self.members_last_round = 0
        self.zero_update_next_round = False

    # -- records -----------------------------------------------------------------------

    def record(self) -> TrainingPeerRecord:
        from hivemind.utils import get_dht_time

        return TrainingPeerRecord(
            state=self.state,
            round=self.outer.round,
            inner_step=self.inner_step,
            loss=self.loss if self.loss == self.loss else 0.0,
            loss_history=tuple(self.loss_history),
            tokens_per_second=self.tokens_per_second,
            bytes_last_round=self.bytes_last_round,
            members_last_round=self.members_last_round,
            parameters_hash=self.parameters_hash(),
            addresses=(self.address,),
            curve_public_key=self.endpoint.public_key,
            bandwidth=self.config.bandwidth,
            version=self.version,
            updated_at=get_dht_time(),
        )

    def parameters_hash(self) -> str:
        """The hash of the global parameters (cached until they change)."""
        return self._parameters_hash(self.outer.parameters)

    async def publish(self, state: TrainerState | None = None) -> None:
        if state is not None:
            self.state = state
        record = self.record()
        entries = {self.key: record.to_wire(), **run_index_entry(self.dht.swarm_name, self.config.run)}
        try:
            await self.dht.publish_many(entries, ttl=self.config.record_ttl)
        except SwarmError as error:
            logger.warning("could not publish progress: %s", error)
        if self.on_progress is not None:
            self.on_progress(record)

    async def _members(self) -> dict[str, TrainingPeerRecord]:
        listing = await self.dht.list(self.key)
        return parse_run_listing({peer: item.value for peer, item in listing.items()})

    async def _ready_members(self, round_index: int) -> dict[str, tuple[str, bytes]]:
        return {
            peer: (record.addresses[0], record.curve_public_key)
            for peer, record in (await self._members()).items()
            if record.state == TrainerState.AVERAGING and record.round == round_index and record.addresses
        }

    async def _live_members(self) -> dict[str, tuple[str, bytes]]:
        """Members that take part in rounds: training or averaging, with a fresh record."""
        return {
            peer: (record.addresses[0], record.curve_public_key)
            for peer, record in (await self._members()).items()
            if record.state in (TrainerState.TRAINING, TrainerState.AVERAGING) and record.addresses
        }

    # -- state sharing -----------------------------------------------------------------

    async def _on_state_request(self, request: StateRequest, context: RequestContext) -> StateReply:
        if request.run != self.config.run or self.state == TrainerState.JOINING:
            raise ServerBusy(f"no state of run {request.run!r} to give")
        state = self.outer.state_dict()  # a copy: consistent even while we average
        momentum = state["momentum"]
        return StateReply(
            state["round"],
            CodedTensor(state["parameters"], RawCodec()),
            None if momentum is None else CodedTensor(momentum, RawCodec()),
            hash_parameters(state["parameters"]),
        )

    async def sync_from(self, donor: str, members: dict[str, TrainingPeerRecord]) -> None:
        """Replace ``theta_global`` and the outer momentum with ``donor``'s."""
        record = members[donor]
        state = await download_state(
            self.endpoint,
            record.addresses[0],
            record.curve_public_key,
            self.config.run,
            self.config.phase_timeout,
        )
        self.outer.load_state_dict(state)
        load_flat_parameters_(self.model, self.outer.parameters.detach())
        self.zero_update_next_round = True  # our local work so far is relative to other parameters
        logger.info("synced state of round %d from %s", self.outer.round, donor[:12])

    async def _initial_sync(self) -> None:
        checkpoint = load_training_state(self.config.checkpoint_dir) if self.config.checkpoint_dir else None
        if checkpoint is not None:
            self._restore(checkpoint)
            logger.info("resumed from checkpoint at round %d", self.outer.round)
        members = {
            peer: record
            for peer, record in (await self._members()).items()
            if peer != self.peer_id and record.state in (TrainerState.TRAINING, TrainerState.AVERAGING)
        }
        if not members:
            logger.info(
                "no other members of run %r: starting it at round %d", self.config.run, self.outer.round
            )
            return
        latest = max(record.round for record in members.values())
        if checkpoint is not None and latest <= self.outer.round:
            return
        tried: set[str] = set()
        while True:
            donor = choose_donor([p for p, r in members.items() if r.round == latest], self.peer_id, tried)
            if donor is None:
                logger.warning("no donor could give the state of round %d; starting from our own", latest)
                return
            try:
                await self.sync_from(donor, members)
                return
            except SwarmError as error:
                logger.warning("state download from %s failed: %s", donor[:12], error)
                tried.add(donor)

    # -- checkpoints -------------------------------------------------------------------

    def _checkpoint(self) -> None:
        if not self.config.checkpoint_dir:
            return
        save_training_state(
            self.config.checkpoint_dir,
            {
                "outer": self.outer.state_dict(),
                "model": self.model.state_dict(),
                "inner": self.inner.state_dict(),
                "schedule": self.schedule.state_dict(),
                "inner_step": self.inner_step,
                "data_position": self.sampler.position if self.sampler else 0,
                "loss_history": self.loss_history,
            },
        )

    def _restore(self, checkpoint: dict) -> None:
        self.outer.load_state_dict(checkpoint["outer"])
        self.model.load_state_dict(checkpoint["model"])
        self.inner.load_state_dict(checkpoint["inner"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.inner_step = int(checkpoint["inner_step"])
        self._data_position = int(checkpoint["data_position"])
        if self.sampler is not None:
            self.sampler.position = self._data_position
        self.loss_history = [tuple(item) for item in checkpoint["loss_history"]]

    # -- the loop ----------------------------------------------------------------------

    def _load_data(self) -> None:
        root = Path(self.config.data) if self.config.data else default_corpus_dir()
        cache = Path(self.config.checkpoint_dir or Path.home() / ".cache" / "swarm") / "tokens"
        tokens = tokenize_corpus(
            list_text_files(root), Path(self.config.model) / "tokenizer.json", self.config.corpus_bytes, cache
        )
        seed = int.from_bytes(self.peer_id.encode()[:8].ljust(8, b"\0"), "little") ^ self.config.seed
        self.sampler = WindowSampler(tokens, self.config.seq_len, seed, getattr(self, "_data_position", 0))

    def _inner_step(self) -> float:
        batch = self.sampler.next_batch(self.config.batch_size)
        self.inner.zero_grad()
        loss = language_model_loss(self.model, batch)
        loss.backward()
        self.inner.step()
        self.schedule.step()
        return float(loss.detach())

    async def _others_averaging(self) -> bool:
        try:
            ready = await self._ready_members(self.outer.round)
        except SwarmError:
            return False
        return bool(set(ready) - {self.peer_id})

    async def _inner_phase(self, stop: asyncio.Event) -> int:
        """Inner steps until the round's target, a stop, or (for a slower member) the others averaging."""
        started, samples, losses = time.monotonic(), 0, []
        last_check = started
        while not stop.is_set():
            losses.append(await asyncio.to_thread(self._inner_step))
            self.inner_step += 1
            samples += self.config.batch_size
            elapsed = time.monotonic() - started
            self.tokens_per_second = samples * self.config.seq_len / max(elapsed, 1e-9)
            if self.config.round_seconds and elapsed >= self.config.round_seconds:
                break
            if not self.config.round_seconds and len(losses) >= self.config.inner_steps:
                break
            if time.monotonic() - last_check >= 1.0:  # a slower member ends its round with the others
                last_check = time.monotonic()
                if await self._others_averaging():
                    logger.info("others are averaging round %d: ending this round early", self.outer.round)
                    break
        self.loss = sum(losses[-10:]) / max(1, len(losses[-10:]))
        return samples

    async def _catch_up(self) -> bool:
        """If live members are at a later round than ours, re-sync from one. Returns True if we did."""
        members = {
            peer: record
            for peer, record in (await self._members()).items()
            if peer != self.peer_id and record.state in (TrainerState.TRAINING, TrainerState.AVERAGING)
        }
        latest = max((record.round for record in members.values()), default=-1)
        if latest <= self.outer.round:
            return False
        logger.warning(
            "round %d: the run is at round %d; catching up from a member", self.outer.round, latest
        )
        donor = choose_donor([p for p, r in members.items() if r.round == latest], self.peer_id)
        try:
            await self.sync_from(donor, members)
        except SwarmError as error:
            logger.warning("catching up from %s failed: %s", donor[:12], error)
        return True

    async def _average(self, samples: int) -> bool:
        """Matchmaking, all-reduce and outer step of the current round. Returns False if skipped."""
        if await self._catch_up():
            return False
        round_index = self.outer.round
        await self.publish(TrainerState.AVERAGING)
        me = JoinGroup(
            round_index,
            self.peer_id,
            self.address,
            self.endpoint.public_key,
            self.config.bandwidth,
            self.parameters_hash(),
        )
        group = await self.matchmaker.form_group(round_index, me)
        if group is None:
            logger.warning("round %d: no group formed; training on", round_index)
            return False
        weight = 0.0 if self.zero_update_next_round or group.resync_from else float(samples)
        timeouts = AllReduceTimeouts(
            scatter=self.config.phase_timeout,
            gather=self.config.phase_timeout,
            repair=self.config.phase_timeout,
            call=min(10.0, self.config.phase_timeout),
        )
        pseudo_gradient = self.outer.pseudo_gradient(flatten_parameters(self.model))
        outcome = await self.averaging.all_reduce(
            f"{self.config.run}/{round_index}",
            group.members,
            group.my_index,
            pseudo_gradient,
            weight,
            timeouts,
            fault=self._fault_hook(round_index, len(group.members)),
            out=pseudo_gradient,  # in place: no second model-sized buffer per round
        )
        self.outer.step(outcome.averaged)
        load_flat_parameters_(self.model, self.outer.parameters.detach())
        self.zero_update_next_round = False
        self.bytes_last_round = outcome.bytes_sent
        self.members_last_round = len(group.members)
        self.loss_history.append((self.outer.round, self.loss))
        if group.resync_from:
            logger.error(
                "round %d: our parameters disagreed with the majority; re-syncing from %s",
                round_index,
                group.resync_from[:12],
            )
            await self.sync_from(group.resync_from, await self._members())
            self.zero_update_next_round = False  # the donor's state is exactly the group's result
        return True

    def _fault_hook(self, round_index: int, members: int):
        fault = self.fault
        if fault is None or members < fault.min_members:
            return None
        self.fault_countdown -= 1
        if self.fault_countdown != 0:
            return None

        def hook(kind: str, target: int) -> None:
            if kind == fault.kind:
                logger.warning("fault injection: killing this process at round %d, %s", round_index, kind)
                os.kill(os.getpid(), signal.SIGKILL)

        return hook

    async def run(self, stop: asyncio.Event) -> None:
        """Train until ``stop`` is set or ``max_rounds`` rounds are done; leave cleanly."""
        await asyncio.to_thread(self._load_data)
        await self._initial_sync()
        await self.publish(TrainerState.TRAINING)
        rounds_done = 0
        try:
            async with asyncio.TaskGroup() as tasks:
                refresher = tasks.create_task(self._refresh_record(stop))
                while not stop.is_set() and not (
                    self.config.max_rounds and rounds_done >= self.config.max_rounds
                ):
                    samples = await self._inner_phase(stop)
                    if stop.is_set():
                        break
                    averaged = await self._average(samples)
                    # publish first: once the log names a round, records and metrics show it
                    await self.publish(TrainerState.TRAINING)
                    if averaged:
                        rounds_done += 1
                        self._checkpoint()
                        logger.info(
                            "round %d done: loss %.4f, %d members, hash %s, %.2f MB sent, %.0f tokens/s",
                            self.outer.round,
                            self.loss,
                            self.members_last_round,
                            self.parameters_hash()[:16],
                            self.bytes_last_round / 1e6,
                            self.tokens_per_second,
                        )
                refresher.cancel()
        finally:
            await self.publish(TrainerState.LEAVING)
            await self.averaging.close()

    async def _refresh_record(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.record_ttl / 3)
            except TimeoutError:
                await self.publish()
