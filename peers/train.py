"""`swarm train`: start or join a DiLoCo training run."""

from __future__ import annotations

import argparse
import asyncio
import logging

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
    from swarm.training.trainer import TrainerConfig

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
    from swarm.training.trainer import TrainerConfig

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

    def update(self, run: str, record) -> None:
        for name, gauge in self.gauges.items():
            gauge.labels(run=run).set(getattr(record, name))


async def train(config, options: PeerOptions, metrics=None, telemetry=None) -> int:
    """Run one training member until it is stopped (SIGINT/SIGTERM) or reaches --max-rounds. Returns an exit code."""
    from peers.cli import software_version
    from swarm.training.trainer import Trainer
    from transport import Endpoint
    from transport.errors import SwarmError

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

            trainer = Trainer(config, dht, endpoint, address, software_version(), on_progress)
            print(f"training peer {str(dht.peer_id)[:12]} joined run {config.run!r} at {address}", flush=True)
            async with exporting(metrics, gauges.registry, publisher):
                await trainer.run(stop)
            print(f"left run {config.run!r} at round {trainer.outer.round}", flush=True)
    finally:
        dht.shutdown()
    return 0
