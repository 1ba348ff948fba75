"""`swarm train`: the process around a DiLoCo ``Trainer`` (``swarm/training/trainer.py``).

Start-up, flags, signals and exit codes come from the shared daemon runner
(``peers/daemon.py``); this module adds the trainer's Prometheus gauges and telemetry,
and passes ``SWARM_FAULT`` test faults to the trainer as a hook (``peers/faults.py``).
Likewise the test-only attacker (``SWARM_ATTACK``, :class:`Attack`): the library calls a
``before_contribute`` hook; poisoning the contribution happens here, never in ``swarm/``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from peers.daemon import (
    DaemonArguments,
    RunningPeer,
    daemon_main,
    establish_reachability,
    register_daemon,
    run_daemon,
)
from peers.faults import AllReduceFault
from peers.options import PeerOptions
from swarm.telemetry import trainer_telemetry_state

logger = logging.getLogger("swarm.train")


DESCRIPTION = """\
Start or join a collaborative DiLoCo training run. Each member trains its own replica
for a round of inner AdamW steps, then the members average their pseudo-gradients
(quantized, weighted by the samples each processed) and take an outer Nesterov step.
A member that joins mid-run downloads the current state from a member and contributes
from the next round; a member killed mid-round is survived by the others.

Start a run:   swarm train --model CHECKPOINT_DIR --init random --run myrun
Join it:       swarm train --model CHECKPOINT_DIR --run myrun --initial-peers MULTIADDR
Ctrl-C / SIGTERM finishes the current round, then leaves (twice to leave at once)."""


def register(subparsers) -> None:
    from swarm.training.trainer_config import TrainerConfig

    register_daemon(
        subparsers,
        "train",
        help="start or join a DiLoCo training run",
        description=DESCRIPTION,
        config_class=TrainerConfig,
        handler=main,
    )


def main(args: argparse.Namespace) -> int:
    from swarm.training.trainer_config import TrainerConfig

    try:
        AllReduceFault.from_environment()  # a bad SWARM_FAULT fails before anything starts
        Attack.from_environment()  # likewise SWARM_ATTACK
    except ValueError as error:
        logger.error("%s", error)
        return 2
    return daemon_main(TrainerConfig, args, logger, _train)


ATTACKS = ("nan", "scale", "flip", "weight")


@dataclass(frozen=True)
class Attack:
    """Make this member dishonest, for tests of the defences: from its ``from_round``-th
    all-reduce on, poison its contribution with ``kind``:

    - ``nan``: every value of the pseudo-gradient NaN;
    - ``scale``: the pseudo-gradient times ``factor`` (default 1000);
    - ``flip``: the pseudo-gradient times ``-factor`` (default 1);
    - ``weight``: claim ``factor`` samples (default 1e9).

    Read from ``SWARM_ATTACK=kind[:factor[:from_round]]``, e.g. ``scale:1000:1``.
    """

    kind: str
    factor: float | None = None
    from_round: int = 1

    @classmethod
    def from_environment(cls) -> Attack | None:
        value = os.environ.get("SWARM_ATTACK", "")
        if not value:
            return None
        kind, *rest = value.split(":")
        try:
            factor = float(rest[0]) if rest and rest[0] else None
            from_round = int(rest[1]) if len(rest) > 1 else 1
        except ValueError:
            raise ValueError(f"SWARM_ATTACK={value!r}: expected kind[:factor[:from_round]]") from None
        if kind not in ATTACKS:
            raise ValueError(f"SWARM_ATTACK={value!r}: kind must be one of {ATTACKS}")
        return cls(kind, factor, from_round)


def attack_hook(attack: Attack) -> Callable:
    """The trainer's ``before_contribute`` hook that carries out ``attack``."""
    contributions = 0

    def before_contribute(round_index: int, pseudo_gradient, weight: float) -> float:
        nonlocal contributions
        contributions += 1
        if contributions < attack.from_round or weight <= 0:
            return weight
        logger.warning("attack: poisoning our contribution to round %d (%s)", round_index, attack.kind)
        if attack.kind == "nan":
            pseudo_gradient.fill_(float("nan"))
        elif attack.kind == "scale":
            pseudo_gradient.mul_(attack.factor or 1000.0)
        elif attack.kind == "flip":
            pseudo_gradient.mul_(-(attack.factor or 1.0))
        else:
            return attack.factor or 1e9
        return weight

    return before_contribute


class _TrainerGauges:
    """The trainer's Prometheus gauges, updated from each published record."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        labels = ["run"]
        self.gauges = {
            "round": Gauge("swarm_train_round", "outer rounds completed", labels, registry=self.registry),
            "inner_step": Gauge(
                "swarm_train_inner_steps", "inner steps done", labels, registry=self.registry
            ),
            "loss": Gauge("swarm_train_loss", "latest inner training loss", labels, registry=self.registry),
            "tokens_per_second": Gauge(
                "swarm_train_tokens_per_second", "inner-loop speed", labels, registry=self.registry
            ),
            "bytes_last_round": Gauge(
                "swarm_train_bytes_sent_last_round",
                "bytes sent in the last all-reduce",
                labels,
                registry=self.registry,
            ),
            "members_last_round": Gauge(
                "swarm_train_group_size", "members of the last all-reduce", labels, registry=self.registry
            ),
            "fragment": Gauge(
                "swarm_train_fragment",
                "fragment of the last outer step (streaming)",
                labels,
                registry=self.registry,
            ),
            "wait_seconds": Gauge(
                "swarm_train_wait_seconds",
                "how long inner steps last waited for an exchange (streaming)",
                labels,
                registry=self.registry,
            ),
            "inner_share": Gauge(
                "swarm_train_inner_share", "share of wall time in inner steps", labels, registry=self.registry
            ),
        }
        self.direct = Gauge(
            "swarm_train_reachability_direct",
            "1 if peers can dial this member (direct), 0 if reached through relays",
            labels,
            registry=self.registry,
        )
        self.named = Gauge(
            "swarm_train_named_peer",
            "1 for each peer this member rejected, clipped or accused (kind) in its last round",
            ["run", "peer", "kind"],
            registry=self.registry,
        )

    def update(self, run: str, record) -> None:
        for name, gauge in self.gauges.items():
            gauge.labels(run=run).set(getattr(record, name))
        self.direct.labels(run=run).set(float(record.reachability is None or record.reachability.direct))
        self.named.clear()
        for kind in ("rejected", "clipped", "accused"):
            for peer in getattr(record, kind):
                self.named.labels(run=run, peer=peer, kind=kind).set(1)


async def train(config, options: PeerOptions, metrics=None, telemetry=None) -> int:
    """Runs one training member until it is stopped (SIGINT/SIGTERM) or reaches --max-rounds.

    For programs that build the configs themselves (``examples/train_together.py``).
    Returns an exit code.
    """
    arguments = DaemonArguments(config, options, metrics=metrics, telemetry=telemetry)
    return await run_daemon(arguments, logger, _train)


async def _establish_reachability(peer: RunningPeer):
    """The reachability check against the run's direct members (the first member asks no one)."""
    from swarm.data_plane import direct_member_checkers
    from swarm.training.membership import RunMembership

    config = peer.arguments.config
    members = await RunMembership(peer.dht, config.run, config.record_ttl).members()
    return await establish_reachability(peer, direct_member_checkers(members, str(peer.dht.peer_id)))


async def _train(peer: RunningPeer) -> None:
    from peers.cli import software_version
    from swarm.data_plane import PeerPlane
    from swarm.training.trainer import Trainer

    config = peer.arguments.config
    fault = AllReduceFault.from_environment()
    attack = Attack.from_environment()
    reachability = await _establish_reachability(peer)  # may restart the DHT: before anything uses it
    gauges = _TrainerGauges()
    latest = {}
    exports, publisher = peer.exporting(
        gauges.registry, lambda: trainer_telemetry_state(config.run, latest["record"]) if latest else {}
    )

    def on_progress(record) -> None:
        latest["record"] = record
        gauges.update(config.run, record)
        if publisher is not None:
            publisher.notify()

    # behind NAT, others reach this member over libp2p at its relayed addresses
    address = ",".join(peer.relayed.addresses) if peer.relayed is not None else peer.address
    plane = PeerPlane(peer.endpoint, peer.dht, peer.relayed)
    trainer = Trainer(
        config,
        peer.dht,
        plane,
        address,
        software_version(),
        on_progress,
        before_send=None if fault is None else fault.before_send_hook(),
        reachability=reachability,
        before_contribute=None if attack is None else attack_hook(attack),
    )
    plane.identify = trainer.membership.curve_key_of  # callers over libp2p, by their records
    print(f"training peer {str(peer.dht.peer_id)[:12]} joined run {config.run!r} at {address}", flush=True)
    try:
        async with exports:
            await trainer.run(peer.stop)
    finally:
        await plane.close()
    print(f"left run {config.run!r} at round {trainer.replica.round}", flush=True)
