"""`swarm train`: the process around a DiLoCo ``Trainer`` (``swarm/training/trainer.py``).

Start-up, flags, signals and exit codes come from the shared daemon runner
(``peers/daemon.py``); this module adds the trainer's Prometheus gauges and telemetry,
and passes ``SWARM_FAULT`` test faults to the trainer as a hook (``peers/faults.py``).
"""

from __future__ import annotations

import argparse
import logging

from peers.daemon import (
    DaemonArguments,
    RunningPeer,
    daemon_main,
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
    except ValueError as error:
        logger.error("%s", error)
        return 2
    return daemon_main(TrainerConfig, args, logger, _train)


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
    """Runs one training member until it is stopped (SIGINT/SIGTERM) or reaches --max-rounds.

    For programs that build the configs themselves (``examples/train_together.py``).
    Returns an exit code.
    """
    arguments = DaemonArguments(config, options, metrics=metrics, telemetry=telemetry)
    return await run_daemon(arguments, logger, _train)


async def _train(peer: RunningPeer) -> None:
    from peers.cli import software_version
    from swarm.training.trainer import Trainer

    config = peer.arguments.config
    fault = AllReduceFault.from_environment()
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

    trainer = Trainer(
        config,
        peer.dht,
        peer.endpoint,
        peer.address,
        software_version(),
        on_progress,
        before_send=None if fault is None else fault.before_send_hook(),
    )
    print(
        f"training peer {str(peer.dht.peer_id)[:12]} joined run {config.run!r} at {peer.address}", flush=True
    )
    async with exports:
        await trainer.run(peer.stop)
    print(f"left run {config.run!r} at round {trainer.replica.round}", flush=True)
