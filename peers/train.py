"""`swarm train`: start or join a DiLoCo training run.

Also the trainer's fault injection for tests and demos (``SWARM_FAULT``): the library
only calls a ``before_send`` hook; acting on it, by killing this process, happens here.
Likewise the test-only attacker (``SWARM_ATTACK``): the library calls a
``before_contribute`` hook; poisoning the contribution happens here, never in ``swarm/``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peers.metrics import add_metrics_arguments, metrics_config_from_args
from peers.options import (
    PeerOptions,
    add_config_arguments,
    config_from_arguments,
    configure_logging,
    data_plane_address,
    install_stop_handlers,
    run_async,
    start_peer,
)
from peers.telemetry_publisher import (
    add_telemetry_arguments,
    daemon_publisher,
    exporting,
    telemetry_config_from_args,
)
from swarm.telemetry import trainer_telemetry_state

if TYPE_CHECKING:
    from swarm.training.averaging import AllReduceSend

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

    parser = subparsers.add_parser(
        "train",
        help="start or join a DiLoCo training run",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, TrainerConfig)
    add_config_arguments(parser.add_argument_group("swarm"), PeerOptions)
    add_metrics_arguments(parser)
    add_telemetry_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from swarm.training.trainer_config import TrainerConfig

    configure_logging(args.verbose)
    try:
        config = config_from_arguments(TrainerConfig, args)
        options = config_from_arguments(PeerOptions, args)
        metrics = metrics_config_from_args(args)
        telemetry = telemetry_config_from_args(args)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    return run_async(lambda: train(config, options, metrics, telemetry))


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


def fault_hook(fault: FaultInjection) -> Callable[[AllReduceSend], None]:
    """The trainer's ``before_send`` hook that carries out ``fault``."""
    last_all_reduce, ordinal = 0, 0  # ordinal: among this member's all-reduces of min_members or more

    def before_send(send: AllReduceSend) -> None:
        nonlocal last_all_reduce, ordinal
        if send.group_size < fault.min_members:
            return
        if send.all_reduce != last_all_reduce:
            last_all_reduce = send.all_reduce
            # A group of one sends nothing, so the hook never sees it: when such groups count
            # too (min_members <= 1), every all-reduce counts and the service's count is the ordinal.
            ordinal = send.all_reduce if fault.min_members <= 1 else ordinal + 1
        if ordinal == fault.nth and send.kind == fault.kind:
            logger.warning(
                "fault injection: killing this process in its all-reduce %s, sending a %s to member %d",
                send.round_id,
                send.kind,
                send.target,
            )
            os.kill(os.getpid(), signal.SIGKILL)

    return before_send


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
        }
        self.named = Gauge(
            "swarm_train_named_peer",
            "1 for each peer this member rejected, clipped or accused (kind) in its last round",
            ["run", "peer", "kind"],
            registry=self.registry,
        )

    def update(self, run: str, record) -> None:
        for name, gauge in self.gauges.items():
            gauge.labels(run=run).set(getattr(record, name))
        self.named.clear()
        for kind in ("rejected", "clipped", "accused"):
            for peer in getattr(record, kind):
                self.named.labels(run=run, peer=peer, kind=kind).set(1)


async def train(config, options: PeerOptions, metrics=None, telemetry=None) -> int:
    """Run one training member until it is stopped (SIGINT/SIGTERM) or reaches --max-rounds. Returns an exit code."""
    from peers.cli import software_version
    from swarm.training.trainer import Trainer
    from transport import Endpoint
    from transport.errors import SwarmError

    fault = FaultInjection.from_environment()
    attack = Attack.from_environment()
    stop = asyncio.Event()
    install_stop_handlers(stop, asyncio.get_running_loop())
    try:
        identity, dht, swarm_key = await asyncio.to_thread(start_peer, options, config.record_ttl)
    except SwarmError as error:
        logger.error("could not join the swarm: %s", error)
        return 1
    try:
        async with Endpoint(identity.curve_keypair(), swarm_key=swarm_key) as endpoint:
            bound = await endpoint.bind(f"tcp://{options.host}:{options.port}")
            address = data_plane_address(options, bound)
            for maddr in dht.visible_maddrs():
                print(f"initial peer for others: {maddr}", flush=True)
            gauges = _TrainerGauges()
            latest = {}
            publisher = daemon_publisher(
                telemetry,
                options.swarm,
                dht,
                lambda: trainer_telemetry_state(config.run, latest["record"]) if latest else {},
            )

            def on_progress(record) -> None:
                latest["record"] = record
                gauges.update(config.run, record)
                if publisher is not None:
                    publisher.notify()

            trainer = Trainer(
                config,
                dht,
                endpoint,
                address,
                software_version(),
                on_progress,
                before_send=None if fault is None else fault_hook(fault),
                before_contribute=None if attack is None else attack_hook(attack),
            )
            print(f"training peer {str(dht.peer_id)[:12]} joined run {config.run!r} at {address}", flush=True)
            async with exporting(metrics, gauges.registry, publisher):
                await trainer.run(stop)
            print(f"left run {config.run!r} at round {trainer.replica.round}", flush=True)
    finally:
        dht.shutdown()
    return 0
